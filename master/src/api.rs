//! The HTTP API: the seed's endpoints (exact paths and bodies), the native
//! task/node API, and the internal worker protocol. Handlers translate HTTP
//! to cluster transitions and back; every error is `{"error": "..."}` with a
//! message that names what was wrong.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_proto::api::{
    Added, FinishedPage, Health, Message, NodeView, ResourceCreated, ResourceView, Sent, Submitted,
    TaskPage, TaskState,
};
use flotilla_proto::telemetry::{adopt_parent, TRACEPARENT, TRACE_TARGET};
use flotilla_proto::{
    routes, Control, ControlPoll, ErrorBody, Heartbeat, LockAction, LockMode, LockReleased,
    LockRequest, Poll, Register, RegisterReply, TaskId, TaskSpec, WorkerId,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tracing::{info, warn};

use crate::cluster::{Cluster, Kept, Lookup, StopError};
use crate::resources::locks::LockError;
use crate::resources::ResourceType;
use crate::scheduler::{CancelError, LockCallError, Refusal, SubmitError};

/// Request bodies larger than this are refused with 413 (1 MiB by default).
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;
/// The worker routes' own limit: a task's report within the worker's
/// output and result limits always fits (see `flotilla_proto::limits`).
pub const WORKER_BODY_LIMIT: usize = flotilla_proto::limits::REPORT_BODY;
/// The longest a `?wait=` long-poll may be held.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// The longest a lock request's `timeout_s` may be (larger ones are
/// clamped): one day.
const MAX_LOCK_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The most task IDs one bulk cancel may name.
const MAX_CANCEL_IDS: usize = 10_000;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Waits until what this request changed is durable: nothing is
/// acknowledged before it is (503 naming the store's problem otherwise).
/// New tasks are refused while the master drains (SIGTERM with --ephemeral).
fn accepting(cluster: &Cluster) -> ApiResult<()> {
    if cluster.accepting() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the master is shutting down (SIGTERM): it finishes the accepted tasks and takes no new ones",
    ))
}

/// A read that failed in the store: a finished task that left memory could
/// not be read back (503 naming the problem), or a final result could not
/// be made durable (see [`not_durable`]).
fn store_read(e: crate::store::StoreError) -> ApiError {
    match e {
        crate::store::StoreError::Read { .. } => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        e => not_durable(e),
    }
}

async fn durable(cluster: &Cluster) -> ApiResult<()> {
    cluster.durable().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not acknowledged: {e}"),
        )
    })
}

/// A final result the store could not make durable is not shown: a restart
/// would take it back.
pub fn not_durable(e: crate::store::StoreError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("results are not shown until they are durable: {e}"),
    )
}

/// A JSON body whose every failure (too large, not JSON, wrong shape) is a
/// clear `{"error"}`. Content-Type is not required: the seed's clients and
/// `curl -d` users both get their body read.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        parse_json(&bytes).map(Body)
    }
}

async fn read_body<S: Send + Sync>(req: Request, state: &S) -> ApiResult<Bytes> {
    let path = req.uri().path();
    let limit = if path.starts_with("/internal/") && path != routes::LOCK {
        WORKER_BODY_LIMIT
    } else {
        DEFAULT_BODY_LIMIT
    };
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body is larger than the limit of {limit} bytes"),
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {rejection}"))
        }
    })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; a JSON object was expected",
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    // serde would take `["python", "x"]` for a struct, positionally: refuse it.
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "invalid JSON body: expected an object, got {}",
            kind_of(&value)
        )));
    }
    deserialize_named(value).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Deserialises with the path of the offending field in the error
/// (`max_capacity: invalid type: string "big", expected i64`).
fn deserialize_named<T: DeserializeOwned>(value: Value) -> Result<T, BodyError> {
    serde_path_to_error::deserialize(value).map_err(BodyError::Shape)
}

/// Why a JSON body (or one task of it) is refused.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// The body does not fit its type; the message names the field's path.
    #[error("{}", at_path(.0))]
    Shape(serde_path_to_error::Error<serde_json::Error>),
    #[error(transparent)]
    Task(#[from] flotilla_proto::TaskSpecError),
}

