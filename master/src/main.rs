//! `flotilla`: the user-facing CLI. Thin: the logic lives in the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use flotilla::manifest::{self, RuntimeKind};
use flotilla::runner::{self, RunOptions};
use flotilla::ServeOptions;
use flotilla_proto::telemetry::{self, LogColor, LogFormat, Telemetry};
use flotilla_proto::{TaskId, WorkerId};

mod verbs;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "A compute cluster: a master, its workers, Python and shell tasks"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format: text (default) or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    /// Colours in log lines: auto (only when stderr is a terminal), always, never.
    #[arg(long, global = true, default_value = "auto")]
    color: LogColor,
    /// Settings from the environment, read once here.
    #[command(flatten)]
    env: flotilla::settings::EnvSettings,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Cluster manifest (the seed's `system:` form or `kind: Cluster`).
    file: PathBuf,
    /// Port of the HTTP API (0 picks a free one).
    #[arg(long, default_value_t = 5000)]
    port: u16,
    /// Address to bind. Anything but loopback needs FLOTILLA_TOKEN or --insecure.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Allow a non-loopback bind without a token.
    #[arg(long)]
    insecure: bool,
    /// Override the manifest's runtime.
    #[arg(long)]
    runtime: Option<RuntimeKind>,
    /// Tasks each worker runs at once.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// Also serve `GET /metrics` on this port of the bind address, without
    /// the token, for Prometheus (the API's /metrics keeps needing it).
    #[arg(long, env = "FLOTILLA_METRICS_PORT")]
    metrics_port: Option<u16>,
    /// The URL workers reach this master at, when its own address is not
    /// (a master in a container on the workers' network, or behind a
    /// Kubernetes Service). Every runtime takes it.
    #[arg(long, env = "FLOTILLA_ADVERTISE_URL", value_parser = parse_advertise_url)]
    advertise_url: Option<String>,
    /// The API's bearer token (clients send `Authorization: Bearer ...`).
    /// Only from the environment, so that it never shows in `ps`.
    #[arg(skip = flotilla::api_token())]
    token: Option<String>,
    /// Where the master keeps its durable state (`up` default: the
    /// manifest's spec.stateDir, else .flotilla/<cluster name>; `run`: none
    /// unless given).
    #[arg(long, conflicts_with = "ephemeral")]
    state_dir: Option<PathBuf>,
    /// Keep nothing: a master that dies loses its queued tasks, results and
    /// resource values (task IDs still never repeat: they start from the clock).
    #[arg(long)]
    ephemeral: bool,
    /// With --ephemeral, how long SIGTERM lets accepted tasks finish
    /// (new ones are refused meanwhile) before the master exits.
    #[arg(long, default_value_t = 30.0)]
    drain_seconds: f64,
}

