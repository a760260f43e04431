//! Read/write locks on shared resources, with fencing. Pure state: the
//! scheduler owns one `LockTable` and calls it on every transition that
//! concerns a task attempt or a worker incarnation, so that a worker's death
//! revokes its grants in the same critical section that requeues its tasks.
//!
//! Rules (after etcd's leases and ZooKeeper's lock recipe):
//! - A grant belongs to an [`Owner`]: (worker, incarnation, task, attempt).
//! - Grants are made in arrival order; readers at the head of the queue share;
//!   a waiting writer blocks every request behind it (no writer starvation).
//! - Every write grant bumps the resource's version; that version is the
//!   grant's fencing token. A write is published only by a release carrying
//!   the token of a grant that is still live. A revoked grant's token is
//!   stale: its write-back is refused and the value stays the last committed.

use std::collections::{BTreeMap, HashMap, VecDeque};

use flotilla_proto::{Attempt, Incarnation, LockGrant, LockMode, TaskId, WorkerId};
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{ResourceError, ResourceType};
use crate::store::{GrantRecord, Op};

pub use flotilla_proto::api::{Holder, Owner, ResourceView};

pub type RequestId = u64;

/// The longest resource name (as a Kubernetes object name).
pub const MAX_NAME: usize = 253;

/// What is wrong with a resource name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a shared resource needs a non-empty name")]
    Empty,
    #[error("a shared resource name is at most {MAX_NAME} characters; this one has {0}")]
    TooLong(usize),
    #[error("shared resource name `{name}` has the character {bad:?}; names use letters, digits, `_`, `.` and `-`")]
    BadCharacter { name: String, bad: char },
}

/// A resource name: 1 to [`MAX_NAME`] characters of `A-Z a-z 0-9 _ . -`, so
/// that it can always be read back in `GET /resources/{name}`.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong(name.chars().count()));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(NameError::BadCharacter {
            name: name.to_string(),
            bad,
        });
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("shared resource `{0}` does not exist")]
    Unknown(String),
    #[error("shared resource `{0}` already exists")]
    Duplicate(String),
    #[error("this task already holds a {mode} lock on `{name}`; release it before asking again")]
    AlreadyHeld { name: String, mode: LockMode },
    #[error("this task holds no {mode} lock on `{name}`")]
    NotHeld { name: String, mode: LockMode },
    #[error("stale write-back to `{name}` refused: fencing token {token} is not the live write grant (the resource is at version {version}; the grant was revoked or already released), so the value stays as last committed")]
    Fenced {
        name: String,
        token: u64,
        version: u64,
    },
    #[error("write to `{name}` refused: {reason}; the stored value is unchanged and the lock is still held")]
    WrongType { name: String, reason: String },
}

struct Waiter {
    id: RequestId,
    mode: LockMode,
    owner: Owner,
    tx: oneshot::Sender<LockGrant>,
}

struct Resource {
    kind: ResourceType,
    value: Value,
    version: u64,
    readers: BTreeMap<RequestId, Owner>,
    writer: Option<(RequestId, Owner, u64)>,
    queue: VecDeque<Waiter>,
}

#[derive(Default)]
pub struct LockTable {
    resources: BTreeMap<String, Resource>,
    next_id: RequestId,
    /// Fencing tokens of write grants revoked by a death, for the error message.
    revoked: HashMap<(String, u64), Owner>,
    /// The last write grant released by its owner on each resource: its
    /// request ID, owner, token and whether the release published. Kept
    /// (in the store too) so that a release resent after its answer was
    /// lost with a master is answered as it was, even when the next writer
    /// already has the lock.
    released: HashMap<String, (RequestId, Owner, u64, bool)>,
    /// The last [`RECENT_RELEASES`] write releases of each resource (owner,
    /// token, whether it published), the one above included: a resend can
    /// arrive after later writers have released too (a worker that lost its
    /// master retries with a growing delay while the others carry on with
    /// the next master), and is still answered as the first release was.
    recent_releases: HashMap<String, VecDeque<(Owner, u64, bool)>>,
    /// Resources whose value or version changed since [`LockTable::take_changed`].
    changed: std::collections::BTreeSet<String>,
    /// Grants made and ended since [`LockTable::take_grant_ops`], in order,
    /// when the durable store keeps them (`None`: it does not).
    grant_log: Option<Vec<Op>>,
    /// Grants made since [`LockTable::take_grants`] (the event log).
    grants: Vec<Granted>,
}

/// How many write releases per resource [`LockTable::already_released`]
/// remembers (see `LockTable::recent_releases`).
const RECENT_RELEASES: usize = 256;