fn at_path(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    if path == "." {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A node ID: plain decimal digits only (no sign, no spaces), as listed by
/// `/nodes`.
fn parse_node(raw: &str) -> ApiResult<WorkerId> {
    let shown: String = raw.chars().take(40).collect();
    let plain = !raw.is_empty() && raw.len() <= 10 && raw.bytes().all(|b| b.is_ascii_digit());
    plain.then(|| raw.parse().ok()).flatten().ok_or_else(|| {
        ApiError::not_found(format!(
            "node '{shown}' does not exist (node IDs are plain decimal numbers 0..n-1)"
        ))
    })
}

/// A task ID: plain decimal digits only.
pub(crate) fn parse_task_id(raw: &str) -> ApiResult<TaskId> {
    let shown: String = raw.chars().take(40).collect();
    let plain = !raw.is_empty() && raw.len() <= 20 && raw.bytes().all(|b| b.is_ascii_digit());
    plain.then(|| raw.parse().ok()).flatten().ok_or_else(|| {
        ApiError::not_found(format!(
            "task '{shown}' does not exist (task IDs are plain decimal numbers)"
        ))
    })
}

pub fn router(cluster: Arc<Cluster>, token: Option<String>) -> Router {
    let public = Router::new()
        .route("/send", post(send))
        .route("/send/{node}", post(send_to))
        .route("/resource", post(create_resource))
        .route("/resources", get(list_resources))
        .route("/resources/{name}", get(get_resource))
        .route("/add", post(add))
        .route("/stop/{node}", post(stop))
        .route(
            "/tasks",
            post(submit_tasks).get(list_tasks).delete(cancel_tasks),
        )
        .route("/tasks/finished", get(finished_tasks))
        .route("/tasks/{id}", get(get_task).delete(cancel_task))
        .route("/nodes", get(nodes))
        .route("/metrics", get(metrics))
        .merge(crate::dashboard::data_routes())
        .layer(middleware::from_fn_with_state(
            Arc::new(token.clone()),
            require_token,
        ));
    // Browsers reach these: a state-changing request from another site's
    // page is refused before anything else looks at it.
    let browser_facing = Router::new()
        .merge(public)
        .merge(crate::dashboard::open_routes())
        .merge(crate::dashboard::session_routes(token))
        .layer(middleware::from_fn(same_origin_only));
    serve(
        Router::new()
            .route("/health", get(health))
            .merge(browser_facing)
            .merge(worker_routes(&cluster)),
        cluster,
    )
}

/// `GET /metrics` alone, without the token: the listener of `--metrics-port`,
/// for a Prometheus scrape that sends no credentials. Counters and gauges
/// only (no task data, no resource values); every other path is 404 there.
pub fn metrics_router(cluster: Arc<Cluster>) -> Router {
    serve(Router::new().route("/metrics", get(metrics)), cluster)
}

/// The worker-facing routes alone, for the listener a runtime's network
/// reaches (the Docker network's gateway): no public API there.
pub fn internal_router(cluster: Arc<Cluster>) -> Router {
    serve(worker_routes(&cluster), cluster)
}

/// What workers call: register, heartbeat and poll (with the cluster's
/// worker secret), and lock calls (authenticated by the attempt's lease in
/// the body).
fn worker_routes(cluster: &Arc<Cluster>) -> Router<Arc<Cluster>> {
    let authenticated = Router::new()
        .route(routes::REGISTER, post(register))
        .route(routes::HEARTBEAT, post(heartbeat))
        .route(routes::POLL, post(poll))
        .route(routes::CONTROL, post(control))
        .layer(axum::extract::DefaultBodyLimit::max(WORKER_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            cluster.clone(),
            require_worker_credential,
        ));
    Router::new()
        .route(routes::LOCK, post(lock))
        .merge(authenticated)
}

/// Every response says which master answered: after a restart, clients
/// see the number change.
pub const MASTER_INCARNATION_HEADER: &str = "flotilla-master-incarnation";

/// The fallback, body limit and incarnation header every listener has.
fn serve(routes: Router<Arc<Cluster>>, cluster: Arc<Cluster>) -> Router {
    let incarnation = header::HeaderValue::from(cluster.master_incarnation);
    let session = header::HeaderValue::from_str(&cluster.cfg.session)
        .unwrap_or_else(|_| header::HeaderValue::from_static("?"));
    routes
        .fallback(|req: Request| async move {
            ApiError::not_found(format!(
                "no such endpoint: {} {}",
                req.method(),
                req.uri().path()
            ))
        })
        .layer(axum::extract::DefaultBodyLimit::max(DEFAULT_BODY_LIMIT))
        .layer(middleware::map_response(move |mut resp: Response| {
            let incarnation = incarnation.clone();
            let session = session.clone();
            async move {
                resp.headers_mut()
                    .insert(MASTER_INCARNATION_HEADER, incarnation);
                resp.headers_mut()
                    .insert(crate::runtime::owner::SESSION_HEADER, session);
                resp
            }
        }))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(limit_uri))
        .with_state(cluster)
}

/// The longest request target (path and query) accepted: 8 KiB.
pub const MAX_URI: usize = 8 << 10;

/// 414 with a JSON body for a request target over [`MAX_URI`].
async fn limit_uri(req: Request, next: Next) -> Response {
    let len = req.uri().to_string().len();
    if len > MAX_URI {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the request's URI is {len} bytes, over the limit of {MAX_URI}"),
        )
        .into_response();
    }
    next.run(req).await
}