fn parse_advertise_url(raw: &str) -> Result<String, String> {
    flotilla::runtime::advertised_url(raw).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// Start the master and its workers, serve until Ctrl-C.
    Up(ServeArgs),
    /// Start the cluster, replay the file's requests, wait for every task, summarise.
    Run {
        #[command(flatten)]
        serve: ServeArgs,
        /// Print a machine-readable JSON report instead of text.
        #[arg(long)]
        json: bool,
        /// Multiply every `sleep` in the scenario by this factor.
        #[arg(long, default_value_t = 1.0)]
        sleep_scale: f64,
        /// Fail if the tasks are not all finished after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Check a manifest and print what it describes.
    Check { file: PathBuf },
    /// Remove a cluster's workers for good (processes, containers, pods);
    /// refuses while a live master owns the cluster, unless --force.
    Down {
        /// The cluster's manifest (as given to `up`).
        file: PathBuf,
        /// Override the manifest's runtime.
        #[arg(long)]
        runtime: Option<RuntimeKind>,
        /// The cluster's state directory, where its process workers' PIDs
        /// are recorded (default: as `up`: spec.stateDir, else
        /// .flotilla/<cluster name>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Remove the workers even though a live master owns the cluster
        /// (that master starts them again).
        #[arg(long)]
        force: bool,
    },
    /// Run the benchmark workloads (README, "Performance") against fresh clusters.
    Bench {
        /// Comma-separated: W1, W2, W3, W4, W6, locks (uncontended lock round
        /// trip), idle; also cancel (cancel to the next task's start on the
        /// freed slot), dashboards (W1 with three dashboards open against
        /// W1 without, and the updates each receives a second), W7 (the
        /// master's memory over 1,000,000 tasks, see --w7-tasks), trace
        /// (W1 with trace export off, at ratio 1 and at --trace-ratio, side
        /// by side), W8 (100 workers of capacity 2: idle CPU, heartbeats,
        /// interpreter memory, W1 against 4 workers), backlog (300,000
        /// tasks queued: submit rate, memory, /health, dispatch rate),
        /// restart (a master SIGKILLed with 100,000 queued tasks and
        /// started again: seconds to /health and to dispatching; see
        /// --restart-tasks) and docker-start (1 vs 3 Docker workers; needs
        /// Docker).
        #[arg(
            long,
            default_value = "W1,W2,W3,W4,W6,locks,idle",
            value_delimiter = ','
        )]
        workloads: Vec<String>,
        /// Runs per workload; figures are medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// W7's number of tasks (memory over time).
        #[arg(long, default_value_t = 1_000_000)]
        w7_tasks: usize,
        /// The restart workload's number of queued tasks.
        #[arg(long, default_value_t = 100_000)]
        restart_tasks: usize,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
        /// Export the cluster's traces to a local stand-in collector (to
        /// measure what tracing costs).
        #[arg(long)]
        trace: bool,
        /// The flotilla binary to run as the cluster under test (default:
        /// this one), e.g. an earlier build to compare against.
        #[arg(long)]
        cluster_binary: Option<std::path::PathBuf>,
        /// Run every cluster under test with `--ephemeral` (no store), e.g.
        /// to compare with a build that had none; W1 then runs once per run.
        #[arg(long)]
        ephemeral: bool,
        /// With --trace: the share of tasks traced (the clusters'
        /// spec.telemetry.sampleRatio, 0 to 1). For the `trace` workload:
        /// the ratio measured beside off and 1 (default 0.1).
        #[arg(long, value_parser = sample_ratio)]
        trace_ratio: Option<f64>,
    },

    /// A chaos soak: a real cluster, a mixed workload and seeded faults,
    /// every operation in a history, then the checker (exit code 1 on any
    /// anomaly). `flotilla chaos check HISTORY` checks a history again.
    Chaos(ChaosArgs),

    // ----- a running cluster (--server URL or FLOTILLA_SERVER; token FLOTILLA_TOKEN) -----
    /// Submit a task; prints its ID (--wait: its result, exit code 1 if it failed).
    Submit(verbs::SubmitArgs),
    /// Show a task.
    Get {
        #[command(flatten)]
        conn: verbs::Conn,
        id: TaskId,
    },
    /// Wait for tasks to finish (exit code 1 if any failed).
    Wait(verbs::WaitArgs),
    /// Cancel tasks: queued ones are dropped, running ones stopped.
    Cancel {
        #[command(flatten)]
        conn: verbs::Conn,
        /// Task IDs.
        #[arg(required = true)]
        ids: Vec<TaskId>,
    },
    /// List tasks, filtered, in ID order.
    Tasks(verbs::TasksArgs),
    /// List the workers.
    Nodes {
        #[command(flatten)]
        conn: verbs::Conn,
    },
    /// List the shared resources, or show one.
    Resources {
        #[command(flatten)]
        conn: verbs::Conn,
        name: Option<String>,
    },
    /// Add a worker; prints its node ID.
    Add {
        #[command(flatten)]
        conn: verbs::Conn,
        /// Its queue capacity (the master's default: 10).
        #[arg(long)]
        capacity: Option<usize>,
    },
    /// Kill a worker (the master restarts it under the same ID).
    Stop {
        #[command(flatten)]
        conn: verbs::Conn,
        node: WorkerId,
    },
    /// Follow the cluster live: tasks as they finish, node changes.
    Watch(verbs::WatchArgs),
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ChaosArgs {
    #[command(subcommand)]
    command: Option<ChaosCommand>,
    /// Cluster manifest to soak (e.g. manifests/chaos.yaml).
    #[arg(required = true)]
    file: Option<PathBuf>,
    /// How long faults and workload run (then the cluster settles and is checked).
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Seed of the fault schedule and the workload; default: a random one,
    /// printed (replay a soak with its seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Override the manifest's runtime (process or docker).
    #[arg(long)]
    runtime: Option<RuntimeKind>,
    /// Where to write the history (JSON lines); the master's log goes
    /// beside it (`.master.log`).
    #[arg(long, default_value = "chaos-history.jsonl")]
    history: PathBuf,
    /// Tasks each worker runs at once.
    #[arg(long, default_value_t = 2)]
    slots: u32,
    /// Concurrent workload clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ChaosCommand {
    /// Check a soak's history again; exit code 1 on any anomaly.
    Check {
        history: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Prints a chaos report and exits 1 if it found anomalies.
fn chaos_verdict(report: &flotilla::chaos::check::Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{report}");
    }
    if !report.clean() {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
    Ok(())
}

/// Runs a verb for a running cluster and exits with its code: 0 done, 1 a
/// task failed, 2 bad usage, 3 the master unreachable or refusing, 4 timed out.
async fn run_verb(command: Command) -> ! {
    let outcome = match command {
        Command::Submit(a) => verbs::submit(a).await,
        Command::Get { conn, id } => verbs::get(conn, id).await,
        Command::Wait(a) => verbs::wait(a).await,
        Command::Cancel { conn, ids } => verbs::cancel(conn, ids).await,
        Command::Tasks(a) => verbs::tasks(a).await,
        Command::Nodes { conn } => verbs::nodes(conn).await,
        Command::Resources { conn, name } => verbs::resources(conn, name).await,
        Command::Add { conn, capacity } => verbs::add(conn, capacity).await,
        Command::Stop { conn, node } => verbs::stop(conn, node).await,
        Command::Watch(a) => verbs::watch(a).await,
        _ => unreachable!("not a verb for a running cluster"),
    };
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<flotilla_client::Error>().is_some() {
                verbs::EXIT_MASTER
            } else if e.downcast_ref::<verbs::TimedOut>().is_some() {
                verbs::EXIT_TIMEOUT
            } else {
                2
            }
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// `--trace-ratio`: a share between 0 and 1.
fn sample_ratio(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "`{raw}` is not a share between 0 and 1 (e.g. 0.1: one task in ten traced)"
        )),
    }
}