fn remember_release(
    recent: &mut HashMap<String, VecDeque<(Owner, u64, bool)>>,
    name: &str,
    owner: Owner,
    token: u64,
    committed: bool,
) {
    let recent = recent.entry(name.to_string()).or_default();
    if recent.len() == RECENT_RELEASES {
        recent.pop_front();
    }
    recent.push_back((owner, token, committed));
}

/// How the store marks the record of a released write grant (see
/// `LockTable::released`), by whether the release published.
fn released_mode(committed: bool) -> &'static str {
    if committed {
        "released-published"
    } else {
        "released"
    }
}

/// A grant made (`Some` owner) or ended, for the durable store.
fn log_grant(
    log: &mut Option<Vec<Op>>,
    name: &str,
    id: RequestId,
    made: Option<(LockMode, Owner, u64)>,
) {
    let Some(log) = log.as_mut() else { return };
    log.push(match made {
        Some((mode, o, token)) => Op::Grant(GrantRecord {
            resource: name.to_string(),
            request: id,
            mode: mode.to_string(),
            token,
            worker: o.worker,
            incarnation: o.incarnation,
            task: o.task,
            attempt: o.attempt,
        }),
        None => Op::Ungrant {
            resource: name.to_string(),
            request: id,
        },
    });
}

/// A grant as the event log tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct Granted {
    pub resource: String,
    pub mode: LockMode,
    pub owner: Owner,
    pub token: u64,
}

impl LockTable {
    pub fn create(
        &mut self,
        name: &str,
        kind: ResourceType,
        value: Value,
    ) -> Result<(), ResourceError> {
        check_name(name)?;
        if self.resources.contains_key(name) {
            return Err(ResourceError::Duplicate(name.to_string()));
        }
        let value = if value.is_null() {
            kind.zero()
        } else {
            kind.check(value)?
        };
        self.changed.insert(name.to_string());
        self.resources.insert(
            name.to_string(),
            Resource {
                kind,
                value,
                version: 0,
                readers: BTreeMap::new(),
                writer: None,
                queue: VecDeque::new(),
            },
        );
        info!(
            resource = name,
            kind = kind.name(),
            "shared resource created"
        );
        Ok(())
    }

    fn holds(r: &Resource, owner: &Owner) -> Option<LockMode> {
        if r.writer.as_ref().is_some_and(|(_, o, _)| o == owner) {
            return Some(LockMode::Write);
        }
        r.readers
            .values()
            .any(|o| o == owner)
            .then_some(LockMode::Read)
    }