/// Error answers the framework makes itself (405 Method Not Allowed, ...)
/// come without a body: give them the JSON `{"error"}` every other error has.
async fn json_errors(req: Request, next: Next) -> Response {
    use axum::body::HttpBody;
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || resp.body().size_hint().exact() != Some(0)
    {
        return resp;
    }
    let path: String = path.chars().take(200).collect();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = resp
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(|v| format!("; allowed: {v}"))
                .unwrap_or_default();
            format!("method {method} is not allowed on {path}{allowed}")
        }
        other => format!(
            "{} {}: {}",
            method,
            path,
            other.canonical_reason().unwrap_or("request refused")
        ),
    };
    let (parts, _) = resp.into_parts();
    let mut out = ApiError::new(status, message).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Whether a request changes state (anything but GET, HEAD, OPTIONS).
fn changes_state(req: &Request) -> bool {
    !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    )
}

/// Refuses a state-changing request a browser sent from another site's
/// page (cross-site request forgery): its `Origin` names another host than
/// the one it was sent to, or its `Sec-Fetch-Site` says `cross-site`.
/// Clients that are not browsers (curl, the CLI, the Python client) send
/// neither header and are not affected. This holds with or without a token:
/// a page on the web must not reach a master on 127.0.0.1 either.
async fn same_origin_only(req: Request, next: Next) -> Response {
    if changes_state(&req) {
        let headers = req.headers();
        let cross_site = header(headers, "sec-fetch-site") == Some("cross-site");
        let foreign_origin = header(headers, "origin").is_some_and(|origin| {
            let host = header(headers, "host").unwrap_or_default();
            let origin_host = origin
                .split_once("://")
                .map_or(origin, |(_, rest)| rest)
                .trim_end_matches('/');
            !origin_host.eq_ignore_ascii_case(host)
        });
        if cross_site || foreign_origin {
            warn!(
                origin = header(headers, "origin").unwrap_or_default(),
                path = req.uri().path(),
                "refused a cross-site request"
            );
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "cross-site request refused: this master accepts state-changing requests from its own pages and from clients that are not browsers",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn require_token(
    State(token): State<Arc<Option<String>>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(expected) = token.as_deref() {
        match bearer(&req) {
            Some(got) if constant_time_eq(got.as_bytes(), expected.as_bytes()) => {}
            // The dashboard's session cookie (set by `POST /ui/login`). It is
            // SameSite=Strict, and a state-changing call made with it must
            // also carry the dashboard's own header, which another site's
            // page cannot add without a CORS preflight this master never
            // answers.
            None if crate::dashboard::has_session(&req, expected) => {
                if changes_state(&req)
                    && req
                        .headers()
                        .get(crate::dashboard::DASHBOARD_HEADER)
                        .is_none()
                {
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        "a request authorised by the dashboard's session cookie may change state only from the dashboard (X-Flotilla-Dashboard header)",
                    )
                    .into_response();
                }
            }
            Some(_) => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "bearer token does not match FLOTILLA_TOKEN",
                )
                .into_response()
            }
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this master requires a token: send `Authorization: Bearer $FLOTILLA_TOKEN`",
                )
                .into_response()
            }
        }
    }
    next.run(req).await
}

/// The worker incarnation a request speaks for: taken from its credential,
/// never from its body.
#[derive(Clone, Copy, Debug)]
struct WorkerIdentity {
    worker: WorkerId,
    incarnation: flotilla_proto::Incarnation,
}

impl WorkerIdentity {
    /// The body must name the worker the credential was issued to.
    fn check(&self, worker: WorkerId, incarnation: flotilla_proto::Incarnation) -> ApiResult<()> {
        if (worker, incarnation) == (self.worker, self.incarnation) {
            return Ok(());
        }
        warn!(
            credential_worker = self.worker,
            credential_incarnation = self.incarnation,
            body_worker = worker,
            body_incarnation = incarnation,
            "a worker call named another worker than its credential; refused"
        );
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this credential is node {} incarnation {}'s; it cannot speak for node {worker} incarnation {incarnation}",
                self.worker, self.incarnation
            ),
        ))
    }
}

