//! The live dashboard: a page the master serves at `/` (its assets under
//! `/ui/`, compiled into the binary: no CDN, no fonts, nothing fetched from
//! elsewhere), fed by server-sent events built from the scheduler's own
//! activity (see `scheduler::activity`) and reading the public API for the
//! task table and the actions.
//!
//! Protection: with a token set, the page shows a login form and nothing
//! else; `POST /ui/login` checks the token and sets a session cookie
//! (HttpOnly, SameSite=Strict: the token never appears in a URL or to the
//! page's script) that the API's token check then accepts. A request
//! authenticated by that cookie may change state only when it carries the
//! dashboard's header (`X-Flotilla-Dashboard`), which no other site can
//! add without a CORS preflight this master never grants; see `api.rs` for
//! the cross-origin check every state-changing request gets.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_proto::api::{Holder, NodeView, TaskState, TaskView};
use flotilla_proto::{Attempt, TaskId, TaskKind, WorkerId};
use serde::Serialize;

use crate::api::{constant_time_eq, ApiError, Body};
use crate::cluster::Cluster;
use crate::scheduler::activity::{Bar, Event as ActivityEvent};
use crate::scheduler::{AttemptLog, Task};
use crate::store::{AttemptRecord, TaskRecord};

/// The page and its assets, compiled in.
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "flotilla_session";
/// The header the dashboard's own state-changing calls carry.
pub const DASHBOARD_HEADER: &str = "x-flotilla-dashboard";
/// At most this many updates a second go to one client: changes that come
/// faster are coalesced into the next update.
pub const MIN_GAP: Duration = Duration::from_millis(100);
/// An update goes out at least this often (heartbeat ages, uptime, the
/// charts' next sample), even when nothing changed.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// The most bars and events one update carries (the newest).
const MAX_BARS: usize = 2_000;
const MAX_EVENTS: usize = 200;
/// Samples kept for the charts: ten minutes, one a second.
const SERIES_LEN: usize = 600;
/// A resource value longer than this is cut in updates.
const VALUE_PREVIEW: usize = 200;
/// Holders and waiters listed per resource in an update.
const MAX_HOLDERS: usize = 20;
/// A table row's summary is cut to this many bytes.
const SUMMARY: usize = 160;
/// The task detail shows code, output and results up to this size each.
const DETAIL_TEXT: usize = 64 << 10;

/// This thread's CPU time so far (user and system). The dashboard's work
/// is measured with it around stretches that do not await, so the figure
/// is what that work used, whatever else runs on the machine.
pub fn thread_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_THREAD) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::from_secs(tv.tv_sec().max(0) as u64)
                    + Duration::from_micros(tv.tv_usec().max(0) as u64)
            };
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// The session cookie's value for `token`: an HMAC of a fixed label under
/// the token, so the cookie is not the token itself, and changes with it.
pub fn session_value(token: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let tag = ring::hmac::sign(&key, b"flotilla dashboard session v1");
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The session cookie's value in a request, if it has one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// One sample of the charts.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Sample {
    /// Unix milliseconds.
    pub t: u64,
    /// Tasks finished per second since the previous sample.
    pub throughput: f64,
    /// Tasks waiting: the master queue and the workers' queues.
    pub queued: usize,
    pub running: usize,
    #[serde(skip)]
    completed: usize,
    #[serde(skip)]
    seq: u64,
}

/// The charts' samples, a bounded ring.
#[derive(Default)]
pub struct Series {
    samples: VecDeque<Sample>,
    next: u64,
}

impl Series {
    /// Adds a sample: `completed` is the completion feed's length then.
    pub fn push(&mut self, t: u64, completed: usize, queued: usize, running: usize) {
        let throughput = match self.samples.back() {
            Some(prev) if t > prev.t => {
                completed.saturating_sub(prev.completed) as f64 * 1000.0 / (t - prev.t) as f64
            }
            _ => 0.0,
        };
        if self.samples.len() == SERIES_LEN {
            self.samples.pop_front();
        }
        self.next += 1;
        self.samples.push_back(Sample {
            t,
            throughput,
            queued,
            running,
            completed,
            seq: self.next,
        });
    }

