//! `serve`: the long-lived process. A cron schedule of full applies, and an HTTP API for the
//! host application (one-referrer recompute, explanations, run history, health, metrics).
//!
//! Runs go through the same engine and lock as the CLI: ticks never overlap inside one process
//! (a busy tick is skipped, never queued), and across processes the store's lock decides.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::{self, EngineError, RunControl, RunReport, RunRequest};
use crate::explain;
use crate::history;
use crate::instant;
use crate::program::slots::plan::HostChange;
use crate::program::slots::rules::Outcome;
use crate::snapshot::Scope;
use crate::store::{ChangeFilter, LastRuns, RunKind, RunRow, Store, Trigger};

/// Request bodies are never needed: anything larger than this is refused.
const MAX_BODY_BYTES: usize = 1024;
/// Longer request targets (path and query) are refused with 414.
const MAX_URI_BYTES: usize = 2048;
/// `GET /v1/runs?limit=` at most.
const MAX_RUNS_LIMIT: i64 = 1000;
/// `GET /v1/runs/{id}` and `GET /v1/changes`: ledger rows per ledger by default, and at most.
const DEFAULT_LEDGER_PAGE: i64 = 100;
const MAX_LEDGER_PAGE: i64 = 1000;
/// `GET /v1/referrers/{id}`: referrals per page by default, and at most.
const DEFAULT_REFERRALS_PAGE: usize = 100;
const MAX_REFERRALS_PAGE: usize = 1000;
/// Descriptors kept free for the runs (database files and connections, polars' threads) when
/// the connection cap is sized against the process's limit.
const DESCRIPTOR_RESERVE: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A configuration problem: exit 2.
    #[error("{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("{0}")]
    Runtime(String),
}

/// Shared by the scheduler and the HTTP handlers.
struct App {
    store: Store,
    config: Config,
    /// BLAKE3 of the API token, compared in constant time; `None`: no token, loopback only.
    token_hash: Option<[u8; 32]>,
    /// Held by a scheduled run: a tick that finds it taken is skipped.
    tick_busy: Mutex<()>,
    /// Cancelled at shutdown: no new run starts.
    stopping: CancellationToken,
    /// Cancelled when in-flight runs must stop (shutdown past the grace period).
    abort: CancellationToken,
    runs: TaskTracker,
    /// Scheduled runs that failed, since start (a skipped tick is not a failure).
    tick_failures: AtomicU64,
    /// How the last scheduled run ended: `/healthz` fails while the last one failed.
    last_tick: std::sync::Mutex<Option<TickOutcome>>,
    /// HTTP connections open now.
    http_open: AtomicU64,
    /// When this process started serving: `/healthz`'s staleness counts from here until the
    /// first successful full run.
    started: instant::Instant,
    /// The audit page of the latest full dry run (`GET /v1/audit`) and when it was made: one
    /// dry run at a time, and requests that arrive while it runs are answered with its page.
    audit: Mutex<Option<(std::time::Instant, Arc<String>)>>,
}

#[derive(Debug, Clone)]
struct TickOutcome {
    at: instant::Instant,
    error: Option<String>,
}

impl App {
    fn control(&self, trigger: Trigger) -> RunControl {
        RunControl {
            abort: self.abort.clone(),
            trigger: Some(trigger),
            ..RunControl::default()
        }
    }
}

/// What `serve` needs from the configuration and environment, checked before anything else
/// (a usage error must not wait for the database).
pub struct Settings {
    cron: String,
    bind: SocketAddr,
    token: Option<String>,
}

pub fn settings(config: &Config) -> Result<Settings, ServeError> {
    let cron = crate::config::cron_with_seconds(&config.schedule.cron).map_err(|e| {
        ServeError::Config {
            key: "schedule.cron",
            message: e.to_string(),
        }
    })?;
    let bind: SocketAddr = config.http.bind.parse().map_err(|_| ServeError::Config {
        key: "http.bind",
        message: format!("not an address:port: {:?}", config.http.bind),
    })?;
    // Trimmed as the presented token is: a token file's trailing newline is not part of it.
    let token = std::env::var(&config.http.token_env)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    if token.is_none() && !bind.ip().is_loopback() {
        return Err(ServeError::Config {
            key: "http.bind",
            message: format!(
                "refusing to listen on {bind} without an API token: set {} or bind a loopback address",
                config.http.token_env
            ),
        });
    }
    Ok(Settings { cron, bind, token })
}