    /// Queues a request; `tx` receives the grant when it is made (maybe at
    /// once). Returns the request's ID, for [`LockTable::cancel`].
    pub fn acquire(
        &mut self,
        name: &str,
        mode: LockMode,
        owner: Owner,
        tx: oneshot::Sender<LockGrant>,
    ) -> Result<RequestId, LockError> {
        let r = self
            .resources
            .get_mut(name)
            .ok_or_else(|| LockError::Unknown(name.to_string()))?;
        if let Some(held) = Self::holds(r, &owner) {
            return Err(LockError::AlreadyHeld {
                name: name.to_string(),
                mode: held,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        r.queue.push_back(Waiter {
            id,
            mode,
            owner,
            tx,
        });
        if Self::pump(name, r, &mut self.grant_log, &mut self.grants) {
            self.changed.insert(name.to_string());
        }
        Ok(id)
    }

    /// Grants from the head of the queue while the head is compatible.
    /// Returns true when it made a write grant: that bumped the version
    /// (the fencing token), which the durable store must keep.
    #[must_use]
    fn pump(
        name: &str,
        r: &mut Resource,
        log: &mut Option<Vec<Op>>,
        grants: &mut Vec<Granted>,
    ) -> bool {
        let mut wrote = false;
        while let Some(head) = r.queue.front() {
            let grantable = match head.mode {
                LockMode::Write => r.writer.is_none() && r.readers.is_empty(),
                LockMode::Read => r.writer.is_none(),
            };
            if !grantable {
                break;
            }
            let w = r.queue.pop_front().expect("head exists");
            let token = match w.mode {
                LockMode::Write => {
                    r.version += 1;
                    wrote = true;
                    r.version
                }
                LockMode::Read => r.version,
            };
            let grant = LockGrant {
                name: name.to_string(),
                kind: r.kind.name().to_string(),
                mode: w.mode,
                value: r.value.clone(),
                token,
            };
            if w.tx.send(grant).is_err() {
                continue; // the requester went away before the grant: skip it
            }
            match w.mode {
                LockMode::Write => r.writer = Some((w.id, w.owner, token)),
                LockMode::Read => {
                    r.readers.insert(w.id, w.owner);
                }
            }
            log_grant(log, name, w.id, Some((w.mode, w.owner, token)));
            info!(resource = name, mode = %w.mode, worker = w.owner.worker, task = w.owner.task, token, "Node {} has acquired {} access to resource {name}", w.owner.worker, w.mode);
            grants.push(Granted {
                resource: name.to_string(),
                mode: w.mode,
                owner: w.owner,
                token,
            });
        }
        wrote
    }

    /// `owner`'s request `id` is going away (timed out, connection closed).
    /// If it was still waiting it leaves the queue; if it had just been
    /// granted, `granted` is that grant and it is released without writing.
    /// A request or grant of another owner is left alone.
    pub fn cancel(&mut self, name: &str, id: RequestId, owner: Owner, granted: Option<&LockGrant>) {
        let Some(r) = self.resources.get_mut(name) else {
            return;
        };
        r.queue.retain(|w| !(w.id == id && w.owner == owner));
        if granted.is_some() {
            if r.readers.get(&id) == Some(&owner) {
                r.readers.remove(&id);
                log_grant(&mut self.grant_log, name, id, None);
            }
            if r.writer
                .as_ref()
                .is_some_and(|(wid, o, _)| *wid == id && *o == owner)
            {
                r.writer = None;
                log_grant(&mut self.grant_log, name, id, None);
            }
        }
        if Self::pump(name, r, &mut self.grant_log, &mut self.grants) {
            self.changed.insert(name.to_string());
        }
    }

    /// Releases `owner`'s lock on `name`. A write release with `publish`
    /// (new value, token) commits the value if the token is that of the
    /// live grant and the value has the resource's type.
    pub fn release(
        &mut self,
        name: &str,
        mode: LockMode,
        owner: Owner,
        publish: Option<(Value, u64)>,
    ) -> Result<(u64, bool), LockError> {
        let r = self
            .resources
            .get_mut(name)
            .ok_or_else(|| LockError::Unknown(name.to_string()))?;
        let mut committed = false;
        match mode {
            LockMode::Read => {
                let id = r
                    .readers
                    .iter()
                    .find(|(_, o)| **o == owner)
                    .map(|(id, _)| *id);
                let Some(id) = id else {
                    return Err(LockError::NotHeld {
                        name: name.into(),
                        mode,
                    });
                };
                r.readers.remove(&id);
                log_grant(&mut self.grant_log, name, id, None);
            }
            LockMode::Write => {
                let live = r.writer.filter(|(_, o, _)| *o == owner);
                if let Some((value, token)) = publish {
                    match live {
                        Some((_, _, live_token)) if live_token == token && token == r.version => {}
                        _ => {
                            if let Some(o) = self.revoked.get(&(name.to_string(), token)) {
                                warn!(
                                    resource = name,
                                    token,
                                    worker = o.worker,
                                    "refusing the write-back of a revoked grant"
                                );
                            }
                            return Err(LockError::Fenced {
                                name: name.into(),
                                token,
                                version: r.version,
                            });
                        }
                    }
                    let value = r.kind.check(value).map_err(|e| LockError::WrongType {
                        name: name.into(),
                        reason: e.to_string(),
                    })?;
                    r.value = value;
                    committed = true;
                } else if live.is_none() {
                    return Err(LockError::NotHeld {
                        name: name.into(),
                        mode,
                    });
                }
                if let Some((id, _, token)) = r.writer.take() {
                    // The grant's row becomes the record of its release
                    // (replacing the previous release's record).
                    let before = self
                        .released
                        .insert(name.to_string(), (id, owner, token, committed));
                    remember_release(&mut self.recent_releases, name, owner, token, committed);
                    if let Some((old, ..)) = before {
                        log_grant(&mut self.grant_log, name, old, None);
                    }
                    if let Some(log) = self.grant_log.as_mut() {
                        log.push(Op::Grant(GrantRecord {
                            resource: name.to_string(),
                            request: id,
                            mode: released_mode(committed).to_string(),
                            token,
                            worker: owner.worker,
                            incarnation: owner.incarnation,
                            task: owner.task,
                            attempt: owner.attempt,
                        }));
                    }
                }
            }
        }
        info!(resource = name, %mode, worker = owner.worker, task = owner.task, committed, "Node {} has released {mode} access to resource {name}", owner.worker);
        let version = r.version;
        let wrote = Self::pump(name, r, &mut self.grant_log, &mut self.grants);
        if wrote || committed {
            self.changed.insert(name.to_string());
        }
        Ok((version, committed))
    }

    /// The task attempt ended: whatever it still holds is released without
    /// writing (the seed released a finished task's locks too); its queued
    /// requests are dropped.
    pub fn release_attempt(&mut self, task: TaskId, attempt: Attempt) {
        self.release_where(|o| o.task == task && o.attempt == attempt, false);
    }

    /// The worker incarnation was declared dead: its grants are revoked (their
    /// tokens become stale), its queued requests dropped, waiters proceed.
    pub fn revoke_worker(&mut self, worker: WorkerId, incarnation: Incarnation) {
        self.release_where(|o| o.worker == worker && o.incarnation == incarnation, true);
    }

    fn release_where(&mut self, pred: impl Fn(&Owner) -> bool, revoke: bool) {
        for (name, r) in self.resources.iter_mut() {
            let before = r.readers.len() + r.writer.is_some() as usize + r.queue.len();
            let gone: Vec<RequestId> = r
                .readers
                .iter()
                .filter(|(_, o)| pred(o))
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                r.readers.remove(&id);
                log_grant(&mut self.grant_log, name, id, None);
            }
            if let Some((id, o, token)) = r.writer {
                if pred(&o) {
                    r.writer = None;
                    log_grant(&mut self.grant_log, name, id, None);
                    if revoke {
                        self.revoked.insert((name.clone(), token), o);
                    }
                    warn!(resource = %name, token, worker = o.worker, task = o.task, revoke, "write lock on {name} released without writing (holder {})", if revoke { "declared dead" } else { "ended" });
                }
            }
            r.queue.retain(|w| !pred(&w.owner));
            let after = r.readers.len() + r.writer.is_some() as usize + r.queue.len();
            if after != before {
                info!(resource = %name, "Releasing resources held by a {} task", if revoke { "dead worker's" } else { "finished" });
                if Self::pump(name, r, &mut self.grant_log, &mut self.grants) {
                    self.changed.insert(name.clone());
                }
            }
        }
    }

    /// The grants made since the last call, oldest first.
    pub fn take_grants(&mut self) -> Vec<Granted> {
        std::mem::take(&mut self.grants)
    }

    /// The resources whose value or version changed since the last call, as
    /// the durable store keeps them.
    pub fn take_changed(&mut self) -> Vec<crate::store::ResourceRecord> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .filter_map(|name| {
                let r = self.resources.get(&name)?;
                Some(crate::store::ResourceRecord {
                    kind: r.kind.name().to_string(),
                    value: r.value.clone(),
                    version: r.version,
                    name,
                })
            })
            .collect()
    }

    /// `owner`'s live grant of `mode` on `name`, if it holds one: its
    /// request ID and the grant as it was made (a resent acquire is
    /// answered with it).
    pub fn held(&self, name: &str, mode: LockMode, owner: Owner) -> Option<(RequestId, LockGrant)> {
        let r = self.resources.get(name)?;
        let (id, token) = match mode {
            LockMode::Write => r
                .writer
                .filter(|(_, o, _)| *o == owner)
                .map(|(id, _, token)| (id, token))?,
            LockMode::Read => r
                .readers
                .iter()
                .find(|(_, o)| **o == owner)
                .map(|(&id, _)| (id, r.version))?,
        };
        Some((
            id,
            LockGrant {
                name: name.to_string(),
                kind: r.kind.name().to_string(),
                mode,
                value: r.value.clone(),
                token,
            },
        ))
    }

    /// A resent release that now finds nothing to release: whether the
    /// first one was carried out. `owner` holds no such lock any more, and
    /// for a publishing write release the resource is still at the grant's
    /// version (no write grant since) with the very value it published.
    /// `Some((version, committed))` as the first answer was; `None`: it was
    /// not (the resend is refused as any release would be).
    pub fn already_released(
        &self,
        name: &str,
        mode: LockMode,
        owner: Owner,
        publish: Option<&(Value, u64)>,
    ) -> Option<(u64, bool)> {
        let r = self.resources.get(name)?;
        if self.held(name, mode, owner).is_some() {
            return None;
        }
        match mode {
            // A read release changes nothing: done is done.
            LockMode::Read => Some((r.version, false)),
            LockMode::Write => {
                let same_token = |token: u64| publish.is_none_or(|(_, t)| *t == token);
                self.recent_releases
                    .get(name)?
                    .iter()
                    .rev()
                    .find(|&&(by, token, _)| by == owner && same_token(token))
                    .map(|&(_, token, committed)| (token, committed))
            }
        }
    }

    /// A record of a released write grant the store kept (see
    /// `released`); false if `g` is a grant, not such a record.
    pub fn restore_released(&mut self, g: &GrantRecord) -> bool {
        let committed = match g.mode.as_str() {
            m if m == released_mode(true) => true,
            m if m == released_mode(false) => false,
            _ => return false,
        };
        self.next_id = self.next_id.max(g.request + 1);
        let owner = Owner {
            worker: g.worker,
            incarnation: g.incarnation,
            task: g.task,
            attempt: g.attempt,
        };
        self.released
            .insert(g.resource.clone(), (g.request, owner, g.token, committed));
        remember_release(
            &mut self.recent_releases,
            &g.resource,
            owner,
            g.token,
            committed,
        );
        true
    }

    /// From now on grants made and ended are kept for the durable store.
    pub fn keep_grant_log(&mut self) {
        self.grant_log.get_or_insert_with(Vec::new);
    }

    /// The grants made and ended since the last call, in order, as store
    /// operations.
    pub fn take_grant_ops(&mut self) -> Vec<Op> {
        self.grant_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Request IDs from here on are new (above those a previous master on
    /// the same store handed out).
    pub fn skip_request_ids(&mut self, past: RequestId) {
        self.next_id = self.next_id.max(past + 1);
    }

    /// A grant the store kept, of an attempt that runs on (its worker was
    /// adopted): held again, as it was. Refused (false) when the resource is
    /// gone, the grant conflicts with one already held, or a write grant's
    /// token is not the resource's version (a later write grant was made).
    pub fn restore_grant(&mut self, g: &GrantRecord) -> bool {
        let Some(r) = self.resources.get_mut(&g.resource) else {
            return false;
        };
        let owner = Owner {
            worker: g.worker,
            incarnation: g.incarnation,
            task: g.task,
            attempt: g.attempt,
        };
        self.next_id = self.next_id.max(g.request + 1);
        match g.mode.as_str() {
            "write" if r.writer.is_none() && r.readers.is_empty() && g.token == r.version => {
                r.writer = Some((g.request, owner, g.token));
                true
            }
            "read" if r.writer.is_none() => {
                r.readers.insert(g.request, owner);
                true
            }
            _ => false,
        }
    }

    /// A grant the store kept whose attempt does not run on: ended, and a
    /// write grant's token remembered as revoked (a late write-back with it
    /// is refused, naming it).
    pub fn forget_grant(&mut self, g: &GrantRecord) {
        log_grant(&mut self.grant_log, &g.resource, g.request, None);
        if g.mode == "write" {
            self.revoked.insert(
                (g.resource.clone(), g.token),
                Owner {
                    worker: g.worker,
                    incarnation: g.incarnation,
                    task: g.task,
                    attempt: g.attempt,
                },
            );
        }
    }

    /// A resource as the store kept it: created if the manifest did not
    /// create it, otherwise its value and version are the stored ones.
    pub fn restore(&mut self, rec: &crate::store::ResourceRecord) -> Result<(), ResourceError> {
        let kind = ResourceType::parse(&rec.kind)?;
        if !self.resources.contains_key(&rec.name) {
            self.create(&rec.name, kind, Value::Null)?;
        }
        let r = self.resources.get_mut(&rec.name).expect("just ensured");
        if r.kind != kind {
            return Err(ResourceError::KindChanged {
                name: rec.name.clone(),
                manifest: r.kind.name(),
                stored: kind.name(),
            });
        }
        r.value = kind.check(rec.value.clone())?;
        r.version = rec.version;
        self.changed.remove(&rec.name);
        Ok(())
    }

    pub fn view(&self, name: &str) -> Option<ResourceView> {
        let r = self.resources.get(name)?;
        let mut holders: Vec<Holder> = r
            .writer
            .iter()
            .map(|(_, o, _)| Holder {
                mode: LockMode::Write,
                owner: *o,
            })
            .collect();
        holders.extend(r.readers.values().map(|o| Holder {
            mode: LockMode::Read,
            owner: *o,
        }));
        Some(ResourceView {
            name: name.to_string(),
            kind: r.kind.name().to_string(),
            value: r.value.clone(),
            version: r.version,
            holders,
            waiting: r
                .queue
                .iter()
                .map(|w| Holder {
                    mode: w.mode,
                    owner: w.owner,
                })
                .collect(),
        })
    }

    pub fn views(&self) -> Vec<ResourceView> {
        self.resources.keys().filter_map(|n| self.view(n)).collect()
    }

    /// Every resource for a display (the dashboard): the value as
    /// `show_value` makes it (a preview, so a large value is not copied),
    /// at most `most` holders and `most` waiters, and how many wait in all.
    /// The work is bounded by the number of resources, not their sizes.
    pub fn previews(
        &self,
        most: usize,
        show_value: impl Fn(&Value) -> String,
    ) -> Vec<(ResourceView, usize)> {
        self.resources
            .iter()
            .map(|(name, r)| {
                let holders = r
                    .writer
                    .iter()
                    .map(|(_, o, _)| Holder {
                        mode: LockMode::Write,
                        owner: *o,
                    })
                    .chain(r.readers.values().map(|o| Holder {
                        mode: LockMode::Read,
                        owner: *o,
                    }))
                    .take(most)
                    .collect();
                let waiting = r
                    .queue
                    .iter()
                    .take(most)
                    .map(|w| Holder {
                        mode: w.mode,
                        owner: w.owner,
                    })
                    .collect();
                let view = ResourceView {
                    name: name.clone(),
                    kind: r.kind.name().to_string(),
                    value: Value::String(show_value(&r.value)),
                    version: r.version,
                    holders,
                    waiting,
                };
                (view, r.queue.len())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn owner(worker: WorkerId, task: TaskId) -> Owner {
        Owner {
            worker,
            incarnation: 1,
            task,
            attempt: 1,
        }
    }

    fn table() -> LockTable {
        let mut t = LockTable::default();
        t.create("total", ResourceType::Integer, json!(0)).unwrap();
        t
    }

    fn ask(t: &mut LockTable, mode: LockMode, o: Owner) -> oneshot::Receiver<LockGrant> {
        let (tx, rx) = oneshot::channel();
        t.acquire("total", mode, o, tx).unwrap();
        rx
    }

    #[test]
    fn previews_bound_the_holders_and_waiters_and_show_the_value_as_given() {
        let mut t = table();
        let _held = ask(&mut t, LockMode::Write, owner(0, 1));
        let _waiting: Vec<_> = (2..12)
            .map(|task| ask(&mut t, LockMode::Write, owner(1, task)))
            .collect();
        let previews = t.previews(3, |v| format!("value {v}"));
        assert_eq!(previews.len(), 1);
        let (view, waiting_total) = &previews[0];
        assert_eq!(view.name, "total");
        assert_eq!(view.value, json!("value 0"));
        assert_eq!(view.holders.len(), 1);
        assert_eq!(view.holders[0].owner.task, 1);
        assert_eq!(view.waiting.len(), 3);
        assert_eq!(view.waiting[0].owner.task, 2, "the first in line first");
        assert_eq!(*waiting_total, 10);
        // The same as the full view, but bounded.
        let full = t.view("total").unwrap();
        assert_eq!(full.waiting[..3], view.waiting[..]);
        assert_eq!(full.waiting.len(), 10);
    }

    #[test]
    fn a_resent_release_is_answered_as_done_after_later_writers_released_too() {
        let mut t = table();
        let (a, b, c) = (owner(0, 1), owner(1, 2), owner(2, 3));
        let mut ga = ask(&mut t, LockMode::Write, a);
        assert_eq!(ga.try_recv().unwrap().token, 1);
        let publish = (json!(5), 1);
        assert_eq!(
            t.release("total", LockMode::Write, a, Some(publish.clone())),
            Ok((1, true))
        );
        // Two more writers come and go before a's resend arrives.
        for (who, token) in [(b, 2), (c, 3)] {
            let mut g = ask(&mut t, LockMode::Write, who);
            assert_eq!(g.try_recv().unwrap().token, token);
            assert_eq!(
                t.release("total", LockMode::Write, who, Some((json!(token), token))),
                Ok((token, true))
            );
        }
        assert_eq!(
            t.already_released("total", LockMode::Write, a, Some(&publish)),
            Some((1, true)),
            "a's release was carried out: answered as done, not refused as stale"
        );
        assert_eq!(
            t.already_released("total", LockMode::Write, a, Some(&(json!(5), 2))),
            None,
            "b's token is not a's release"
        );
        // The memory is bounded: after RECENT_RELEASES more, a's is forgotten.
        for i in 0..RECENT_RELEASES as u64 {
            let who = owner(1, 100 + i);
            let mut g = ask(&mut t, LockMode::Write, who);
            let token = g.try_recv().unwrap().token;
            t.release("total", LockMode::Write, who, Some((json!(0), token)))
                .unwrap();
        }
        assert_eq!(
            t.already_released("total", LockMode::Write, a, Some(&publish)),
            None
        );
    }

    #[test]
    fn a_resent_release_is_answered_as_done_even_after_the_next_writer_got_the_lock() {
        let mut t = table();
        t.keep_grant_log();
        let (a, b) = (owner(0, 1), owner(1, 2));
        let mut ga = ask(&mut t, LockMode::Write, a);
        let mut gb = ask(&mut t, LockMode::Write, b);
        assert_eq!(ga.try_recv().unwrap().token, 1);
        assert!(gb.try_recv().is_err(), "b waits");
        let publish = (json!(5), 1);
        assert_eq!(
            t.release("total", LockMode::Write, a, Some(publish.clone())),
            Ok((1, true))
        );
        assert_eq!(gb.try_recv().unwrap().token, 2, "b has it now");
        // a's release again: answered as it was, not published again.
        assert_eq!(
            t.already_released("total", LockMode::Write, a, Some(&publish)),
            Some((1, true))
        );
        assert_eq!(
            t.already_released("total", LockMode::Write, a, Some(&(json!(5), 2))),
            None,
            "another token is not that release"
        );
        assert_eq!(
            t.already_released("total", LockMode::Write, b, None),
            None,
            "b holds its grant"
        );
        // The record survives a restart: the store keeps it as a grant row.
        let ops = t.take_grant_ops();
        let record = ops
            .iter()
            .rev()
            .find_map(|op| match op {
                Op::Grant(g) if g.task == 1 => Some(g.clone()),
                _ => None,
            })
            .expect("the release is recorded");
        let mut fresh = table();
        assert!(fresh.restore_released(&record));
        assert_eq!(
            fresh.already_released("total", LockMode::Write, a, Some(&publish)),
            Some((1, true))
        );
    }

    #[test]
    fn readers_share_and_a_waiting_writer_blocks_later_readers() {
        let mut t = table();
        let mut r1 = ask(&mut t, LockMode::Read, owner(0, 1));
        let mut r2 = ask(&mut t, LockMode::Read, owner(1, 2));
        assert!(
            r1.try_recv().is_ok() && r2.try_recv().is_ok(),
            "two readers at once"
        );
        let mut w = ask(&mut t, LockMode::Write, owner(2, 3));
        let mut r3 = ask(&mut t, LockMode::Read, owner(3, 4));
        assert!(w.try_recv().is_err() && r3.try_recv().is_err());
        t.release("total", LockMode::Read, owner(0, 1), None)
            .unwrap();
        t.release("total", LockMode::Read, owner(1, 2), None)
            .unwrap();
        let g = w
            .try_recv()
            .expect("the writer goes before the later reader");
        assert!(r3.try_recv().is_err());
        t.release(
            "total",
            LockMode::Write,
            owner(2, 3),
            Some((json!(5), g.token)),
        )
        .unwrap();
        assert_eq!(r3.try_recv().unwrap().value, json!(5));
    }

    #[test]
    fn only_the_requests_owner_cancels_it() {
        let mut t = table();
        let holder = owner(0, 1);
        let g = ask(&mut t, LockMode::Write, holder).try_recv().unwrap();
        // Request 0 is the holder's grant: another owner cannot give it back.
        t.cancel("total", 0, owner(1, 2), Some(&g));
        assert_eq!(t.view("total").unwrap().holders.len(), 1);
        let (tx, mut waiting) = oneshot::channel();
        let id = t
            .acquire("total", LockMode::Write, owner(1, 2), tx)
            .unwrap();
        t.cancel("total", id, owner(2, 3), None);
        assert_eq!(t.view("total").unwrap().waiting.len(), 1, "still queued");
        // Its owner may: the queued request leaves, and a grant given back
        // lets the next one in.
        t.cancel("total", id, owner(1, 2), None);
        assert!(t.view("total").unwrap().waiting.is_empty());
        assert!(waiting.try_recv().is_err());
        let mut next = ask(&mut t, LockMode::Read, owner(3, 4));
        t.cancel("total", 0, holder, Some(&g));
        assert!(next.try_recv().is_ok(), "the grant was given back");
    }

    #[test]
    fn a_revoked_write_grant_cannot_write_back() {
        let mut t = table();
        let zombie = owner(0, 1);
        let g = ask(&mut t, LockMode::Write, zombie).try_recv().unwrap();
        let mut next = ask(&mut t, LockMode::Write, owner(1, 1));
        t.revoke_worker(0, 1);
        let g2 = next.try_recv().expect("the waiter proceeds at once");
        assert!(g2.token > g.token);
        let err = t
            .release("total", LockMode::Write, zombie, Some((json!(99), g.token)))
            .unwrap_err();
        assert!(matches!(err, LockError::Fenced { .. }), "{err}");
        t.release(
            "total",
            LockMode::Write,
            owner(1, 1),
            Some((json!(1), g2.token)),
        )
        .unwrap();
        assert_eq!(t.view("total").unwrap().value, json!(1));
    }

    #[test]
    fn a_wrong_type_is_refused_and_the_lock_kept() {
        let mut t = table();
        let o = owner(0, 1);
        let g = ask(&mut t, LockMode::Write, o).try_recv().unwrap();
        let err = t
            .release("total", LockMode::Write, o, Some((json!("five"), g.token)))
            .unwrap_err();
        assert!(
            err.to_string().contains("Integer") && err.to_string().contains("unchanged"),
            "{err}"
        );
        assert_eq!(t.view("total").unwrap().value, json!(0));
        t.release("total", LockMode::Write, o, Some((json!(5), g.token)))
            .unwrap();
        assert_eq!(t.view("total").unwrap().value, json!(5));
    }

    #[test]
    fn errors_name_the_problem() {
        let mut t = table();
        let (tx, _rx) = oneshot::channel();
        assert_eq!(
            t.acquire("nope", LockMode::Read, owner(0, 1), tx)
                .unwrap_err(),
            LockError::Unknown("nope".into())
        );
        let _g = ask(&mut t, LockMode::Read, owner(0, 1));
        let (tx, _rx) = oneshot::channel();
        assert!(matches!(
            t.acquire("total", LockMode::Write, owner(0, 1), tx),
            Err(LockError::AlreadyHeld { .. })
        ));
        assert!(matches!(
            t.release("total", LockMode::Write, owner(0, 1), None),
            Err(LockError::NotHeld { .. })
        ));
        assert!(t
            .create("total", ResourceType::Integer, json!(1))
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        assert!(t
            .create("x", ResourceType::List, json!({}))
            .unwrap_err()
            .to_string()
            .contains("List"));
    }

    #[test]
    fn a_finished_task_s_locks_are_released_without_writing() {
        let mut t = table();
        let g = ask(&mut t, LockMode::Write, owner(0, 7))
            .try_recv()
            .unwrap();
        let mut next = ask(&mut t, LockMode::Read, owner(1, 8));
        t.release_attempt(7, 1);
        assert_eq!(next.try_recv().unwrap().value, json!(0));
        assert!(t
            .release(
                "total",
                LockMode::Write,
                owner(0, 7),
                Some((json!(3), g.token))
            )
            .is_err());
    }

    proptest! {
        /// Never a writer with anyone else; tokens strictly grow; the value
        /// only changes through a live writer's release.
        #[test]
        fn mutual_exclusion_and_fencing_hold(ops in proptest::collection::vec((0u8..4, 0u32..5, any::<bool>()), 1..200)) {
            let mut t = table();
            let mut pending: Vec<(Owner, LockMode, oneshot::Receiver<LockGrant>)> = Vec::new();
            let mut held: HashMap<Owner, LockGrant> = HashMap::new();
            let mut last_token = 0;
            let mut commits = 0i64;
            for (op, who, flag) in ops {
                let o = owner(who, who as u64);
                match op {
                    0 => {
                        let mode = if flag { LockMode::Write } else { LockMode::Read };
                        let (tx, rx) = oneshot::channel();
                        if t.acquire("total", mode, o, tx).is_ok() { pending.push((o, mode, rx)); }
                    }
                    1 => if let Some(g) = held.remove(&o) {
                        let publish = (g.mode == LockMode::Write && flag).then(|| (json!(commits + 1), g.token));
                        let (_, committed) = t.release("total", g.mode, o, publish).unwrap();
                        if committed { commits += 1; }
                    },
                    2 => { t.revoke_worker(who, 1); held.remove(&o); pending.retain(|(p, _, _)| *p != o); }
                    _ => if let Some(g) = held.get(&o) {
                        // A stale token never commits.
                        if g.mode == LockMode::Write {
                            prop_assert!(t.release("total", LockMode::Write, o, Some((json!(-1), g.token + 1))).is_err());
                        }
                    },
                }
                let mut still = Vec::new();
                for (o, mode, mut rx) in pending.drain(..) {
                    match rx.try_recv() {
                        Ok(g) => {
                            if g.mode == LockMode::Write { prop_assert!(g.token > last_token); last_token = g.token; }
                            held.insert(o, g);
                        }
                        Err(oneshot::error::TryRecvError::Empty) => still.push((o, mode, rx)),
                        Err(_) => {}
                    }
                }
                pending = still;
                let v = t.view("total").unwrap();
                let writers = v.holders.iter().filter(|h| h.mode == LockMode::Write).count();
                prop_assert!(writers == 0 || v.holders.len() == 1, "a writer shares with nobody: {:?}", v.holders);
                prop_assert_eq!(v.value, json!(commits));
            }
        }
    }
}