    /// The samples after `after`, and the last sample's number.
    pub fn after(&self, after: u64) -> (Vec<Sample>, u64) {
        let fresh = self.samples.iter().filter(|s| s.seq > after).copied();
        (fresh.collect(), self.next)
    }

    /// Tasks finished per second in the last sample.
    pub fn throughput_now(&self) -> f64 {
        self.samples.back().map_or(0.0, |s| s.throughput)
    }
}

/// What one client has already been sent.
#[derive(Default, Debug)]
pub struct Cursor {
    pub bars: u64,
    pub events: u64,
    pub samples: u64,
    pub sent_any: bool,
}

#[derive(Serialize, Debug)]
pub struct ClusterHeader {
    pub name: String,
    pub runtime: &'static str,
    pub master_incarnation: u64,
    pub uptime_s: f64,
    pub jaeger_url: Option<String>,
}

/// A worker card.
#[derive(Serialize, Debug, Clone)]
pub struct WorkerCard {
    #[serde(flatten)]
    pub node: NodeView,
    /// Slots (tasks at once) it registered with.
    pub slots: u32,
    /// CPU cores the runtime gives it (Docker, Kubernetes); none for processes.
    pub cpu_quota: Option<f64>,
}

/// An attempt running now.
#[derive(Serialize, Debug, Clone)]
pub struct Running {
    pub worker: WorkerId,
    pub slot: u32,
    pub task: TaskId,
    pub attempt: Attempt,
    pub started_at: u64,
}

/// A resource as an update shows it (its value cut to a preview).
#[derive(Serialize, Debug, Clone)]
pub struct ResourceRow {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    pub version: u64,
    pub holders: Vec<Holder>,
    pub waiting: Vec<Holder>,
    pub waiting_total: usize,
}

/// One server-sent update.
#[derive(Serialize, Debug)]
pub struct Update {
    /// The first update of a connection: the client starts afresh.
    pub hello: bool,
    /// Unix milliseconds, the master's clock.
    pub now: u64,
    pub cluster: ClusterHeader,
    pub counts: Vec<(TaskState, usize)>,
    pub master_queue: usize,
    pub next_task_id: TaskId,
    pub throughput: f64,
    pub series: Vec<Sample>,
    pub workers: Vec<WorkerCard>,
    pub running: Vec<Running>,
    pub bars: Vec<Bar>,
    pub events: Vec<ActivityEvent>,
    pub resources: Vec<ResourceRow>,
}

impl Update {
    /// Resources as `LockTable::previews` gives them (see
    /// `resources::locks`): values already cut, holder lists bounded.
    pub fn resource_rows(
        previews: Vec<(flotilla_proto::api::ResourceView, usize)>,
    ) -> Vec<ResourceRow> {
        previews
            .into_iter()
            .map(|(r, waiting_total)| ResourceRow {
                name: r.name,
                kind: r.kind,
                value: match r.value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                },
                version: r.version,
                holders: r.holders,
                waiting: r.waiting,
                waiting_total,
            })
            .collect()
    }
}

/// A resource's value as the dashboard's updates show it: a string as
/// itself, anything else as JSON, cut to [`VALUE_PREVIEW`] bytes. A large
/// value is not serialised past the cut.
pub fn value_preview(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => cut(s, VALUE_PREVIEW),
        other => bounded_json(other, VALUE_PREVIEW),
    }
}

/// Holders and waiters listed per resource in an update.
pub const HOLDERS_SHOWN: usize = MAX_HOLDERS;

pub const UPDATE_LIMITS: (usize, usize) = (MAX_BARS, MAX_EVENTS);

/// The task detail.
#[derive(Serialize, Debug)]
pub struct TaskDetail {
    #[serde(flatten)]
    pub view: TaskView,
    #[serde(rename = "type")]
    pub kind: TaskKind,
    pub code: String,
    pub timeout: Option<f64>,
    pub attempt_log: Vec<AttemptRow>,
    pub trace_id: Option<String>,
    /// The trace in Jaeger, when `spec.telemetry.jaegerUrl` is set and the
    /// task has a trace.
    pub jaeger: Option<String>,
}