/// Runs the server until SIGINT or SIGTERM; then stops taking ticks and requests, lets an
/// in-flight run finish within `schedule.shutdown_grace_secs`, else aborts it.
pub async fn serve(config: Config, store: Store, settings: Settings) -> Result<(), ServeError> {
    let Settings { cron, bind, token } = settings;
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| ServeError::Runtime(format!("cannot listen on {bind}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Runtime(e.to_string()))?;

    let app = Arc::new(App {
        token_hash: token.map(|t| *blake3::hash(t.as_bytes()).as_bytes()),
        store,
        tick_busy: Mutex::new(()),
        stopping: CancellationToken::new(),
        abort: CancellationToken::new(),
        runs: TaskTracker::new(),
        tick_failures: AtomicU64::new(0),
        last_tick: std::sync::Mutex::new(None),
        http_open: AtomicU64::new(0),
        started: instant::from_datetime(chrono::Utc::now()),
        audit: Mutex::new(None),
        config,
    });

    let mut scheduler = JobScheduler::new()
        .await
        .map_err(|e| ServeError::Runtime(format!("starting the scheduler: {e}")))?;
    let on_tick = app.clone();
    let job = Job::new_async(cron.as_str(), move |_, _| {
        let app = on_tick.clone();
        Box::pin(async move {
            let task = app.clone();
            app.runs.spawn(async move { tick(&task).await });
        })
    })
    .map_err(|e| ServeError::Runtime(format!("scheduling {cron:?}: {e}")))?;
    scheduler
        .add(job)
        .await
        .map_err(|e| ServeError::Runtime(format!("scheduling: {e}")))?;
    scheduler
        .start()
        .await
        .map_err(|e| ServeError::Runtime(format!("starting the scheduler: {e}")))?;
    if app.config.schedule.run_on_start {
        let task = app.clone();
        app.runs.spawn(async move { tick(&task).await });
    }
    tracing::info!(%local, cron = %cron, auth = app.token_hash.is_some(), "serving");
    sd_notify("READY=1\nSTATUS=serving");
    let watchdog = tokio::spawn(watchdog());

    let stop = CancellationToken::new();
    tokio::spawn(shutdown_signal(stop.clone()));
    let limits = HttpLimits {
        max_connections: connection_cap(app.config.http.max_connections as u64),
        header_timeout: Duration::from_secs(app.config.http.header_timeout_secs as u64),
    };
    let server = tokio::spawn(accept_loop(
        listener,
        router(app.clone()),
        app.clone(),
        stop.clone(),
        limits,
    ));

    stop.cancelled().await;
    sd_notify("STOPPING=1\nSTATUS=shutting down");
    watchdog.abort();
    app.stopping.cancel();
    tracing::info!("shutting down: no more ticks or requests");
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "stopping the scheduler");
    }
    app.runs.close();
    let grace = Duration::from_secs(app.config.schedule.shutdown_grace_secs as u64);
    if tokio::time::timeout(grace, app.runs.wait()).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "a run outlived the grace period: aborting it"
        );
        app.abort.cancel();
        // Rolling back and marking the run failed takes a moment; do not wait forever.
        let _ = tokio::time::timeout(Duration::from_secs(30), app.runs.wait()).await;
    }
    // An HTTP recompute that started after the wait above returned (the server was still
    // answering) must not outlive the process's end: cut it short too.
    app.abort.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    tracing::info!("stopped");
    Ok(())
}

/// systemd's readiness protocol (`Type=notify`): one datagram to `$NOTIFY_SOCKET`, a path or an
/// abstract socket (`@name`). Nothing without the variable; a failure is logged, never fatal.
fn sd_notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = target.as_bytes();
        match bytes.strip_prefix(b"@") {
            #[cfg(target_os = "linux")]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            _ => sock.send_to(state.as_bytes(), &target),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = ?target, "sd_notify failed");
    }
}

/// With `WatchdogSec=` set, systemd passes `WATCHDOG_USEC` (and `WATCHDOG_PID`): ping it at half
/// that period from the async runtime, so that a wedged runtime gets the service restarted.
async fn watchdog() {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|u| *u > 0)
    else {
        return;
    };
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return;
    }
    let mut every = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        every.tick().await;
        sd_notify("WATCHDOG=1");
    }
}

async fn shutdown_signal(stop: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    stop.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    stop.cancel();
}