/// The logging flags of the command line, shared by this process and the
/// workers it starts.
struct LogArgs {
    level: Option<String>,
    format: LogFormat,
    color: LogColor,
}

impl LogArgs {
    /// Logs (and traces, when an OTLP endpoint is set) for this process.
    /// `sample_ratio`: the manifest's `spec.telemetry.sampleRatio`.
    fn init_telemetry(&self, default: &str, otlp: Option<&str>, sample_ratio: f64) -> Telemetry {
        telemetry::init(
            "flotilla-master",
            self.level.as_deref().unwrap_or(default),
            self.format,
            self.color,
            otlp,
            Some(sample_ratio),
        )
    }

    fn worker_env(&self, default: &str, otlp: Option<&str>) -> Vec<(String, String)> {
        worker_env(
            self.level.as_deref(),
            default,
            self.format,
            self.color,
            otlp,
        )
    }
}

/// What the workers take from their master wherever they run, read once
/// here: the standard `OTEL_*` exporter settings and `RUST_LOG` of this
/// environment, this master's log level, format and colour mode, and the
/// manifest's trace endpoint when the environment names none.
fn worker_env(
    level: Option<&str>,
    default: &str,
    format: LogFormat,
    color: LogColor,
    otlp: Option<&str>,
) -> Vec<(String, String)> {
    let mut env = flotilla::runtime::inherited_env();
    let mut put = |key: &str, value: String, keep_existing: bool| match env
        .iter_mut()
        .find(|(k, _)| k == key)
    {
        Some(_) if keep_existing => {}
        Some((_, v)) => *v = value,
        None => env.push((key.to_string(), value)),
    };
    put("RUST_LOG", level.unwrap_or(default).to_string(), true);
    let format = if format == LogFormat::Json {
        "json"
    } else {
        "text"
    };
    put("FLOTILLA_LOG_FORMAT", format.to_string(), false);
    // The mode as given: a worker whose stderr is this one's (processes)
    // decides the same way; one writing to a container log gets no colours
    // unless `always` was asked for.
    put("FLOTILLA_LOG_COLOR", color.as_str().to_string(), false);
    if let Some(endpoint) = otlp {
        put("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string(), true);
    }
    env
}

fn serve_options(a: &ServeArgs, worker_env: Vec<(String, String)>) -> ServeOptions {
    ServeOptions {
        worker_env,
        bind: a.bind,
        port: a.port,
        insecure: a.insecure,
        runtime: a.runtime,
        slots: a.slots,
        metrics_port: a.metrics_port,
        advertise_url: a.advertise_url.clone(),
        token: a.token.clone(),
        state_dir: a.state_dir.clone(),
        time_based_ids: a.ephemeral,
    }
}

/// `flotilla up` is durable unless told otherwise.
fn up_state_dir(a: &ServeArgs, spec: &manifest::ClusterSpec) -> Option<PathBuf> {
    if a.ephemeral {
        return None;
    }
    Some(
        a.state_dir
            .clone()
            .or_else(|| spec.state_dir.clone())
            .unwrap_or_else(|| flotilla::store::Store::default_dir(&spec.name)),
    )
}

fn main() -> Result<()> {
    // Before the async runtime starts its threads: it changes the environment.
    flotilla::take_token();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let cli = Cli::parse();
    flotilla::settings::init(cli.env.clone());
    let logs = LogArgs {
        level: cli.log_level,
        format: cli.log_format,
        color: cli.color,
    };
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "flotilla",
                &mut std::io::stdout(),
            );
        }
        verb @ (Command::Submit(_)
        | Command::Get { .. }
        | Command::Wait(_)
        | Command::Cancel { .. }
        | Command::Tasks(_)
        | Command::Nodes { .. }
        | Command::Resources { .. }
        | Command::Add { .. }
        | Command::Stop { .. }
        | Command::Watch(_)) => run_verb(verb).await,
        Command::Up(args) => {
            let spec = manifest::load_file(&args.file)?;
            let _telemetry =
                logs.init_telemetry("info", spec.otlp_endpoint.as_deref(), spec.sample_ratio);
            let workers = logs.worker_env("info", spec.otlp_endpoint.as_deref());
            let mut opts = serve_options(&args, workers);
            opts.state_dir = up_state_dir(&args, &spec);
            let master = flotilla::start(&spec, &opts).await?;
            // Listening for Ctrl-C and SIGTERM before saying it is up: a
            // signal sent right after the banner is not the default death.
            let mut signals = StopSignals::new()?;
            let state = match &opts.state_dir {
                Some(dir) => format!("state in {}", dir.display()),
                None => "ephemeral: nothing is kept".into(),
            };
            println!(
                "flotilla master listening on {} ({} workers, {state}); Ctrl-C to stop",
                master.url(),
                spec.capacities.len()
            );
            let signal = tokio::select! {
                signal = signals.recv() => signal,
                detail = master.cluster.claim_lost() => {
                    // The workers are the new owner's now: leave them.
                    master.leave().await;
                    anyhow::bail!("stopping: another master owns cluster `{}` now ({detail}); this one leaves its workers to it", spec.name);
                }
            };
            let unfinished = master.cluster.unfinished();
            match (signal, &opts.state_dir) {
                (Stop::Interrupt, _) => {
                    eprintln!("Ctrl-C: stopping the master and its workers");
                }
                (Stop::Terminate, Some(dir)) => {
                    let workers = spec.capacities.len();
                    tracing::info!(unfinished, workers, dir = %dir.display(), grace_s = spec.master_grace.as_secs_f64(), "SIGTERM: stopping; the unfinished tasks are kept in the state directory and the workers keep running for the next master (each stops by itself after spec.masterGraceSeconds without one)");
                    master.leave().await;
                    return Ok(());
                }
                (Stop::Terminate, None) => {
                    let drain = Duration::from_secs_f64(args.drain_seconds.max(0.0));
                    tracing::info!(
                        unfinished,
                        ?drain,
                        "SIGTERM: not accepting tasks any more; letting the accepted ones finish"
                    );
                    let left = master.cluster.drain(drain).await;
                    if left == 0 {
                        tracing::info!("drained: every accepted task finished");
                    } else {
                        tracing::warn!(dropped = left, "drain time is up: dropping {left} unfinished tasks (nothing is kept with --ephemeral)");
                    }
                }
            }
            master.shutdown().await;
        }
        Command::Run {
            serve,
            json,
            sleep_scale,
            timeout,
        } => {
            let spec = manifest::load_file(&serve.file)?;
            let _telemetry =
                logs.init_telemetry("warn", spec.otlp_endpoint.as_deref(), spec.sample_ratio);
            let workers = logs.worker_env("warn", spec.otlp_endpoint.as_deref());
            let opts = serve_options(&serve, workers);
            let master = flotilla::start(&spec, &opts).await?;
            master.wait_ready(Duration::from_secs(30)).await?;
            let run_opts = RunOptions {
                json,
                sleep_scale,
                timeout: timeout.map(Duration::from_secs_f64),
            };
            let client = flotilla_client::Client::new(&master.url(), opts.token.clone())?;
            let outcome = tokio::select! {
                r = runner::run(&client, &spec, &run_opts) => r.map(|_| ()),
                _ = stop_signal() => Err(anyhow::anyhow!("interrupted")),
            };
            master.shutdown().await;
            outcome?;
        }
        Command::Bench {
            workloads,
            runs,
            w7_tasks,
            restart_tasks,
            json,
            trace,
            cluster_binary,
            ephemeral,
            trace_ratio,
        } => {
            let _telemetry = logs.init_telemetry("error", None, 1.0);
            let sink = if trace {
                Some(flotilla::bench::start_trace_sink().await?)
            } else {
                None
            };
            let opts = flotilla::bench::BenchOptions {
                workloads,
                runs: runs.max(1),
                flotilla: match cluster_binary {
                    Some(b) => b,
                    None => std::env::current_exe()?,
                },
                otlp_endpoint: sink.as_ref().map(|(url, _)| url.clone()),
                trace_ratio,
                w7_tasks,
                ephemeral,
                restart_tasks,
            };
            let mut figures = flotilla::bench::run(&opts).await?;
            if let Some((_, bytes)) = &sink {
                figures["trace_bytes_exported"] =
                    bytes.load(std::sync::atomic::Ordering::Relaxed).into();
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            } else {
                print_figures(&figures);
            }
        }
        Command::Down {
            file,
            runtime,
            state_dir,
            force,
        } => {
            let spec = manifest::load_file(&file)?;
            let _telemetry = logs.init_telemetry("warn", None, 1.0);
            let state_dir = state_dir
                .or_else(|| spec.state_dir.clone())
                .unwrap_or_else(|| flotilla::store::Store::default_dir(&spec.name));
            let opts = flotilla::DownOptions {
                runtime,
                state_dir: Some(state_dir),
                force,
            };
            let removed = flotilla::down(&spec, &opts).await?;
            let kind = format!("{:?}", runtime.unwrap_or(spec.runtime)).to_lowercase();
            if removed.is_empty() {
                println!("cluster `{}` ({kind}): no worker left to remove", spec.name);
            } else {
                println!(
                    "cluster `{}` ({kind}): removed {} worker{}:",
                    spec.name,
                    removed.len(),
                    if removed.len() == 1 { "" } else { "s" }
                );
                for line in removed {
                    println!("  {line}");
                }
            }
        }
        Command::Chaos(args) => {
            let _telemetry = logs.init_telemetry("warn", None, 1.0);
            match args.command {
                Some(ChaosCommand::Check { history, json }) => {
                    let events = flotilla::chaos::history::read(&history)?;
                    chaos_verdict(&flotilla::chaos::check::check(&events), json)?;
                }
                None => {
                    let seed = match args.seed {
                        Some(s) => s,
                        None => {
                            let s = rand::random::<u64>() >> 11;
                            println!("chaos: random seed {s} (replay with --seed {s})");
                            s
                        }
                    };
                    let opts = flotilla::chaos::ChaosOptions {
                        manifest: args.file.expect("clap requires FILE"),
                        seconds: args.seconds,
                        seed,
                        runtime: args.runtime,
                        history: args.history,
                        flotilla: std::env::current_exe()?,
                        slots: args.slots,
                        clients: args.clients,
                    };
                    let report = flotilla::chaos::run(opts).await?;
                    chaos_verdict(&report, args.json)?;
                }
            }
        }
        Command::Check { file } => {
            let spec = manifest::load_file(&file)?;
            // What `up` checks before it starts anything, nothing less.
            flotilla::check(&spec, None).await?;
            println!(
                "{}: cluster `{}`, runtime {:?}, {} workers (capacities {:?}), heartbeat every {:?} (timeout {:?}), {} shared resources, {} requests",
                file.display(),
                spec.name,
                spec.runtime,
                spec.capacities.len(),
                spec.capacities,
                spec.heartbeat_interval,
                spec.heartbeat_timeout,
                spec.resources.len(),
                spec.requests.len()
            );
        }
    }
    Ok(())
}

