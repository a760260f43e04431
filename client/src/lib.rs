//! A typed HTTP client for a running Flotilla master, over the wire types of
//! `flotilla-proto`. The `flotilla` command line (`run`, `bench` and the
//! verbs for a running cluster) and the end-to-end tests all talk to the
//! master through it.
//!
//! Every failure is an [`Error`] that names the server and, where there is
//! one, the fix: an unreachable master, a missing or wrong token, or the
//! master's own `{"error": "..."}` message with the HTTP status.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_proto::api::{
    Added, FinishedPage, Message, NodeView, ResourceView, Sent, Submitted, TaskPage, TaskState,
    TaskView,
};
use flotilla_proto::{ErrorBody, TaskId, TaskSpec, WorkerId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

pub use flotilla_proto::api;
pub use reqwest::Method;

/// Where the command line and the clients look for the master by default.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:5000";
/// Environment variable naming the master's URL.
pub const SERVER_ENV: &str = "FLOTILLA_SERVER";
/// Environment variable holding the API token (sent as a bearer token).
pub const TOKEN_ENV: &str = "FLOTILLA_TOKEN";
/// How long a plain request may take (a long-poll gets its wait on top).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest a single long-poll asks the master to hold (its own cap is 300 s).
const MAX_POLL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{detail} at {url}: is `flotilla up` running there? (point to it with --server or {SERVER_ENV})")]
    Unreachable { url: String, detail: String },
    #[error("{status} from {url}: {message}; set {TOKEN_ENV} to the master's token")]
    Unauthorized {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {path} on {url}: {status}: {message}")]
    Api {
        url: String,
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{method} {path} on {url}: unexpected answer ({detail}); is this a Flotilla master?")]
    Decode {
        url: String,
        method: String,
        path: String,
        detail: String,
    },
    #[error("invalid server URL `{url}`: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl Error {
    /// The HTTP status the master answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Unauthorized { status, .. } | Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Filters and paging of `GET /tasks`.
#[derive(Clone, Debug, Default)]
pub struct TaskQuery {
    pub state: Option<TaskState>,
    pub node: Option<WorkerId>,
    /// At most this many (the master caps it at 1,000).
    pub limit: Option<usize>,
    /// Only tasks with an ID above this one (the `next` of the previous page).
    pub after: Option<TaskId>,
}

#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for the master at `url` (`http://host:port`).
    pub fn new(url: &str, token: Option<String>) -> Result<Client> {
        let base = url.trim().trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&base).map_err(|e| Error::BadUrl {
            url: url.to_string(),
            detail: e.to_string(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::BadUrl {
                url: url.to_string(),
                detail: "expected http://host:port".into(),
            });
        }
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Error::BadUrl {
                url: url.to_string(),
                detail: e.to_string(),
            })?;
        Ok(Client {
            http,
            base,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// `url`, else `FLOTILLA_SERVER`, else `http://127.0.0.1:5000`; the token
    /// from `FLOTILLA_TOKEN`.
    pub fn from_env(url: Option<&str>) -> Result<Client> {
        let env_url = std::env::var(SERVER_ENV).ok().filter(|u| !u.is_empty());
        let url = url
            .map(str::to_string)
            .or(env_url)
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        Client::new(&url, std::env::var(TOKEN_ENV).ok())
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn builder(&self, method: Method, path: &str, timeout: Duration) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    fn transport(&self, e: reqwest::Error, timeout: Duration) -> Error {
        if e.is_timeout() {
            return Error::Timeout(timeout);
        }
        let detail = if e.is_connect() {
            // The innermost cause says what happened ("Connection refused").
            let mut source: &dyn std::error::Error = &e;
            while let Some(s) = source.source() {
                source = s;
            }
            let cause = source.to_string();
            if cause.to_lowercase().contains("refused") {
                "connection refused".to_string()
            } else {
                format!("cannot connect ({cause})")
            }
        } else {
            format!("request failed ({e})")
        };
        Error::Unreachable {
            url: self.base.clone(),
            detail,
        }
    }

    /// Sends one request; returns the status and the body (JSON when it is
    /// JSON, else a string). Transport failures are errors; HTTP errors are not.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        self.send_raw(method, path, body, REQUEST_TIMEOUT).await
    }

    async fn send_raw<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(u16, Value)> {
        let mut req = self.builder(method, path, timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.transport(e, timeout))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| self.transport(e, timeout))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T> {
        let (status, value) = self.send_raw(method.clone(), path, body, timeout).await?;
        if !(200..300).contains(&status) {
            let message = match serde_json::from_value::<ErrorBody>(value.clone()) {
                Ok(e) => e.error,
                Err(_) => match &value {
                    Value::String(s) if s.trim().is_empty() => {
                        reqwest::StatusCode::from_u16(status)
                            .ok()
                            .and_then(|s| s.canonical_reason())
                            .unwrap_or("no message")
                            .to_string()
                    }
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            };
            if status == 401 {
                return Err(Error::Unauthorized {
                    url: self.base.clone(),
                    status,
                    message,
                });
            }
            return Err(Error::Api {
                url: self.base.clone(),
                method: method.to_string(),
                path: path.to_string(),
                status,
                message,
            });
        }
        serde_json::from_value(value).map_err(|e| Error::Decode {
            url: self.base.clone(),
            method: method.to_string(),
            path: path.to_string(),
            detail: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), T>(Method::GET, path, None, REQUEST_TIMEOUT)
            .await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.call(Method::POST, path, Some(body), REQUEST_TIMEOUT)
            .await
    }

    /// `GET /health` (no token needed).
    pub async fn health(&self) -> Result<Value> {
        self.get("/health").await
    }

    /// `POST /send`: one task into the master queue.
    pub async fn send(&self, spec: &TaskSpec) -> Result<TaskId> {
        Ok(self.post::<_, Sent>("/send", spec).await?.task_id)
    }

    /// `POST /send/{node}`: straight into that worker's queue (the master
    /// holds the request while that queue is full).
    pub async fn send_to(&self, node: WorkerId, spec: &TaskSpec) -> Result<TaskId> {
        Ok(self
            .post::<_, Sent>(&format!("/send/{node}"), spec)
            .await?
            .task_id)
    }

    /// `POST /tasks`: a batch, all accepted or none; IDs in order.
    pub async fn submit(&self, specs: &[TaskSpec]) -> Result<Vec<TaskId>> {
        let body = serde_json::json!({ "tasks": specs });
        Ok(self.post::<_, Submitted>("/tasks", &body).await?.task_ids)
    }

    /// `DELETE /tasks/{id}`: cancels a queued, assigned or running task.
    pub async fn cancel(&self, id: TaskId) -> Result<flotilla_proto::api::Cancelled> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/tasks/{id}"),
            None,
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// `GET /tasks/{id}`: the task as it is now.
    pub async fn task(&self, id: TaskId) -> Result<TaskView> {
        self.get(&format!("/tasks/{id}")).await
    }

    /// `GET /tasks/{id}?wait=S`: the task once final, or as it is after `wait`.
    pub async fn wait_task(&self, id: TaskId, wait: Duration) -> Result<TaskView> {
        let path = format!("/tasks/{id}?wait={}", wait.as_secs_f64());
        self.call::<(), _>(Method::GET, &path, None, wait + REQUEST_TIMEOUT)
            .await
    }

    /// Waits until task `id` is final (long-polls; `None`: forever).
    pub async fn wait_final(&self, id: TaskId, timeout: Option<Duration>) -> Result<TaskView> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let left = match deadline {
                Some(d) => d.saturating_duration_since(tokio::time::Instant::now()),
                None => MAX_POLL,
            };
            let view = self.wait_task(id, left.min(MAX_POLL)).await?;
            if view.state.is_final() || left.is_zero() {
                return Ok(view);
            }
        }
    }

    /// `GET /tasks/finished?after=N&wait=S`: the completion feed.
    pub async fn finished(&self, after: u64, wait: Duration) -> Result<FinishedPage> {
        let path = format!("/tasks/finished?after={after}&wait={}", wait.as_secs_f64());
        self.call::<(), _>(Method::GET, &path, None, wait + REQUEST_TIMEOUT)
            .await
    }

    /// The completion feed's current end: tasks finishing from now on come after it.
    pub async fn feed_position(&self) -> Result<u64> {
        Ok(self.finished(u64::MAX, Duration::ZERO).await?.next)
    }

    /// `GET /tasks?state=&node=&limit=&after=`: one page of tasks in ID order.
    pub async fn tasks(&self, q: &TaskQuery) -> Result<TaskPage> {
        let mut params = Vec::new();
        if let Some(s) = q.state {
            params.push(format!("state={s}"));
        }
        if let Some(n) = q.node {
            params.push(format!("node={n}"));
        }
        if let Some(l) = q.limit {
            params.push(format!("limit={l}"));
        }
        if let Some(a) = q.after {
            params.push(format!("after={a}"));
        }
        let path = if params.is_empty() {
            "/tasks".to_string()
        } else {
            format!("/tasks?{}", params.join("&"))
        };
        self.get(&path).await
    }

    /// `GET /nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        self.get("/nodes").await
    }

    /// `GET /resources`.
    pub async fn resources(&self) -> Result<Vec<ResourceView>> {
        self.get("/resources").await
    }

    /// `GET /resources/{name}`.
    pub async fn resource(&self, name: &str) -> Result<ResourceView> {
        self.get(&format!("/resources/{}", path_segment(name)))
            .await
    }

    /// `POST /resource`: the seed's resource creation.
    pub async fn create_resource(&self, name: &str, kind: &str, initial: Value) -> Result<String> {
        let body =
            serde_json::json!({"name": name, "type": kind, "values": {"initial_value": initial}});
        Ok(self.post::<_, Message>("/resource", &body).await?.message)
    }

    /// `POST /add`: a new worker (`None`: the master's default capacity).
    pub async fn add_worker(&self, capacity: Option<usize>) -> Result<WorkerId> {
        let body = match capacity {
            Some(c) => serde_json::json!({ "max_capacity": c }),
            None => serde_json::json!({}),
        };
        Ok(self.post::<_, Added>("/add", &body).await?.node_id)
    }

    /// `POST /stop/{node}`: kills that worker; the master restarts it.
    pub async fn stop_worker(&self, node: WorkerId) -> Result<String> {
        Ok(self
            .post::<_, Message>(&format!("/stop/{node}"), &serde_json::json!({}))
            .await?
            .message)
    }

    /// Waits until the cluster has workers and every one is active.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Vec<NodeView>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let nodes = self.nodes().await?;
            if !nodes.is_empty() && nodes.iter().all(|n| n.state == api::WorkerState::Active) {
                return Ok(nodes);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Follows the completion feed from position `after` for the tasks `ids`.
    pub fn follow(&self, ids: impl IntoIterator<Item = TaskId>, after: u64) -> Follow {
        Follow {
            client: self.clone(),
            pending: ids.into_iter().collect(),
            after,
        }
    }
}

/// Percent-encodes a path segment (resource names are free text).
fn path_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The completion feed, read for a set of tasks: one long-poll returns every
/// one of them that finished meanwhile (not one request per task).
pub struct Follow {
    client: Client,
    pending: HashSet<TaskId>,
    after: u64,
}

impl Follow {
    /// Tasks still unfinished.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// The next followed tasks to finish, waiting up to `wait` for them;
    /// empty when none finished in that time (or none are left).
    pub async fn next(&mut self, wait: Duration) -> Result<Vec<TaskView>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.pending.is_empty() {
                return Ok(Vec::new());
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let page = self.client.finished(self.after, left.min(MAX_POLL)).await?;
            self.after = page.next;
            let mine: Vec<TaskView> = page
                .tasks
                .into_iter()
                .filter(|t| self.pending.remove(&t.id))
                .collect();
            if !mine.is_empty() || left.is_zero() {
                return Ok(mine);
            }
        }
    }

    /// Every followed task, in the order they finished.
    pub async fn all(mut self, timeout: Option<Duration>) -> Result<Vec<TaskView>> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut out = Vec::new();
        while !self.pending.is_empty() {
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout(timeout.unwrap_or_default()));
                    }
                    left.min(MAX_POLL)
                }
                None => MAX_POLL,
            };
            out.extend(self.next(wait).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_trimmed() {
        assert_eq!(
            Client::new("http://127.0.0.1:5000/", None).unwrap().url(),
            "http://127.0.0.1:5000"
        );
        let err = Client::new("127.0.0.1:5000", None).unwrap_err().to_string();
        assert!(err.contains("127.0.0.1:5000"), "{err}");
        let err = Client::new("ftp://x", None).unwrap_err().to_string();
        assert!(err.contains("http://host:port"), "{err}");
    }

    #[test]
    fn resource_names_are_escaped() {
        assert_eq!(path_segment("total"), "total");
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
    }

    #[tokio::test]
    async fn a_closed_port_names_the_server_and_the_fix() {
        // Bind then drop: nothing listens on this port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let err = Client::new(&url, None)
            .unwrap()
            .nodes()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("connection refused"), "{err}");
        assert!(err.contains(&url) && err.contains("flotilla up"), "{err}");
    }
}