/// One scheduled full apply, unless one is still going in this process. A panic is caught
/// here too, so that it fails this tick only.
async fn tick(app: &App) {
    if app.stopping.is_cancelled() {
        return;
    }
    let Ok(_busy) = app.tick_busy.try_lock() else {
        tracing::warn!("tick skipped: the previous run is still going");
        return;
    };
    let req = RunRequest {
        scope: Scope::Full,
        as_of: instant::from_datetime(chrono::Utc::now()),
        dry_run: false,
    };
    let control = app.control(Trigger::Schedule);
    let run = engine::run_controlled(&app.store, &app.config, req, &control);
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run))
        .await
        .unwrap_or_else(|p| Err(EngineError::Panicked(engine::panic_message(&*p))));
    let error = match outcome {
        // A run cut short by the shutdown after its commit landed did its work.
        Ok(_) | Err(EngineError::CommittedBeforeAbort { .. }) => None,
        Err(EngineError::Locked) => {
            // Another process, or this one's HTTP recompute or shard run.
            tracing::info!("tick skipped: another run holds the run lock");
            return;
        }
        // The engine logged it and recorded it in the run row.
        Err(e @ EngineError::RunFailed { .. }) => Some(e.to_string()),
        // No run row exists (lock file unusable, database unreachable, …): only this says so.
        Err(e) => {
            tracing::error!(error = %e, "tick failed before its run started");
            Some(e.to_string())
        }
    };
    if error.is_some() {
        app.tick_failures.fetch_add(1, Ordering::Relaxed);
    }
    if let Ok(mut last) = app.last_tick.lock() {
        *last = Some(TickOutcome {
            at: instant::from_datetime(chrono::Utc::now()),
            error,
        });
    }
}

/// Counts an open connection for as long as it lives, however its task ends.
struct OpenConnection<'a>(&'a AtomicU64);

impl<'a> OpenConnection<'a> {
    fn count(open: &'a AtomicU64) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(open)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct HttpLimits {
    max_connections: u64,
    header_timeout: Duration,
}

/// Raises the soft descriptor limit to the hard one, and returns the connection cap that leaves
/// [`DESCRIPTOR_RESERVE`] descriptors for the runs (at least one connection).
fn connection_cap(wanted: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read the one struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return wanted;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let room = lim.rlim_cur.saturating_sub(DESCRIPTOR_RESERVE).max(1);
    if room < wanted {
        tracing::warn!(
            descriptor_limit = lim.rlim_cur,
            wanted,
            cap = room,
            "http.max_connections lowered to keep descriptors for the runs"
        );
    }
    wanted.min(room)
}

/// Accepts connections while fewer than the cap are open (the rest wait in the listen
/// backlog), one request per connection, with a deadline for its headers: idle or slow clients
/// cannot hold descriptors the runs need. An accept error (out of descriptors) is logged at
/// most once a second and retried after a pause, never in a hot loop.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    app: Arc<App>,
    stop: CancellationToken,
    limits: HttpLimits,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections as usize));
    let conns = TaskTracker::new();
    let mut last_error_log: Option<std::time::Instant> = None;
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::error!(error = %e, "accepting a connection failed; pausing");
                        last_error_log = Some(std::time::Instant::now());
                    }
                    drop(permit);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let (app, stop, header_timeout) = (app.clone(), stop.clone(), limits.header_timeout);
        conns.spawn(async move {
            let _permit = permit;
            let _open = OpenConnection::count(&app.http_open);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(false);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), conns.wait()).await;
}

fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/referrers/{id}/reconcile", post(reconcile_referrer))
        .route("/v1/referrers/{id}", get(explain_referrer))
        .route("/v1/users/{id}", get(explain_user))
        .route("/v1/audit", get(audit_page))
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(show_run))
        .route("/v1/changes", get(list_changes))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(limit_request_size))
        .with_state(app)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Refuses long URLs and declared bodies over the limit before any handler runs.
async fn limit_request_size(req: Request, next: Next) -> Response {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return error(
            StatusCode::URI_TOO_LONG,
            format!("request target over {MAX_URI_BYTES} bytes"),
        );
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY_BYTES} bytes"),
        );
    }
    next.run(req).await
}

/// `Authorization: Bearer <token>`, compared in constant time (as fixed-length hashes, so
/// that not even the length leaks).
async fn require_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(want) = &app.token_hash {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| *blake3::hash(t.trim().as_bytes()).as_bytes());
        let ok = given.is_some_and(|g| bool::from(g.ct_eq(want)));
        if !ok {
            let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("static header"),
            );
            return r;
        }
    }
    next.run(req).await
}

fn bad_id(raw: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!("referrer id must be an integer, got {raw:?}"),
    )
}