/// How the master was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Ctrl-C in a terminal.
    Interrupt,
    /// SIGTERM: systemd, `docker stop`, Kubernetes.
    Terminate,
}

/// Ctrl-C or SIGTERM. Either way the master removes its workers before it
/// exits; on SIGTERM a durable master keeps its unfinished tasks for the
/// next one, an ephemeral one drains first (`--drain-seconds`).
async fn stop_signal() -> Result<Stop> {
    Ok(StopSignals::new()?.recv().await)
}

/// Ctrl-C and SIGTERM, listened for from creation on.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.terminate.recv() => Stop::Terminate,
        }
    }
}

fn print_figures(f: &serde_json::Value) {
    println!(
        "machine: {} cores, {}; medians of {} runs",
        f["machine"]["cores"], f["machine"]["kind"], f["runs"]
    );
    let w = &f["workloads"];
    if let Some(x) = w.get("W1") {
        println!(
            "W1 throughput: {:.0} tasks/s durable; {:.0} tasks/s --ephemeral (durable at {:.0}% of it)",
            x["tasks_per_s"].as_f64().unwrap_or(0.0),
            x["ephemeral_tasks_per_s"].as_f64().unwrap_or(0.0),
            100.0 * x["durable_vs_ephemeral"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(x) = w.get("dashboards") {
        let f = |k: &str| x[k].as_f64().unwrap_or(0.0);
        println!(
            "W1 with 3 dashboards open: {:.0} tasks/s against {:.0} without (drop {:.1}%); at {:.0} tasks/s each dashboard got {:.1} updates/s; page weight {:.0} bytes",
            f("with_dashboards_tasks_per_s"),
            f("tasks_per_s"),
            f("drop_percent"),
            f("fast_tasks_per_s"),
            f("updates_per_s_per_client"),
            f("page_bytes")
        );
    }
    if let Some(x) = w.get("W2") {
        println!(
            "W2 latency: p50 {:.2} ms, p99 {:.2} ms",
            x["p50_ms"].as_f64().unwrap_or(0.0),
            x["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(x) = w.get("W3") {
        println!(
            "W3 CPU efficiency: {:.3} (makespan / perfect; 1.00 is perfect)",
            x["efficiency"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(x) = w.get("W4") {
        println!(
            "W4 lock throughput: {:.0} tasks/s, final total {}",
            x["tasks_per_s"].as_f64().unwrap_or(0.0),
            x["final_total"]
        );
    }
    if let Some(x) = w.get("locks") {
        println!(
            "lock round trip from task code: p50 {:.3} ms, p99 {:.3} ms",
            x["p50_ms"].as_f64().unwrap_or(0.0),
            x["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(x) = w.get("docker-start") {
        println!(
            "docker-start: 1 worker {:.2} s, 3 workers {:.2} s ({:.2}x)",
            x["one_s"].as_f64().unwrap_or(0.0),
            x["three_s"].as_f64().unwrap_or(0.0),
            x["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(x) = w.get("restart") {
        println!(
            "restart: a master SIGKILLed with {} queued tasks and started again answers /health after {:.2} s and dispatches again after {:.2} s",
            x["queued"].as_u64().unwrap_or(0),
            x["health_s"].as_f64().unwrap_or(0.0),
            x["dispatch_s"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(x) = w.get("W7") {
        println!(
            "W7 memory over time: master RSS {:.1} MiB after a tenth of the tasks, {:.1} MiB after all ({:.2}x), {:.1} bytes kept per finished task; state on disk {:.1} MiB then {:.1} MiB (10 s TTL); {:.0} tasks/s",
            x["rss_first_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            x["rss_last_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            x["rss_ratio"].as_f64().unwrap_or(0.0),
            x["bytes_per_finished_task"].as_f64().unwrap_or(0.0),
            x["disk_first_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            x["disk_last_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            x["tasks_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(x) = w.get("W6") {
        println!(
            "W6 skew/stealing: {:.3} x the 2-core limit",
            x["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(x) = w.get("idle") {
        println!(
            "idle (master + 4 workers): {:.2}% of one core",
            x["cpu_percent_of_one_core"].as_f64().unwrap_or(0.0)
        );
    }
}