async fn require_worker_credential(
    State(cluster): State<Arc<Cluster>>,
    mut req: Request,
    next: Next,
) -> Response {
    match bearer(&req).and_then(|c| cluster.verify_credential(c)) {
        Some((worker, incarnation)) => {
            req.extensions_mut().insert(WorkerIdentity {
                worker,
                incarnation,
            });
            next.run(req).await
        }
        None => {
            warn!(path = %req.uri().path(), "worker call without a valid worker credential refused");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "worker routes need the credential the master gave this worker incarnation",
            )
            .into_response()
        }
    }
}

/// Constant-time equality (token and session checks).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ----- the seed's endpoints ------------------------------------------------

async fn send(
    State(cluster): State<Arc<Cluster>>,
    Body(spec): Body<TaskSpec>,
) -> ApiResult<Json<Sent>> {
    accepting(&cluster)?;
    spec.check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let task_id = cluster.submit(vec![spec])[0];
    durable(&cluster).await?;
    Ok(Json(Sent {
        message: "Instruction received".into(),
        task_id,
    }))
}

/// `/send/{node}`: waits while that node's queue is full (the seed's
/// contract).
async fn send_to(
    State(cluster): State<Arc<Cluster>>,
    Path(node): Path<String>,
    Body(spec): Body<TaskSpec>,
) -> ApiResult<Json<Sent>> {
    let node = parse_node(&node)?;
    accepting(&cluster)?;
    spec.check()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    match cluster.submit_to(node, spec).await {
        Ok(task_id) => {
            durable(&cluster).await?;
            Ok(Json(Sent {
                message: format!("Instruction received for node {node}"),
                task_id,
            }))
        }
        Err(e @ SubmitError::UnknownWorker(_)) => Err(ApiError::not_found(e.to_string())),
        Err(e @ SubmitError::Full(_)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceBody {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    values: crate::manifest::ResourceValues,
}

/// `/resource`: the seed's `{"name", "type", "values": {"initial_value"}}`.
async fn create_resource(
    State(cluster): State<Arc<Cluster>>,
    Body(body): Body<ResourceBody>,
) -> ApiResult<Json<ResourceCreated>> {
    let kind = ResourceType::parse(&body.kind).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let spec = body.values.into_spec(body.name, kind);
    // A path here would be a path on the master's machine, chosen by a
    // client: the API takes contents only (the manifest may name files).
    if let Some(path) = &spec.path {
        return Err(ApiError::bad_request(format!(
            "resource `{}`: values.path (`{path}`) is not accepted through the API: send the content as values.initial_value (File paths are for the manifest, under its spec.fileRoot)",
            spec.name
        )));
    }
    let value = spec.initial_value.clone();
    cluster
        .create_resource(&spec.name, kind, value)
        .map_err(|e| ApiError::bad_request(format!("resource `{}`: {e}", spec.name)))?;
    durable(&cluster).await?;
    Ok(Json(ResourceCreated {
        message: format!("Resource {} created successfully", spec.name),
        name: spec.name,
    }))
}

async fn list_resources(State(cluster): State<Arc<Cluster>>) -> Json<Vec<ResourceView>> {
    Json(cluster.resources())
}

async fn get_resource(
    State(cluster): State<Arc<Cluster>>,
    Path(name): Path<String>,
) -> ApiResult<Json<ResourceView>> {
    cluster
        .resource(&name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("shared resource `{name}` does not exist")))
}

fn lock_error(e: LockCallError) -> ApiError {
    let status = match &e {
        LockCallError::StaleLease | LockCallError::Dropped { .. } => StatusCode::CONFLICT,
        LockCallError::TimedOut { .. } => StatusCode::REQUEST_TIMEOUT,
        LockCallError::Lock(l) => match l {
            LockError::Unknown(_) => StatusCode::NOT_FOUND,
            LockError::Duplicate(_) | LockError::WrongType { .. } => StatusCode::BAD_REQUEST,
            LockError::AlreadyHeld { .. }
            | LockError::NotHeld { .. }
            | LockError::Fenced { .. } => StatusCode::CONFLICT,
        },
    };
    ApiError::new(status, e.to_string())
}

/// `POST /internal/lock`: acquire (held open until granted, no polling) or
/// release. Authenticated by the task attempt's lease.
async fn lock(
    State(cluster): State<Arc<Cluster>>,
    headers: HeaderMap,
    Body(req): Body<LockRequest>,
) -> ApiResult<Json<Value>> {
    // Part of the task's trace when the call carries one (a call of an
    // untraced task carries none: no span).
    let _span = match header(&headers, TRACEPARENT) {
        Some(parent) => {
            let span = tracing::info_span!(target: TRACE_TARGET, "lock call", resource = %req.name,
                lock.mode = %req.mode, lock.action = ?req.action);
            adopt_parent(&span, Some(parent));
            span
        }
        None => tracing::Span::none(),
    };
    match req.action {
        LockAction::Acquire => {
            let wait = match req.timeout_s {
                None => None,
                Some(t) if t.is_finite() && t >= 0.0 => {
                    Some(Duration::from_secs_f64(t.min(MAX_LOCK_WAIT.as_secs_f64())))
                }
                Some(t) => {
                    return Err(ApiError::bad_request(format!(
                        "timeout_s must be a number of seconds >= 0, got {t}"
                    )))
                }
            };
            let grant = cluster
                .acquire_lock(&req.lease, &req.name, req.mode, wait, req.resend)
                .await
                .map_err(lock_error)?;
            // A grant is answered once it is durable: a master started after
            // a crash knows the task holds it (its worker is adopted).
            durable(&cluster).await?;
            Ok(Json(serde_json::to_value(grant).expect("serialisable")))
        }
        LockAction::Release => {
            let publish = match (req.mode, req.value) {
                (LockMode::Write, Some(value)) => {
                    let token = req.token.ok_or_else(|| {
                        ApiError::bad_request(
                            "a write release with a value must carry the grant's fencing token",
                        )
                    })?;
                    Some((value, token))
                }
                (LockMode::Read, Some(_)) => {
                    return Err(ApiError::bad_request("a read lock cannot publish a value"))
                }
                (_, None) => None,
            };
            let (version, committed) = cluster
                .release_lock(&req.lease, &req.name, req.mode, publish, req.resend)
                .map_err(lock_error)?;
            // A published value is acknowledged once it is durable.
            durable(&cluster).await?;
            Ok(Json(
                serde_json::to_value(LockReleased {
                    name: req.name,
                    version,
                    committed,
                })
                .expect("serialisable"),
            ))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    max_capacity: Option<i64>,
}

async fn add(State(cluster): State<Arc<Cluster>>, req: Request) -> ApiResult<Json<Added>> {
    let bytes = read_body(req, &()).await?;
    let body: AddBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        AddBody { max_capacity: None }
    } else {
        parse_json(&bytes)?
    };
    let capacity = match body.max_capacity {
        None => 10,
        Some(c) if (1..=100_000).contains(&c) => c as usize,
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "max_capacity must be between 1 and 100000, got {c}"
            )))
        }
    };
    let id = cluster.add_worker(capacity).await.map_err(|e| match e {
        crate::cluster::AddError::Limit(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        crate::cluster::AddError::Runtime(e) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    })?;
    Ok(Json(Added {
        message: format!("Node {id} added successfully"),
        node_id: id,
    }))
}