fn engine_error(e: EngineError) -> Response {
    match e {
        EngineError::UnknownReferrer(id) => {
            error(StatusCode::NOT_FOUND, format!("no user with id {id}"))
        }
        EngineError::Locked => error(
            StatusCode::CONFLICT,
            "another run holds the lock; try again when it has finished",
        ),
        other => {
            tracing::error!(error = %other, "request failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
        }
    }
}

#[derive(Debug, Deserialize)]
struct ReconcileParams {
    #[serde(default)]
    dry_run: bool,
}

async fn reconcile_referrer(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
    params: Result<Query<ReconcileParams>, QueryRejection>,
) -> Response {
    let Ok(id) = raw.parse::<i64>() else {
        return bad_id(&raw);
    };
    let Ok(Query(params)) = params else {
        return error(StatusCode::BAD_REQUEST, "dry_run must be true or false");
    };
    if app.stopping.is_cancelled() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        );
    }
    let req = RunRequest {
        scope: Scope::Referrer(id),
        as_of: instant::from_datetime(chrono::Utc::now()),
        dry_run: params.dry_run,
    };
    // Detached from the request and tracked with the scheduled runs: a client that hangs up
    // does not cut a run short, and shutdown gives it the same grace period.
    let task = app.clone();
    let run = app.runs.spawn(async move {
        engine::run_controlled(&task.store, &task.config, req, &task.control(Trigger::Http)).await
    });
    match run.await {
        // The referrer's values cannot be stored: 422, with what would have been written.
        Ok(Ok(report)) => match report
            .plan
            .entries
            .iter()
            .find(|e| e.referrer_user_id() == id)
            .and_then(|e| e.write_error())
        {
            Some(why) => {
                let mut body = referrer_json(&report, id);
                body["error"] = why.into();
                (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
            }
            None => Json(referrer_json(&report, id)).into_response(),
        },
        Ok(Err(e)) => engine_error(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the run stopped: {e}"),
        ),
    }
}

/// SPEC section 5's fields for one referrer, plus what the run changed and its id.
pub fn referrer_json(report: &RunReport, id: i64) -> Value {
    let entry = report
        .plan
        .entries
        .iter()
        .find(|e| e.referrer_user_id() == id);
    let mut v = match entry {
        Some(e) => serde_json::to_value(crate::report::ReportRow::of(e)).expect("plain data"),
        None => json!({ "referrer_user_id": id }),
    };
    let applied = report.applied.as_ref();
    let host = entry.and_then(|e| e.host_change()).map(|c| {
        let (old, new) = match c {
            HostChange::Update { old, new } => (Some(old), new),
            HostChange::Insert { new } => (None, new),
        };
        let conflict = applied.is_some_and(|a| a.conflicts.contains(&id));
        let writable = entry.is_some_and(|e| e.write_error().is_none());
        json!({
            "field": crate::program::slots::plan::HOST_FIELD,
            "old": old,
            "new": new,
            "applied": applied.is_some() && !conflict && writable,
            "conflict": conflict,
        })
    });
    v["is_referrer"] = report
        .computation
        .results
        .iter()
        .any(|r| r.referrer_user_id == id)
        .into();
    v["run_id"] = report.run_id.into();
    v["dry_run"] = report.request.dry_run.into();
    v["as_of"] = instant::to_rfc3339(report.request.as_of).into();
    v["digest"] = report.plan.digest.clone().into();
    v["change"] = json!({
        "reward_row": entry.is_some_and(|e| e.reward_changes() && e.write_error().is_none()),
        "host": host,
    });
    // The grant programs' referrals this run decided and wrote for the user: those in which it
    // is the referrer or the referred user (what a payment webhook wants to know).
    if !report.grants.is_empty() {
        v["grants"] = report
            .grants
            .iter()
            .map(|p| {
                json!({
                    "program": p.name,
                    "referrals": p.referrals.iter()
                        .filter(|d| d.referrer_id == id || d.user_id == id)
                        .map(|d| json!({
                            "referrer_user_id": d.referrer_id,
                            "referred_user_id": d.user_id,
                            "outcome": d.outcome.as_str(),
                            "cause": d.cause.map(|c| c.as_str()),
                            "changes": d.changes.iter().map(|c| {
                                crate::program::grants::report::GrantView::new(
                                    c.party,
                                    c.credited_user_id,
                                    c.amount,
                                )
                            }).collect::<Vec<_>>(),
                        }))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
    }
    v
}

#[derive(Debug, Deserialize)]
struct ExplainParams {
    limit: Option<usize>,
    cursor: Option<i64>,
}

async fn explain_referrer(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
    params: Result<Query<ExplainParams>, QueryRejection>,
) -> Response {
    let Ok(id) = raw.parse::<i64>() else {
        return bad_id(&raw);
    };
    let Ok(Query(params)) = params else {
        return error(
            StatusCode::BAD_REQUEST,
            "limit must be a positive integer and cursor a referred user id",
        );
    };
    let limit = params.limit.unwrap_or(DEFAULT_REFERRALS_PAGE);
    if !(1..=MAX_REFERRALS_PAGE).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_REFERRALS_PAGE}"),
        );
    }
    let as_of = instant::from_datetime(chrono::Utc::now());
    let page = Some((limit, params.cursor));
    match explain::explain_referrer(&app.store, &app.config, id, as_of, page).await {
        Ok(e) => Json(e).into_response(),
        Err(e) => engine_error(e),
    }
}

/// `GET /v1/audit`: the audit page (`reconcile --dry-run --report PATH.html`) of a full dry run
/// at now. Requests that arrive while one is being made share it.
async fn audit_page(State(app): State<Arc<App>>) -> Response {
    let asked = std::time::Instant::now();
    let mut latest = app.audit.lock().await;
    if let Some((made, page)) = latest.as_ref()
        && *made >= asked
    {
        return html_response(page.clone());
    }
    let req = RunRequest {
        scope: Scope::Full,
        as_of: instant::from_datetime(chrono::Utc::now()),
        dry_run: true,
    };
    let run = match engine::run(&app.store, &app.config, req).await {
        Ok(r) => r,
        Err(e) => return engine_error(e),
    };
    let config = app.config.clone();
    let page = tokio::task::spawn_blocking(move || {
        let saved = crate::report::saved_plan(&run.plan, &run.grants, run.request.as_of);
        crate::audit_page::render(&run, &config, &crate::diff::diff(&saved))
    })
    .await;
    match page {
        Ok(page) => {
            let page = Arc::new(page);
            *latest = Some((std::time::Instant::now(), page.clone()));
            html_response(page)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the page: {e}"),
        ),
    }
}

fn html_response(page: Arc<String>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page.as_str().to_owned(),
    )
        .into_response()
}