/// One attempt in the task detail.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub attempt: Attempt,
    pub worker: WorkerId,
    pub incarnation: u64,
    pub slot: u32,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Unknown for an attempt read back from the store that was not the
    /// last (the store keeps when attempts started, and when the task
    /// finished).
    pub ended_at: Option<u64>,
    /// How it ended (`succeeded`, `failed`, `crashed`, `cancelled`,
    /// `lost`; read back from the store, with the reason the store kept,
    /// e.g. `crashed: ...`); none while it runs.
    pub outcome: Option<String>,
}

impl From<&AttemptLog> for AttemptRow {
    fn from(a: &AttemptLog) -> Self {
        AttemptRow {
            attempt: a.attempt,
            worker: a.worker,
            incarnation: a.incarnation,
            slot: a.slot,
            started_at: a.started_at,
            ended_at: a.ended_at,
            outcome: a.outcome.map(|o| {
                serde_variant::to_variant_name(&o)
                    .unwrap_or("ended")
                    .to_string()
            }),
        }
    }
}

impl AttemptRow {
    /// The attempts the store kept of a task that left memory; the last
    /// one ended when the task finished (`finished_at`).
    pub fn of_records(records: &[AttemptRecord], finished_at: Option<u64>) -> Vec<AttemptRow> {
        let last = records.iter().map(|r| r.attempt).max();
        records
            .iter()
            .map(|r| AttemptRow {
                attempt: r.attempt,
                worker: r.worker,
                incarnation: r.incarnation,
                slot: r.slot,
                started_at: r.started_at,
                ended_at: finished_at.filter(|_| Some(r.attempt) == last && r.outcome.is_some()),
                outcome: r.outcome.clone(),
            })
            .collect()
    }
}

impl TaskDetail {
    /// Bounds what the page gets: code, outputs and the response, each cut
    /// to [`DETAIL_TEXT`] bytes with a marker.
    pub fn bounded(mut self) -> Self {
        self.code = cut(&self.code, DETAIL_TEXT);
        if let Some(e) = &self.view.error {
            self.view.error = Some(cut(e, DETAIL_TEXT));
        }
        if let Some(r) = &mut self.view.result {
            r.stdout = cut(&r.stdout, DETAIL_TEXT);
            if let Some(e) = &r.stderr {
                r.stderr = Some(cut(e, DETAIL_TEXT));
            }
            let text = r.response.to_string();
            if text.len() > DETAIL_TEXT {
                r.response = serde_json::Value::String(cut(&text, DETAIL_TEXT));
            }
        }
        self
    }
}

/// `s` cut to at most `max` bytes (on a character boundary), with a marker
/// saying how much was left out.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} more bytes not shown]", &s[..end], s.len() - end)
}

/// The routes anyone may fetch: the page, its assets, the session state and
/// the login. None of them shows cluster data.
pub fn open_routes() -> Router<Arc<Cluster>> {
    Router::new()
        .route("/", get(page))
        .route("/ui/", get(page))
        .route("/ui/app.js", get(app_js))
        .route("/ui/style.css", get(style_css))
}

/// The dashboard's own data routes: behind the API's token check.
pub fn data_routes() -> Router<Arc<Cluster>> {
    Router::new()
        .route("/ui/events", get(events))
        .route("/ui/tasks", get(task_rows))
        .route("/ui/tasks/{id}", get(task_detail))
}

/// The session routes: they take the token themselves.
pub fn session_routes(token: Option<String>) -> Router<Arc<Cluster>> {
    let token = Arc::new(token);
    let t1 = token.clone();
    let t2 = token.clone();
    let limiter = Arc::new(std::sync::Mutex::new(LoginLimiter::default()));
    Router::new()
        .route(
            "/ui/session",
            get(move |headers: HeaderMap| async move { session(&t1, &headers) }),
        )
        .route(
            "/ui/login",
            post(
                move |ext: axum::http::Extensions, body: Body<LoginBody>| async move {
                    let client = ext
                        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                        .map(|c| c.0.ip());
                    login(&t2, &limiter, client, body)
                },
            ),
        )
        .route("/ui/logout", post(logout))
}