async fn stop(
    State(cluster): State<Arc<Cluster>>,
    Path(node): Path<String>,
) -> ApiResult<Json<Message>> {
    let node = parse_node(&node)?;
    cluster.stop_worker(node).await.map_err(|e| match e {
        StopError::UnknownNode(_) => ApiError::not_found(e.to_string()),
        StopError::Runtime(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    })?;
    Ok(Json(Message {
        message: format!("Node {node} stopped successfully"),
    }))
}

// ----- native API ----------------------------------------------------------

/// `POST /tasks`: one task, or `{"tasks": [...]}` (all accepted or none).
async fn submit_tasks(
    State(cluster): State<Arc<Cluster>>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Submitted>> {
    let specs: Vec<TaskSpec> = match body {
        Value::Object(ref map) if map.contains_key("tasks") => {
            if map.len() > 1 {
                let extra: Vec<_> = map.keys().filter(|k| *k != "tasks").collect();
                return Err(ApiError::bad_request(format!(
                    "unknown field(s) beside `tasks`: {extra:?}"
                )));
            }
            let Value::Array(items) = &map["tasks"] else {
                return Err(ApiError::bad_request(
                    "`tasks` must be a list of {\"type\", \"command\"} objects",
                ));
            };
            if items.is_empty() {
                return Err(ApiError::bad_request("`tasks` is empty"));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    deserialize_named::<TaskSpec>(t.clone())
                        .and_then(|spec| Ok(spec.check().map(|()| spec)?))
                        .map_err(|e| ApiError::bad_request(format!("tasks[{i}]: {e}")))
                })
                .collect::<ApiResult<_>>()?
        }
        other => vec![deserialize_named::<TaskSpec>(other)
            .and_then(|spec| Ok(spec.check().map(|()| spec)?))
            .map_err(|e| ApiError::bad_request(format!("invalid task: {e}")))?],
    };
    accepting(&cluster)?;
    let task_ids = cluster.submit(specs);
    durable(&cluster).await?;
    Ok(Json(Submitted { task_ids }))
}

fn cancel_error(e: CancelError) -> ApiError {
    match e {
        CancelError::Unknown(_) => ApiError::not_found(e.to_string()),
        CancelError::Finished(..) | CancelError::LeftMemory(_) => {
            ApiError::new(StatusCode::CONFLICT, e.to_string())
        }
    }
}

/// `DELETE /tasks/{id}`: cancel one task (see `Scheduler::cancel`).
async fn cancel_task(
    State(cluster): State<Arc<Cluster>>,
    Path(id): Path<String>,
) -> ApiResult<Json<flotilla_proto::api::Cancelled>> {
    let task_id = parse_task_id(&id)?;
    let was = cluster.cancel(task_id).map_err(cancel_error)?;
    // Acknowledged once durable: a restart must not run a cancelled task again.
    durable(&cluster).await?;
    Ok(Json(flotilla_proto::api::Cancelled {
        id: task_id,
        state: TaskState::Cancelled,
        was,
    }))
}

/// `DELETE /tasks?state=queued|assigned|running` or `?ids=1,2,3`: cancel
/// several at once. Answers which were cancelled and why the others were not.
async fn cancel_tasks(
    State(cluster): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<flotilla_proto::api::CancelReport>> {
    if let Some(extra) = q.keys().find(|k| *k != "state" && *k != "ids") {
        return Err(ApiError::bad_request(format!(
            "unknown parameter `{extra}`: cancel by `state=` (queued, assigned or running) or `ids=` (comma-separated)"
        )));
    }
    let ids: Option<Vec<TaskId>> = match q.get("ids") {
        None => None,
        Some(raw) => {
            let parts: Vec<&str> = raw.split(',').filter(|p| !p.is_empty()).collect();
            if parts.len() > MAX_CANCEL_IDS {
                return Err(ApiError::bad_request(format!(
                    "ids names {} tasks; at most {MAX_CANCEL_IDS} at once",
                    parts.len()
                )));
            }
            Some(
                parts
                    .into_iter()
                    .map(|p| parse_task_id(p).map_err(|e| ApiError::bad_request(e.message)))
                    .collect::<ApiResult<_>>()?,
            )
        }
    };
    let state = match q.get("state") {
        None => None,
        Some(raw) => {
            let state: TaskState =
                raw.parse()
                    .map_err(|e: flotilla_proto::api::UnknownTaskState| {
                        ApiError::bad_request(e.to_string())
                    })?;
            if state.is_final() {
                return Err(ApiError::bad_request(format!(
                    "tasks that are {state} have finished; cancel queued, assigned or running ones"
                )));
            }
            Some(state)
        }
    };
    if state.is_none() && ids.is_none() {
        return Err(ApiError::bad_request(
            "say which tasks to cancel: `state=` (queued, assigned or running) or `ids=` (comma-separated)",
        ));
    }
    let (cancelled, refused) = cluster.cancel_many(state, ids.as_deref());
    durable(&cluster).await?;
    let refused: Vec<flotilla_proto::api::NotCancelled> = refused
        .into_iter()
        .map(|(id, e)| flotilla_proto::api::NotCancelled {
            id,
            error: e.to_string(),
        })
        .collect();
    Ok(Json(flotilla_proto::api::CancelReport {
        cancelled,
        not_cancelled: refused,
    }))
}

fn wait_param(q: &HashMap<String, String>) -> ApiResult<Duration> {
    match q.get("wait") {
        None => Ok(Duration::ZERO),
        Some(raw) => match raw.parse::<f64>() {
            // Clamped to MAX_WAIT before it becomes a Duration (1e20 would overflow).
            Ok(s) if s.is_finite() && s >= 0.0 => {
                Ok(Duration::from_secs_f64(s.min(MAX_WAIT.as_secs_f64())))
            }
            _ => Err(ApiError::bad_request(format!(
                "wait must be a number of seconds >= 0 (at most {} are waited), got {:?}",
                MAX_WAIT.as_secs(),
                raw.chars().take(40).collect::<String>()
            ))),
        },
    }
}

async fn get_task(
    State(cluster): State<Arc<Cluster>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let task_id = parse_task_id(&id)?;
    let wait = wait_param(&q)?;
    match cluster.wait_task(task_id, wait).await.map_err(store_read)? {
        Lookup::Found(view) => Ok(Json(serde_json::to_value(view).expect("serialisable"))),
        Lookup::Gone if cluster.store().is_some() => Err(ApiError::new(
            StatusCode::GONE,
            format!(
                "task {task_id}'s result expired: results are kept for {}s after the task finishes (spec.resultTtlSeconds)",
                cluster.cfg.result_ttl.as_secs_f64()
            ),
        )),
        Lookup::Gone => {
            let r = &cluster.cfg.retention;
            Err(ApiError::new(
                StatusCode::GONE,
                format!(
                    "task {task_id} finished and its result is no longer kept: this master keeps no state (--ephemeral), so a finished task stays in memory only while it is among the last {} to finish and for at most {}s (spec.memoryRetention; results expire after {}s, spec.resultTtlSeconds). Run with a state directory to read results back until they expire",
                    r.finished_tasks,
                    r.age.as_secs_f64(),
                    cluster.cfg.result_ttl.as_secs_f64()
                ),
            ))
        }
        Lookup::Unknown => Err(ApiError::not_found(format!(
            "task {task_id} does not exist"
        ))),
    }
}

/// The most tasks one page of `GET /tasks` holds.
pub const MAX_LIST_LIMIT: usize = 1000;

/// `GET /tasks?state=&node=&limit=&after=`: tasks in ID order, filtered,
/// a page at a time; `next` (absent on the last page) is the `after` of the
/// next page. A page may be short (the scan per request is bounded): keep
/// asking while `next` is there.
async fn list_tasks(
    State(cluster): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<TaskPage>> {
    let p = list_params(&q)?;
    let (tasks, next) = cluster
        .list_tasks(p.after, p.state, p.node, p.limit)
        .await
        .map_err(store_read)?;
    Ok(Json(TaskPage { tasks, next }))
}

/// The task listing's query: `state`, `node`, `limit`, `after`.
pub(crate) struct ListParams {
    pub after: TaskId,
    pub state: Option<TaskState>,
    pub node: Option<WorkerId>,
    pub limit: usize,
}

pub(crate) fn list_params(q: &HashMap<String, String>) -> ApiResult<ListParams> {
    let known = ["state", "node", "limit", "after"];
    if let Some(k) = q.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown query parameter `{k}`: expected state, node, limit or after"
        )));
    }
    let state = q
        .get("state")
        .map(|s| s.parse::<TaskState>())
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let node = q
        .get("node")
        .map(|raw| {
            raw.parse::<WorkerId>().map_err(|_| {
                ApiError::bad_request(format!("node must be a node ID (a number), got {raw:?}"))
            })
        })
        .transpose()?;
    let limit = match q.get("limit") {
        None => 100,
        Some(raw) => match raw.parse::<usize>() {
            Ok(l) if (1..=MAX_LIST_LIMIT).contains(&l) => l,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit must be a number between 1 and {MAX_LIST_LIMIT}, got {raw:?}"
                )))
            }
        },
    };
    let after = match q.get("after") {
        None => 0,
        Some(raw) => raw.parse::<TaskId>().map_err(|_| {
            ApiError::bad_request(format!("after must be a task ID (a number), got {raw:?}"))
        })?,
    };
    Ok(ListParams {
        after,
        state,
        node,
        limit,
    })
}