/// `GET /v1/users/{id}`: a referred user from its own side (`explain --user`).
async fn explain_user(State(app): State<Arc<App>>, Path(raw): Path<String>) -> Response {
    let Ok(id) = raw.parse::<i64>() else {
        return bad_id(&raw);
    };
    let as_of = instant::from_datetime(chrono::Utc::now());
    match explain::explain_user(&app.store, &app.config, id, as_of).await {
        Ok(e) => Json(e).into_response(),
        Err(e) => engine_error(e),
    }
}

#[derive(Debug, Deserialize)]
struct RunsParams {
    limit: Option<i64>,
}

async fn list_runs(
    State(app): State<Arc<App>>,
    params: Result<Query<RunsParams>, QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return error(StatusCode::BAD_REQUEST, "limit must be an integer");
    };
    let limit = params.limit.unwrap_or(20);
    if !(1..=MAX_RUNS_LIMIT).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_RUNS_LIMIT}"),
        );
    }
    match history::runs(&app.store, limit).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /v1/runs/{id}?limit=`: the run, its ledger counts and its newest ledger rows.
async fn show_run(
    State(app): State<Arc<App>>,
    Path(raw): Path<String>,
    params: Result<Query<RunsParams>, QueryRejection>,
) -> Response {
    let Ok(id) = raw.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("run id must be an integer, got {raw:?}"),
        );
    };
    let Ok(Query(params)) = params else {
        return error(StatusCode::BAD_REQUEST, "limit must be an integer");
    };
    let Some(limit) = ledger_limit(params.limit) else {
        return ledger_limit_error();
    };
    match history::run_detail(&app.store, id, limit).await {
        Ok(Some(detail)) => Json(detail).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no run with id {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct ChangesParams {
    run: Option<i64>,
    referrer: Option<i64>,
    limit: Option<i64>,
}

/// `GET /v1/changes?run=&referrer=&limit=`: both ledgers, newest first.
async fn list_changes(
    State(app): State<Arc<App>>,
    params: Result<Query<ChangesParams>, QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return error(
            StatusCode::BAD_REQUEST,
            "run, referrer and limit must be integers",
        );
    };
    let Some(limit) = ledger_limit(params.limit) else {
        return ledger_limit_error();
    };
    let filter = ChangeFilter {
        run: params.run,
        referrer: params.referrer,
        limit,
    };
    match history::changes(&app.store, filter).await {
        Ok(changes) => Json(changes).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Ledger rows per ledger in one answer: `limit`, by default 100, at most 1000.
fn ledger_limit(given: Option<i64>) -> Option<i64> {
    let limit = given.unwrap_or(DEFAULT_LEDGER_PAGE);
    (1..=MAX_LEDGER_PAGE).contains(&limit).then_some(limit)
}

fn ledger_limit_error() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!("limit must be between 1 and {MAX_LEDGER_PAGE}"),
    )
}

/// 200 while the database answers and the full runs are healthy; 503 when the database cannot
/// be reached, the last scheduled run of this process failed (also before its run row could
/// exist), the last finished full run failed, or the last successful full run is older than
/// `schedule.stale_after_secs` (with no successful full run yet, this process's own start
/// counts, so that a new deployment has one period to make its first). One-referrer and shard
/// runs are not full runs: they neither fail nor refresh it. A database that is only busy (SQLite
/// locked by a writer, every pooled PostgreSQL connection in use) is `busy`, still 200: busy is
/// not down.
async fn healthz(State(app): State<Arc<App>>) -> Response {
    let unavailable = |error: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "error": error })),
        )
            .into_response()
    };
    let ping = tokio::time::timeout(Duration::from_secs(3), app.store.ping()).await;
    let status = match ping {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) if e.is_busy() => "busy",
        Ok(Err(e)) => return unavailable(e.to_string()),
        // SQLite's ping opens the file itself: a slow answer is a busy machine, not a lost
        // database. PostgreSQL's waits for a pooled connection: with every one in use, the
        // server is busy; with some idle and still no answer, it is unavailable.
        Err(_) if app.store.backend() == "sqlite" || app.store.pool_saturated() => "busy",
        Err(_) => return unavailable("the database did not answer within 3 s".into()),
    };
    let last_tick = app.last_tick.lock().ok().and_then(|t| t.clone());
    let failures = app.tick_failures.load(Ordering::Relaxed);
    let tick = last_tick.as_ref().map(|t| {
        json!({
            "at": instant::to_rfc3339(t.at),
            "succeeded": t.error.is_none(),
            "error": t.error,
        })
    });
    let last = match status {
        "ok" => app.store.last_runs().await.ok(),
        _ => None,
    };
    let now = instant::from_datetime(chrono::Utc::now());
    let full = last.as_ref().and_then(|l| l.of(RunKind::Full));
    let success = last.as_ref().and_then(|l| l.full_success.as_ref());
    let success_at = success.map(|r| r.finished_at.unwrap_or(r.started_at));
    let limit = app.config.schedule.stale_after_secs;
    // Without a successful full run yet, the time since this process started.
    let age_secs = (now - success_at.unwrap_or(app.started)) as f64 / 1e6;
    let verdict = if last_tick.as_ref().is_some_and(|t| t.error.is_some())
        || full.is_some_and(|r| r.status != "succeeded")
    {
        "failing"
    } else if last.is_some() && limit > 0 && age_secs > limit as f64 {
        "stale"
    } else {
        status
    };
    let full_json = full.map(|r| {
        json!({
            "id": r.id,
            "status": r.status,
            "started_at": instant::to_rfc3339(r.started_at),
            "error": r.error,
            "age_seconds": (now - r.finished_at.unwrap_or(r.started_at)) as f64 / 1e6,
        })
    });
    let body = json!({
        "status": verdict,
        "last_full_run": full_json,
        "last_success_at": success_at.map(instant::to_rfc3339),
        "last_success_age_seconds": success_at.map(|t| (now - t) as f64 / 1e6),
        "stale_after_seconds": limit,
        "last_scheduled_run": tick,
        "tick_failures_total": failures,
    });
    if matches!(verdict, "failing" | "stale") {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(body).into_response()
}

/// Prometheus text exposition format, read from the run history at scrape time so that every
/// replica reports the same figures.
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let (counts, last) = match (app.store.run_counts().await, app.store.last_runs().await) {
        (Ok(c), Ok(l)) => (c, l),
        (Err(e), _) | (_, Err(e)) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("# database unavailable: {e}\n"),
            )
                .into_response();
        }
    };
    let mut body = render_metrics(&counts, &last);
    body.push_str(&render_process_metrics(
        app.tick_failures.load(Ordering::Relaxed),
        app.http_open.load(Ordering::Relaxed),
    ));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Figures of this process (not of the shared run history).
pub fn render_process_metrics(tick_failures: u64, http_open: u64) -> String {
    format!(
        "# HELP referral_rewards_tick_failures_total Scheduled runs of this process that failed, \
         including those that failed before their run row existed.\n\
         # TYPE referral_rewards_tick_failures_total counter\n\
         referral_rewards_tick_failures_total {tick_failures}\n\
         # HELP referral_rewards_http_connections_open HTTP connections this process has open.\n\
         # TYPE referral_rewards_http_connections_open gauge\n\
         referral_rewards_http_connections_open {http_open}\n"
    )
}

/// One figure of a run row, for a labelled metric family.
type RunFigure = fn(&RunRow) -> Option<i64>;

/// The run-history metrics, following Prometheus's practice for batch jobs: the last-run gauges
/// carry the kind of run (`mode`: `full`, `shard`, `referrer`), so that a one-referrer recompute
/// never stands in for the scheduled full runs; `referral_rewards_last_success_timestamp_seconds`
/// is the last successful full run's end, the figure to alert on; counts of runs are counters.
pub fn render_metrics(counts: &[(String, String, i64)], last: &LastRuns) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(s, "# HELP {name} {help}");
        let _ = writeln!(s, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(s, "{name} {v}");
            } else {
                let _ = writeln!(s, "{name}{{{labels}}} {v}");
            }
        }
    };
    family(
        "referral_rewards_build_info",
        "gauge",
        "Always 1; the version of the running binary is its label.",
        &[(format!("version=\"{}\"", env!("CARGO_PKG_VERSION")), 1.0)],
    );
    let count = |kind: RunKind, status: &str| {
        counts
            .iter()
            .find(|(k, s, _)| k == kind.as_str() && s == status)
            .map_or(0.0, |(_, _, n)| *n as f64)
    };
    let mut finished = vec![];
    let mut running = vec![];
    for kind in RunKind::ALL {
        let mode = kind.as_str();
        for status in ["succeeded", "failed", "abandoned"] {
            finished.push((
                format!("mode=\"{mode}\",status=\"{status}\""),
                count(kind, status),
            ));
        }
        running.push((format!("mode=\"{mode}\""), count(kind, "running")));
    }
    family(
        "referral_rewards_runs_total",
        "counter",
        "Applying runs recorded in reward_runs that finished, by kind and status.",
        &finished,
    );
    family(
        "referral_rewards_runs_running",
        "gauge",
        "Applying runs recorded as running now, by kind.",
        &running,
    );
    if let Some(r) = &last.full_success {
        family(
            "referral_rewards_last_success_timestamp_seconds",
            "gauge",
            "When the last successful full run finished, Unix time.",
            &[(
                String::new(),
                r.finished_at.unwrap_or(r.started_at) as f64 / 1e6,
            )],
        );
    }

    // One sample per kind of run that has a finished run, labelled by it.
    let runs: Vec<(&str, &RunRow)> = RunKind::ALL
        .iter()
        .filter_map(|k| last.of(*k).map(|r| (k.as_str(), r)))
        .collect();
    let per = |f: &dyn Fn(&RunRow) -> f64| -> Vec<(String, f64)> {
        runs.iter()
            .map(|(mode, r)| (format!("mode=\"{mode}\""), f(r)))
            .collect()
    };
    let per_labelled = |labels: &[(&str, RunFigure)], key: &str| {
        let mut v = vec![];
        for (mode, r) in &runs {
            for (label, f) in labels {
                v.push((
                    format!("mode=\"{mode}\",{key}=\"{label}\""),
                    f(r).unwrap_or(0) as f64,
                ));
            }
        }
        v
    };
    let n = |v: Option<i64>| v.unwrap_or(0) as f64;
    family(
        "referral_rewards_last_run_duration_seconds",
        "gauge",
        "Wall time of the last finished run of each kind.",
        &per(&|r| {
            r.finished_at
                .map(|f| (f - r.started_at) as f64 / 1e6)
                .unwrap_or(0.0)
        }),
    );
    family(
        "referral_rewards_last_run_timestamp_seconds",
        "gauge",
        "When the last finished run of each kind started, Unix time.",
        &per(&|r| r.started_at as f64 / 1e6),
    );
    family(
        "referral_rewards_last_run_succeeded",
        "gauge",
        "1 if the last finished run of each kind succeeded, else 0.",
        &per(&|r| if r.status == "succeeded" { 1.0 } else { 0.0 }),
    );
    family(
        "referral_rewards_last_run_referrers_processed",
        "gauge",
        "Referrers (and revoked non-referrers) the last run of each kind computed.",
        &per(&|r| n(r.referrers_processed)),
    );
    family(
        "referral_rewards_last_run_rewards_changed",
        "gauge",
        "Referrers whose bonus slots the last run of each kind moved, by direction.",
        &per_labelled(
            &[("up", |r| r.rewards_up), ("down", |r| r.rewards_down)],
            "direction",
        ),
    );
    family(
        "referral_rewards_last_run_rows_written",
        "gauge",
        "Rows the last run of each kind wrote, by table.",
        &per_labelled(
            &[
                ("referral_rewards", |r| r.reward_rows_written),
                ("subscriptions", |r| r.host_values_written),
            ],
            "table",
        ),
    );
    family(
        "referral_rewards_last_run_conflicts",
        "gauge",
        "Host values changed between snapshot and write in the last run of each kind, left for the next.",
        &per(&|r| n(r.conflicts)),
    );
    let mut outcomes = vec![];
    let mut grant_outcomes = vec![];
    let mut grants = vec![];
    for (mode, r) in &runs {
        let counted: serde_json::Map<String, Value> = r
            .outcome_counts
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        if !counted.is_empty() {
            for o in Outcome::ALL {
                let v = counted
                    .get(o.as_str())
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0);
                outcomes.push((format!("mode=\"{mode}\",outcome=\"{}\"", o.as_str()), v));
            }
        }
        let programs: Value = r
            .programs
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        for p in programs["grants"].as_array().into_iter().flatten() {
            let name = p["program"].as_str().unwrap_or_default();
            if let Some(map) = p["outcomes"].as_object() {
                for (o, v) in map {
                    grant_outcomes.push((
                        format!("mode=\"{mode}\",program=\"{name}\",outcome=\"{o}\""),
                        v.as_f64().unwrap_or(0.0),
                    ));
                }
            }
            for (key, kind, party) in [
                ("grants_referrer", "grant", "referrer"),
                ("grants_referred", "grant", "referred"),
                ("reversals_referrer", "reversal", "referrer"),
                ("reversals_referred", "reversal", "referred"),
            ] {
                grants.push((
                    format!("mode=\"{mode}\",program=\"{name}\",kind=\"{kind}\",party=\"{party}\""),
                    p[key]["count"].as_f64().unwrap_or(0.0),
                ));
            }
        }
    }
    family(
        "referral_rewards_last_run_outcomes",
        "gauge",
        "Referred users of the last run of each kind by outcome (or reason for not being a candidate).",
        &outcomes,
    );
    family(
        "referral_rewards_last_run_grant_outcomes",
        "gauge",
        "Referrals of the last run of each kind by grant program and outcome.",
        &grant_outcomes,
    );
    family(
        "referral_rewards_last_run_grants",
        "gauge",
        "Grants and reversals the last run of each kind planned, by grant program, kind and party.",
        &grants,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::grants::plan::GrantStats;

    #[test]
    fn metrics_carry_each_grant_program_from_the_run_row() {
        let mut stats = GrantStats {
            program: "paid_access".into(),
            ..GrantStats::default()
        };
        stats.outcomes.insert("granted", 7);
        stats.outcomes.insert("on_hold", 2);
        stats.grants_referred.count = 5;
        stats.reversals_referrer.count = 1;
        let row = RunRow {
            id: 1,
            mode: "full".into(),
            referrer_user_id: None,
            as_of: 0,
            started_at: 0,
            finished_at: Some(1_000_000),
            status: "succeeded".into(),
            referrers_processed: Some(1),
            rewards_up: Some(0),
            rewards_down: Some(0),
            bonus_delta: Some(0),
            reward_rows_written: Some(0),
            host_values_written: Some(0),
            conflicts: Some(0),
            outcome_counts: None,
            digest: None,
            error: None,
            programs: Some(json!({ "grants": [stats] }).to_string()),
            shard: None,
            trigger: None,
        };
        let last = |row: &RunRow| LastRuns {
            finished: vec![(RunKind::Full, Some(row.clone()))],
            full_success: Some(row.clone()),
        };
        let text = render_metrics(&[], &last(&row));
        for line in [
            "referral_rewards_last_run_grant_outcomes{mode=\"full\",program=\"paid_access\",outcome=\"granted\"} 7",
            "referral_rewards_last_run_grant_outcomes{mode=\"full\",program=\"paid_access\",outcome=\"on_hold\"} 2",
            "referral_rewards_last_run_grants{mode=\"full\",program=\"paid_access\",kind=\"grant\",party=\"referred\"} 5",
            "referral_rewards_last_run_grants{mode=\"full\",program=\"paid_access\",kind=\"reversal\",party=\"referrer\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // A slots-only run row has no grant families at all.
        let slots_only = RunRow {
            programs: None,
            ..row
        };
        assert!(!render_metrics(&[], &last(&slots_only)).contains("grant"));
    }
}
