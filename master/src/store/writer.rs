//! The writer thread: group commit. It blocks for the first append, takes
//! every append that queued up meanwhile (up to [`MAX_BATCH`] operations),
//! applies them in order in one transaction and commits: one sync for the
//! whole batch. Then it publishes the last sequence number it committed.
//!
//! Results past their TTL are deleted here too, in the background: an
//! [`Op::Expire`] only records the cutoff, and the rows go
//! [`EXPIRE_STEP`] tasks per transaction whenever no append is waiting, so
//! however many expire at once, a submission waits for one small step at
//! most.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, TryRecvError};

use rusqlite::{params, Connection, Transaction};
use tokio::sync::watch;
use tracing::{debug, error};

use super::{Op, Progress};

/// Operations committed at most in one transaction (a bound on its size).
pub(super) const MAX_BATCH: usize = 20_000;

/// Expired tasks deleted at most in one transaction.
pub(super) const EXPIRE_STEP: usize = 2_000;

/// Freed pages handed back to the file system after each expiry step.
const VACUUM_STEP: usize = 2_000;

pub(super) enum Msg {
    Ops { seq: u64, ops: Vec<super::Op> },
}

pub(super) fn run(
    dir: PathBuf,
    mut conn: Connection,
    rx: Receiver<Msg>,
    progress: watch::Sender<Progress>,
) {
    let mut batch: Vec<Msg> = Vec::new();
    // Results finished before this (Unix ms) are still to be deleted.
    let mut expiring: Option<u64> = None;
    loop {
        let first = match expiring {
            // Appends first; expiry steps when none is waiting.
            Some(before) => match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    match expire_step(&mut conn, before) {
                        Ok(deleted) if deleted < EXPIRE_STEP => {
                            expiring = None;
                            progress.send_modify(|p| p.expiring = false);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            // Not fatal: nothing acknowledged depends on it;
                            // the next expiry pass tries again.
                            error!(dir = %dir.display(), error = %e, "deleting expired results failed");
                            expiring = None;
                            progress.send_modify(|p| p.expiring = false);
                        }
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
        };
        let mut ops = match &first {
            Msg::Ops { ops, .. } => ops.len(),
        };
        batch.push(first);
        while ops < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => {
                    ops += match &m {
                        Msg::Ops { ops, .. } => ops.len(),
                    };
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let last = match batch.last() {
            Some(Msg::Ops { seq, .. }) => *seq,
            None => continue,
        };
        let started = std::time::Instant::now();
        match commit(&mut conn, &batch) {
            Ok((expire, applied)) => {
                let apply_us = (applied - started).as_micros() as u64;
                let sync_us = applied.elapsed().as_micros() as u64;
                if let Some(before) = expire {
                    expiring = Some(expiring.map_or(before, |b| b.max(before)));
                    progress.send_modify(|p| p.expiring = true);
                }
                debug!(
                    ops,
                    appends = batch.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "state committed"
                );
                progress.send_modify(|p| {
                    p.committed = last;
                    p.commits += 1;
                    p.ops += ops as u64;
                    p.apply_us += apply_us;
                    p.sync_us += sync_us;
                });
            }
            Err(e) => {
                let detail = e.to_string();
                error!(dir = %dir.display(), error = %detail, "state store write failed: nothing more is acknowledged");
                progress.send_modify(|p| p.failed = Some(detail));
                return;
            }
        }
        batch.clear();
    }
    // A clean stop leaves the database whole in one file (freed pages
    // handed back) and the WAL empty.
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
        debug!(dir = %dir.display(), error = %e, "checkpoint at close");
    }
}

/// One bounded step of the result TTL: deletes up to [`EXPIRE_STEP`] of
/// the oldest tasks finished before `before` (and their attempts), then
/// hands some freed pages back. Returns how many tasks it deleted.
pub(super) fn expire_step(conn: &mut Connection, before: u64) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let oldest = "SELECT id FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?1 \
                  ORDER BY finished_at, id LIMIT ?2";
    tx.prepare_cached(&format!("DELETE FROM attempts WHERE task IN ({oldest})"))?
        .execute(params![before as i64, EXPIRE_STEP as i64])?;
    let deleted = tx
        .prepare_cached(&format!("DELETE FROM tasks WHERE id IN ({oldest})"))?
        .execute(params![before as i64, EXPIRE_STEP as i64])?;
    // The database was created with auto_vacuum=INCREMENTAL: give freed
    // pages back to the file system a bounded step at a time.
    tx.query_row(
        &format!("PRAGMA incremental_vacuum({VACUUM_STEP})"),
        [],
        |_| Ok(()),
    )
    .or_else(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(()),
        e => Err(e),
    })?;
    tx.commit()?;
    Ok(deleted)
}