/// Wrong tokens one client may send within [`LOGIN_WINDOW`]; past them its
/// sign-ins are answered 429 until the window ends.
pub const LOGIN_ATTEMPTS: u32 = 5;
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Clients followed at most; past this, the ones whose window ended are
/// forgotten, and if none has, new clients share one window.
const LOGIN_CLIENTS: usize = 4_096;

/// Wrong sign-ins per client address (its IP; a client the server cannot
/// name counts with the others it cannot name).
#[derive(Default)]
pub struct LoginLimiter {
    clients: HashMap<Option<std::net::IpAddr>, (Instant, u32)>,
}

impl LoginLimiter {
    /// `Err(wait)`: `client` used up its wrong sign-ins; it may try again
    /// after `wait`.
    pub fn check(
        &mut self,
        client: Option<std::net::IpAddr>,
        now: Instant,
    ) -> Result<(), Duration> {
        match self.clients.get(&client) {
            Some(&(start, failures)) if failures >= LOGIN_ATTEMPTS => {
                let ends = start + LOGIN_WINDOW;
                if now < ends {
                    return Err(ends - now);
                }
                self.clients.remove(&client);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// `client` sent a wrong token.
    pub fn failed(&mut self, client: Option<std::net::IpAddr>, now: Instant) {
        if self.clients.len() >= LOGIN_CLIENTS && !self.clients.contains_key(&client) {
            self.clients
                .retain(|_, (start, _)| now < *start + LOGIN_WINDOW);
        }
        let key = if self.clients.len() >= LOGIN_CLIENTS && !self.clients.contains_key(&client) {
            None
        } else {
            client
        };
        let entry = self.clients.entry(key).or_insert((now, 0));
        if now >= entry.0 + LOGIN_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    let mut resp = asset("text/html; charset=utf-8", INDEX_HTML);
    let h = resp.headers_mut();
    // Only this master's own script, styles and connections; the page is
    // never framed. Task output is shown as text, never as markup.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

#[derive(Serialize)]
struct SessionState {
    /// Whether this master asks for a token.
    auth: bool,
    /// Whether this request is authorised (always, without a token).
    authenticated: bool,
}

fn session(token: &Option<String>, headers: &HeaderMap) -> Json<SessionState> {
    let authenticated = match token {
        None => true,
        Some(t) => session_cookie(headers)
            .is_some_and(|c| constant_time_eq(c.as_bytes(), session_value(t).as_bytes())),
    };
    Json(SessionState {
        auth: token.is_some(),
        authenticated,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    token: String,
}

fn login(
    token: &Option<String>,
    limiter: &std::sync::Mutex<LoginLimiter>,
    client: Option<std::net::IpAddr>,
    Body(body): Body<LoginBody>,
) -> Response {
    let Some(expected) = token else {
        return (StatusCode::NO_CONTENT).into_response();
    };
    let now = Instant::now();
    let mut limiter = limiter.lock().expect("login limiter lock");
    if let Err(wait) = limiter.check(client, now) {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many wrong tokens from this client ({LOGIN_ATTEMPTS} within {} s): try again in {secs} s",
                LOGIN_WINDOW.as_secs()
            ),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    if !constant_time_eq(body.token.as_bytes(), expected.as_bytes()) {
        limiter.failed(client, now);
        tracing::warn!(client = ?client, "dashboard login refused: wrong token");
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong token: it must be this master's FLOTILLA_TOKEN",
        )
        .into_response();
    }
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        session_value(expected)
    );
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}

async fn logout() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}

/// The live updates, built once per tick for every open page.
///
/// A single task (started by the first page, ended once none is left)
/// ticks after each change of the scheduling state, at most once per
/// [`MIN_GAP`] (changes in between are coalesced) and at least once per
/// [`KEEPALIVE`]. Each tick reads the cluster once, serialises one update
/// (what came after the previous tick) and hands the same text to every
/// page, so what the dashboards cost the master per second does not grow
/// with their number. A page that joins gets its first, full update
/// (`hello`) from the next tick, built in the same critical section as
/// that tick's shared update, so the two end at the same positions and the
/// page follows the shared ones from there. A page that falls behind (its
/// connection slower than the ticks) gets a full update again.
#[derive(Default)]
pub struct Hub {
    inner: std::sync::Mutex<Option<HubLink>>,
}

/// What pages reach the running tick task through.
struct HubLink {
    ticks: tokio::sync::broadcast::Sender<Arc<Tick>>,
    /// Pages waiting for their first update.
    joining: Vec<tokio::sync::oneshot::Sender<Arc<Tick>>>,
    wake: Arc<tokio::sync::Notify>,
}

/// One update as sent: the tick that built it, and its text.
#[derive(Debug)]
pub struct Tick {
    /// Ticks are numbered from 1; a shared update carries what came after
    /// the previous tick, a page's full update everything up to its tick.
    n: u64,
    json: String,
}

/// Ticks a slow page may be behind before it is given a full update.
const TICKS_BEHIND: usize = 16;

impl Hub {
    /// A page joins: the shared ticks, and the page's first update to come.
    fn join(
        &self,
        cluster: &Arc<Cluster>,
    ) -> (
        tokio::sync::broadcast::Receiver<Arc<Tick>>,
        tokio::sync::oneshot::Receiver<Arc<Tick>>,
    ) {
        let (tx, first) = tokio::sync::oneshot::channel();
        let mut inner = self.inner.lock().expect("hub lock");
        let link = inner.get_or_insert_with(|| {
            let (ticks, _) = tokio::sync::broadcast::channel(TICKS_BEHIND);
            let wake = Arc::new(tokio::sync::Notify::new());
            tokio::spawn(run_hub(
                Arc::downgrade(cluster),
                ticks.clone(),
                wake.clone(),
            ));
            HubLink {
                ticks,
                joining: Vec::new(),
                wake,
            }
        });
        link.joining.push(tx);
        link.wake.notify_one();
        (link.ticks.subscribe(), first)
    }

    /// Pages waiting for their first update, taken; `None` when no page is
    /// left at all (the tick task then ends, and the next page starts
    /// another).
    fn take_joining(
        &self,
        ticks: &tokio::sync::broadcast::Sender<Arc<Tick>>,
    ) -> Option<Vec<tokio::sync::oneshot::Sender<Arc<Tick>>>> {
        let mut inner = self.inner.lock().expect("hub lock");
        let link = inner.as_mut()?;
        let joining = std::mem::take(&mut link.joining);
        if joining.is_empty() && ticks.receiver_count() == 0 {
            *inner = None;
            return None;
        }
        Some(joining)
    }
}

async fn run_hub(
    cluster: std::sync::Weak<Cluster>,
    ticks: tokio::sync::broadcast::Sender<Arc<Tick>>,
    wake: Arc<tokio::sync::Notify>,
) {
    let Some(mut changes) = cluster.upgrade().map(|c| c.subscribe()) else {
        return;
    };
    changes.mark_unchanged();
    let mut shared = Cursor {
        sent_any: true,
        ..Cursor::default()
    };
    let mut last: Option<Instant> = None;
    let mut n = 0;
    loop {
        if let Some(last) = last {
            tokio::time::sleep_until((last + MIN_GAP).into()).await;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = wake.notified() => {}
                _ = tokio::time::sleep(KEEPALIVE) => {}
            }
        }
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let Some(joining) = cluster.dashboard_hub().take_joining(&ticks) else {
            return;
        };
        let cpu = thread_cpu();
        n += 1;
        let mut fresh: Vec<Cursor> = joining.iter().map(|_| Cursor::default()).collect();
        let mut cursors: Vec<&mut Cursor> = std::iter::once(&mut shared)
            .chain(fresh.iter_mut())
            .collect();
        let updates = cluster.dashboard_updates(&mut cursors);
        let mut updates = updates.into_iter();
        let text = |u: Update| {
            serde_json::to_string(&u).unwrap_or_else(|e| {
                format!("{{\"error\":\"the update could not be serialised: {e}\"}}")
            })
        };
        if let Some(u) = updates.next() {
            let _ = ticks.send(Arc::new(Tick { n, json: text(u) }));
        }
        for (page, u) in joining.into_iter().zip(updates) {
            let _ = page.send(Arc::new(Tick { n, json: text(u) }));
        }
        cluster.dashboard_cpu(thread_cpu().saturating_sub(cpu));
        drop(cluster);
        last = Some(Instant::now());
    }
}

/// `GET /ui/events`: the page's first, full update within [`MIN_GAP`],
/// then the shared updates (see [`Hub`]): at most one per [`MIN_GAP`], at
/// least one per [`KEEPALIVE`].
async fn events(State(cluster): State<Arc<Cluster>>) -> Response {
    struct Conn {
        cluster: Arc<Cluster>,
        ticks: tokio::sync::broadcast::Receiver<Arc<Tick>>,
        first: Option<tokio::sync::oneshot::Receiver<Arc<Tick>>>,
        /// The last tick this page was sent.
        at: u64,
    }
    let (ticks, first) = cluster.dashboard_hub().join(&cluster);
    let conn = Conn {
        cluster,
        ticks,
        first: Some(first),
        at: 0,
    };
    let stream = futures::stream::unfold(conn, |mut c| async move {
        use tokio::sync::broadcast::error::RecvError;
        let tick = loop {
            if let Some(first) = c.first.take() {
                // The first update, or a fresh one for a page that fell
                // behind: it replaces everything the page had.
                let tick = first.await.ok()?;
                c.at = tick.n;
                break tick;
            }
            match c.ticks.recv().await {
                Ok(tick) if tick.n == c.at + 1 => {
                    c.at = tick.n;
                    break tick;
                }
                // Already in the page's first update.
                Ok(tick) if tick.n <= c.at => continue,
                // A gap: ticks were lost to this page.
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    let (ticks, first) = c.cluster.dashboard_hub().join(&c.cluster);
                    c.ticks = ticks;
                    c.first = Some(first);
                }
                Err(RecvError::Closed) => return None,
            }
        };
        let cpu = thread_cpu();
        let event = Event::default()
            .event("update")
            .retry(Duration::from_secs(1))
            .data(&tick.json);
        c.cluster.dashboard_cpu(thread_cpu().saturating_sub(cpu));
        Some((Ok::<_, Infallible>(event), c))
    });
    let mut resp = Sse::new(stream).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A row of the dashboard's task table: the task without its result, and
/// a one-line summary of its error or response.
#[derive(Serialize, Debug)]
pub struct TaskRow {
    pub id: TaskId,
    pub state: TaskState,
    pub node: Option<WorkerId>,
    pub attempts: Attempt,
    pub submitted_at: u64,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub summary: String,
}

impl TaskRow {
    /// A task in memory as a row: nothing of its result is copied but the
    /// summary's first [`SUMMARY`] bytes.
    pub fn of_task(t: &Task) -> TaskRow {
        TaskRow {
            id: t.id,
            state: t.state,
            node: t.node,
            attempts: t.attempts,
            submitted_at: t.submitted_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            summary: summary(t.error.as_deref(), t.result.as_ref().map(|r| &r.response)),
        }
    }

    /// A task read back from the store as a row.
    pub fn of_record(t: &TaskRecord) -> TaskRow {
        TaskRow {
            id: t.id,
            state: t.state,
            node: t.node,
            attempts: t.attempts,
            submitted_at: t.submitted_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            summary: summary(t.error.as_deref(), t.result.as_ref().map(|r| &r.response)),
        }
    }
}

/// A row's one-line summary: the last line of the error, or the start of
/// the response, at most [`SUMMARY`] bytes (then ending in `…`). A large
/// response is not serialised beyond that.
fn summary(error: Option<&str>, response: Option<&serde_json::Value>) -> String {
    match (error, response) {
        (Some(e), _) => short(e.lines().next_back().unwrap_or_default(), SUMMARY),
        (None, Some(serde_json::Value::String(s))) => short(s, SUMMARY),
        (None, Some(other)) => bounded_json(other, SUMMARY),
        (None, None) => String::new(),
    }
}

/// `v` as JSON, at most `max` bytes (then ending in `…`), serialised no
/// further than that.
fn bounded_json(v: &serde_json::Value, max: usize) -> String {
    /// Takes bytes until it has more than it may keep, then refuses the
    /// rest (which ends the serialisation).
    struct Bounded(Vec<u8>, usize);
    impl std::io::Write for Bounded {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0.len() > self.1 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = Bounded(Vec::with_capacity(32), max);
    let _ = serde_json::to_writer(&mut w, v);
    short(&String::from_utf8_lossy(&w.0), max)
}

/// `s` cut to at most `max` bytes on a character boundary, with `…` when
/// cut.
fn short(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[derive(Serialize, Debug)]
pub struct TaskRows {
    pub tasks: Vec<TaskRow>,
    pub next: Option<TaskId>,
}

/// `GET /ui/tasks?state=&node=&limit=&after=`: the task listing (same
/// parameters and paging as `GET /tasks`) in table rows, so a page of a
/// thousand tasks stays small whatever their results.
async fn task_rows(
    State(cluster): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = crate::api::list_params(&q)?;
    let (tasks, next) = cluster
        .dashboard_rows(p.after, p.state, p.node, p.limit)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let cpu = thread_cpu();
    let body = serde_json::to_vec(&TaskRows { tasks, next })
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    cluster.dashboard_cpu(thread_cpu().saturating_sub(cpu));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `GET /ui/tasks/{id}`: a task with its code, attempts and trace.
async fn task_detail(
    State(cluster): State<Arc<Cluster>>,
    Path(id): Path<String>,
) -> Result<Json<TaskDetail>, ApiError> {
    let id = crate::api::parse_task_id(&id)?;
    match cluster
        .task_detail(id)
        .await
        .map_err(crate::api::not_durable)?
    {
        Some(detail) => Ok(Json(detail.bounded())),
        None if cluster.expired(id) => Err(ApiError::new(
            StatusCode::GONE,
            format!("task {id}'s result expired"),
        )),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("task {id} does not exist"),
        )),
    }
}

/// Whether `req` is authorised by the dashboard's session cookie for
/// `token`.
pub fn has_session(req: &Request, token: &str) -> bool {
    session_cookie(req.headers())
        .is_some_and(|c| constant_time_eq(c.as_bytes(), session_value(token).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others_and_is_not_the_token() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; flotilla_session=abc; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("abc"));
        assert_eq!(session_cookie(&HeaderMap::new()), None);
        let v = session_value("secret");
        assert_eq!(v.len(), 64);
        assert!(!v.contains("secret"));
        assert_ne!(v, session_value("secret2"));
    }

    #[test]
    fn series_gives_throughput_and_only_new_samples() {
        let mut s = Series::default();
        s.push(1_000, 0, 5, 1);
        s.push(2_000, 500, 3, 1);
        s.push(2_500, 1_000, 0, 0);
        assert_eq!(s.throughput_now(), 1000.0);
        let (all, last) = s.after(0);
        assert_eq!((all.len(), last), (3, 3));
        assert_eq!(all[1].throughput, 500.0);
        let (fresh, _) = s.after(2);
        assert_eq!(fresh.len(), 1);
        for i in 0..(SERIES_LEN + 10) {
            s.push(3_000 + i as u64 * 1000, 1_000, 0, 0);
        }
        assert_eq!(s.after(0).0.len(), SERIES_LEN);
    }

    #[test]
    fn the_login_limit_refuses_a_client_after_its_wrong_tokens_until_the_window_ends() {
        let mut l = LoginLimiter::default();
        let a = Some(std::net::IpAddr::from([10, 0, 0, 1]));
        let b = Some(std::net::IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for i in 0..LOGIN_ATTEMPTS {
            assert_eq!(l.check(a, t0), Ok(()), "attempt {i}");
            l.failed(a, t0);
        }
        let wait = l.check(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, LOGIN_WINDOW - Duration::from_secs(10));
        // Another client is not affected.
        assert_eq!(l.check(b, t0), Ok(()));
        // After the window, the client starts afresh.
        assert_eq!(l.check(a, t0 + LOGIN_WINDOW), Ok(()));
        l.failed(a, t0 + LOGIN_WINDOW);
        assert_eq!(l.check(a, t0 + LOGIN_WINDOW), Ok(()));
        // Failures spread over more than a window never add up to a refusal.
        let mut l = LoginLimiter::default();
        for i in 0..20u64 {
            let now = t0 + LOGIN_WINDOW / 4 * i as u32 * 2;
            assert_eq!(l.check(a, now), Ok(()), "spread attempt {i}");
            l.failed(a, now);
        }
    }

    #[test]
    fn the_login_limit_follows_a_bounded_number_of_clients() {
        let mut l = LoginLimiter::default();
        let t0 = Instant::now();
        for i in 0..(LOGIN_CLIENTS as u32 + 100) {
            l.failed(Some(std::net::IpAddr::from(i.to_be_bytes())), t0);
        }
        assert!(l.clients.len() <= LOGIN_CLIENTS + 1);
        // The clients past the bound share one window, so they are limited
        // together.
        assert!(l.check(None, t0).is_err());
    }

    #[test]
    fn a_row_summary_is_bounded_whatever_the_result() {
        assert_eq!(summary(None, Some(&serde_json::json!(42))), "42");
        assert_eq!(summary(None, Some(&serde_json::json!("ok"))), "ok");
        assert_eq!(
            summary(Some("Traceback\n  line 1\nValueError: no"), None),
            "ValueError: no"
        );
        assert_eq!(summary(None, None), "");
        let big = serde_json::json!({"xs": vec![123456789u64; 100_000]});
        let s = summary(None, Some(&big));
        assert!(
            s.starts_with("{\"xs\":[123456789,") && s.ends_with('…'),
            "{s}"
        );
        assert!(s.len() <= SUMMARY + '…'.len_utf8());
        let s = summary(None, Some(&serde_json::json!("é".repeat(1000))));
        assert!(s.len() <= SUMMARY + '…'.len_utf8() && s.ends_with('…'));
    }

    #[test]
    fn a_resource_value_preview_is_bounded_and_serialises_no_further() {
        assert_eq!(value_preview(&serde_json::json!(7)), "7");
        assert_eq!(value_preview(&serde_json::json!("text")), "text");
        let big = serde_json::json!(vec!["item"; 200_000]);
        let p = value_preview(&big);
        assert!(p.starts_with("[\"item\",") && p.ends_with('…'), "{p}");
        assert!(p.len() <= VALUE_PREVIEW + '…'.len_utf8());
        let long = "y".repeat(10_000);
        let p = value_preview(&serde_json::json!(long));
        assert!(
            p.starts_with("yyy") && p.contains("more bytes not shown"),
            "{p}"
        );
    }

    #[test]
    fn stored_attempts_show_when_the_last_one_ended() {
        let rec = |attempt, outcome: Option<&str>| AttemptRecord {
            task: 9,
            attempt,
            worker: attempt,
            incarnation: 1,
            slot: 0,
            started_at: 100 * attempt as u64,
            outcome: outcome.map(str::to_string),
            epoch: 1,
        };
        let rows = AttemptRow::of_records(
            &[
                rec(1, Some("crashed: worker died")),
                rec(2, Some("succeeded")),
            ],
            Some(250),
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].ended_at, None);
        assert_eq!(rows[0].outcome.as_deref(), Some("crashed: worker died"));
        assert_eq!((rows[1].ended_at, rows[1].worker), (Some(250), 2));
        assert_eq!(rows[1].outcome.as_deref(), Some("succeeded"));
    }

    #[test]
    fn cut_keeps_whole_characters_and_says_what_it_left_out() {
        assert_eq!(cut("short", 10), "short");
        let c = cut("ééé", 3);
        assert!(c.starts_with('é') && c.contains("4 more bytes"), "{c}");
    }
}