/// `GET /tasks/finished?after=N&wait=S`: the completion feed. Returns tasks
/// that finished after position `after` (waiting up to `wait` seconds for
/// the first) and `next`, the position to ask from next time.
async fn finished_tasks(
    State(cluster): State<Arc<Cluster>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<FinishedPage>> {
    let after = match q.get("after") {
        None => 0,
        Some(raw) => raw.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("after must be a non-negative integer, got {raw:?}"))
        })?,
    };
    let wait = wait_param(&q)?;
    let (tasks, next) = cluster
        .finished_after(after, 1000, wait)
        .await
        .map_err(store_read)?;
    Ok(Json(FinishedPage { next, tasks }))
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
async fn metrics(State(cluster): State<Arc<Cluster>>) -> Response {
    let text = cluster.metrics_text();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn nodes(State(cluster): State<Arc<Cluster>>) -> Json<Vec<NodeView>> {
    Json(cluster.nodes())
}

async fn health(State(cluster): State<Arc<Cluster>>) -> Json<Health> {
    Json(cluster.health())
}

// ----- internal worker protocol -------------------------------------------

fn refusal(r: Refusal) -> ApiError {
    let status = match r {
        Refusal::UnknownWorker(_) => StatusCode::NOT_FOUND,
        Refusal::Stale { .. } => StatusCode::CONFLICT,
        Refusal::NotRegistered(_) => StatusCode::PRECONDITION_REQUIRED,
        Refusal::BadSlot { .. } | Refusal::BadSlots { .. } => StatusCode::BAD_REQUEST,
    };
    if matches!(r, Refusal::Stale { .. }) {
        info!("{r}: refusing a message from a replaced incarnation");
    }
    ApiError::new(status, r.to_string())
}

async fn register(
    State(cluster): State<Arc<Cluster>>,
    axum::Extension(identity): axum::Extension<WorkerIdentity>,
    Body(r): Body<Register>,
) -> ApiResult<Json<RegisterReply>> {
    identity.check(r.worker_id, r.incarnation)?;
    // Where it runs, as the runtime knows it (outside a container the PID
    // the worker reports means something; inside, it is always 7 or so).
    let locator = cluster.locate(r.worker_id, r.incarnation).await;
    let pid = (cluster.runtime_name() == "process").then_some(r.pid);
    let capacity = cluster
        .register(r.worker_id, r.incarnation, r.slots, pid, locator)
        .map_err(refusal)?;
    info!(
        worker = r.worker_id,
        incarnation = r.incarnation,
        pid = r.pid,
        "Node {} registered",
        r.worker_id
    );
    Ok(Json(RegisterReply {
        heartbeat_interval_ms: cluster.cfg.heartbeat_interval.as_millis() as u64,
        capacity,
        master_grace_ms: Some(cluster.cfg.master_grace.as_millis() as u64),
        keep_reports: cluster.store().is_some(),
    }))
}

async fn heartbeat(
    State(cluster): State<Arc<Cluster>>,
    axum::Extension(identity): axum::Extension<WorkerIdentity>,
    Body(h): Body<Heartbeat>,
) -> ApiResult<StatusCode> {
    identity.check(h.worker_id, h.incarnation)?;
    cluster
        .heartbeat(h.worker_id, h.incarnation)
        .map_err(refusal)?;
    tracing::debug!(worker = h.worker_id, "heartbeat");
    Ok(StatusCode::NO_CONTENT)
}

async fn poll(
    State(cluster): State<Arc<Cluster>>,
    axum::Extension(identity): axum::Extension<WorkerIdentity>,
    headers: HeaderMap,
    Body(p): Body<Poll>,
) -> ApiResult<Response> {
    identity.check(p.worker_id, p.incarnation)?;
    // The result's delivery joins the task's trace (the worker's span is its
    // parent); a report without one is of an untraced task: no span.
    if let (Some(report), Some(parent)) = (&p.report, header(&headers, TRACEPARENT)) {
        let span = tracing::info_span!(target: TRACE_TARGET, "result received", task.id = report.task_id,
            task.attempt = report.attempt, worker.id = p.worker_id);
        adopt_parent(&span, Some(parent));
    }
    let assignment = cluster
        .poll(
            p.worker_id,
            p.incarnation,
            p.slot,
            p.report,
            Kept {
                keeps: p.keeps,
                kept: p.kept,
            },
        )
        .await
        .map_err(refusal)?;
    let Some(mut assignment) = assignment else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let traceparent = assignment.traceparent.take();
    let mut response = Json(assignment).into_response();
    if let Some(value) = traceparent.and_then(|tp| tp.parse().ok()) {
        response.headers_mut().insert(TRACEPARENT, value);
    }
    Ok(response)
}

/// `POST /internal/control`: held open until the worker has attempts to stop
/// (cancelled tasks) or the poll time passes (`204`).
async fn control(
    State(cluster): State<Arc<Cluster>>,
    axum::Extension(identity): axum::Extension<WorkerIdentity>,
    Body(c): Body<ControlPoll>,
) -> ApiResult<Response> {
    identity.check(c.worker_id, c.incarnation)?;
    let stop = cluster
        .control(c.worker_id, c.incarnation)
        .await
        .map_err(refusal)?;
    if stop.is_empty() {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Ok(Json(Control { stop }).into_response())
    }
}