/// Applies a batch in one transaction; returns the latest expiry cutoff it
/// carried (the deletion itself runs in steps, see [`expire_step`]) and the
/// instant its statements were done (the rest was the commit: the sync).
fn commit(
    conn: &mut Connection,
    batch: &[Msg],
) -> rusqlite::Result<(Option<u64>, std::time::Instant)> {
    let tx = conn.transaction()?;
    let mut max_id = 0u64;
    let mut feed_len = 0u64;
    let mut expire: Option<u64> = None;
    for Msg::Ops { ops, .. } in batch {
        for op in ops {
            match op {
                Op::Submit { id, .. } => max_id = max_id.max(*id),
                Op::Finish { feed_pos, .. } => feed_len = feed_len.max(feed_pos + 1),
                Op::Expire { before } => {
                    expire = Some(expire.map_or(*before, |b: u64| b.max(*before)));
                    continue;
                }
                _ => {}
            }
            apply(&tx, op)?;
        }
    }
    if feed_len > 0 {
        // The feed's length outlives its expired entries: positions never
        // move, even after a restart.
        tx.prepare_cached(
            "INSERT INTO meta (key, value) VALUES ('feed_len', ?1) \
             ON CONFLICT(key) DO UPDATE SET value = CAST(max(CAST(value AS INTEGER), ?1) AS TEXT)",
        )?
        .execute([feed_len as i64])?;
    }
    if max_id > 0 {
        tx.prepare_cached(
            "UPDATE meta SET value = CAST(max(CAST(value AS INTEGER), ?1) AS TEXT) WHERE key = 'next_task_id'",
        )?
        .execute([(max_id + 1) as i64])?;
    }
    let applied = std::time::Instant::now();
    tx.commit()?;
    Ok((expire, applied))
}

fn json<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn apply(tx: &Transaction<'_>, op: &Op) -> rusqlite::Result<()> {
    match op {
        Op::Submit {
            id,
            spec,
            target,
            submitted_at,
        } => {
            tx.prepare_cached(
                "INSERT INTO tasks (id, kind, command, state, target, submitted_at, timeout_s) \
                 VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6)",
            )?
            .execute(params![
                *id as i64,
                spec.kind.to_string(),
                spec.command,
                target.map(i64::from),
                *submitted_at as i64,
                spec.timeout
            ])?;
        }
        Op::Queue { id, node } => {
            tx.prepare_cached(
                "UPDATE tasks SET state = CASE WHEN ?2 IS NULL THEN 'queued' ELSE 'assigned' END, \
                 node = ?2 WHERE id = ?1",
            )?
            .execute(params![*id as i64, node.map(i64::from)])?;
        }
        Op::Start(a) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO attempts (task, attempt, worker, incarnation, slot, started_at, outcome, epoch) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7)",
            )?
            .execute(params![
                a.task as i64,
                a.attempt,
                a.worker,
                a.incarnation as i64,
                a.slot,
                a.started_at as i64,
                a.epoch as i64
            ])?;
            tx.prepare_cached(
                // The latest attempt's start, as the master shows it.
                "UPDATE tasks SET state = 'running', node = ?2, attempts = ?3, \
                 started_at = ?4 WHERE id = ?1",
            )?
            .execute(params![
                a.task as i64,
                a.worker,
                a.attempt,
                a.started_at as i64
            ])?;
        }
        Op::EndAttempt {
            task,
            attempt,
            outcome,
        } => {
            tx.prepare_cached(
                "UPDATE attempts SET outcome = ?3 WHERE task = ?1 AND attempt = ?2 AND outcome IS NULL",
            )?
            .execute(params![*task as i64, attempt, outcome])?;
        }
        Op::Finish {
            id,
            state,
            node,
            attempts,
            result,
            error,
            finished_at,
            feed_pos,
        } => {
            let result = result.as_ref().map(json).transpose()?;
            tx.prepare_cached(
                "UPDATE tasks SET state = ?2, node = ?3, attempts = ?4, result = ?5, error = ?6, \
                 finished_at = ?7, feed_pos = ?8 WHERE id = ?1",
            )?
            .execute(params![
                *id as i64,
                state.name(),
                node.map(i64::from),
                attempts,
                result,
                error,
                *finished_at as i64,
                *feed_pos as i64
            ])?;
            tx.prepare_cached(
                "UPDATE attempts SET outcome = ?2 WHERE task = ?1 AND outcome IS NULL",
            )?
            .execute(params![*id as i64, state.name()])?;
        }
        Op::Resource(r) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO resources (name, kind, value, version) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![r.name, r.kind, json(&r.value)?, r.version as i64])?;
        }
        Op::Grant(g) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO grants (resource, request, mode, token, worker, incarnation, task, attempt) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                g.resource,
                g.request as i64,
                g.mode,
                g.token as i64,
                g.worker,
                g.incarnation as i64,
                g.task as i64,
                g.attempt
            ])?;
        }
        Op::Ungrant { resource, request } => {
            tx.prepare_cached("DELETE FROM grants WHERE resource = ?1 AND request = ?2")?
                .execute(params![resource, *request as i64])?;
        }
        Op::Worker(w) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO workers (id, capacity, incarnation, restarts, pid, handle) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                w.id,
                w.capacity as i64,
                w.incarnation as i64,
                w.restarts as i64,
                w.pid,
                w.handle
            ])?;
        }
        // Recorded by `commit`, carried out by `expire_step`.
        Op::Expire { .. } => {}
    }
    Ok(())
}
