//! `lodge module`: a balancer module that forwards every connection it takes to one backend. It
//! registers with the balancer (`--endpoint`), heartbeats with real stats, serves the Module
//! service on `--grpc`, and drains gracefully on SIGTERM or SIGINT.
//!
//! It is the reference module built on the SDK (`lodge_grpc::module`) and the one the tests run;
//! a real ALB or DBLB looks into the bytes, this one relays them.
//!
//! Once both listeners are bound and the module is registered it prints one line,
//! `module <instance_id> data=<addr> control=<addr>` (the addresses as registered), so that
//! whoever started it can read the ports it got.
//!
//! Latency in its stats is the time to connect to the backend; queue depth is the connections
//! waiting for that connect.
//!
//! Settings (GetConfig/UpdateConfig): `backend` (HOST:PORT), `max_connections` (0: no limit)
//! and `connect_timeout_ms` (1 to 600000). A changed `max_connections` is registered again so
//! that the balancer knows it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::Args;
use lodge_actors::balancer::ModuleType;
use lodge_grpc::module::splice::{splice, Ended};
use lodge_grpc::module::{ModuleHandle, ModuleHooks, ModuleOptions, Settings};
use lodge_grpc::pb::balancer::Check;
use slog::{debug, info, o, warn, Logger};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;

use crate::ctl::Connection;
use crate::failover;
use crate::tunnel::shutdown::Shutdown;

/// The longest backend connect timeout a setting may ask for.
const MAX_CONNECT_TIMEOUT_MS: u64 = 600_000;

/// How long the Module service may take to finish its calls in flight (a Shutdown call's
/// answer among them) once the module stops.
const SERVER_GRACE: Duration = Duration::from_secs(5);

/// Arguments of `lodge module`.
#[derive(Args, Debug)]
pub struct ModuleArgs {
    /// Module type: alb, dblb, ailb, rtmp or nlb.
    #[arg(long = "type", value_parser = parse_type)]
    pub module_type: ModuleType,
    /// Where to take the connections the balancer forwards (HOST:PORT; port 0 picks one).
    #[arg(long)]
    pub listen: String,
    /// Where to forward every connection (HOST:PORT).
    #[arg(long)]
    pub backend: String,
    /// Where to serve the Module service (HOST:PORT; port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub grpc: String,
    /// The version this instance runs (for blue/green traffic weights).
    #[arg(long = "version", default_value = env!("CARGO_PKG_VERSION"))]
    pub module_version: String,
    /// Registration id (default: <type>-<hostname>-<pid>).
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Connections served at once (0: no limit); more are closed at once.
    #[arg(long, default_value_t = 0)]
    pub max_connections: u32,
    /// Host the balancer reaches this module at, for both registered addresses (default: the
    /// bound IP; required when listening on a wildcard address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// How long SIGTERM or SIGINT waits for connections to finish before exiting.
    #[arg(long, default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
    /// How long to wait for the backend to accept a connection.
    #[arg(long, default_value_t = 5_000)]
    pub connect_timeout_ms: u64,
    /// Log level (critical, error, warning, info, debug, trace).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

fn parse_type(s: &str) -> Result<ModuleType, String> {
    ModuleType::parse(s).ok_or_else(|| format!("{s:?} is not one of alb, dblb, ailb, rtmp, nlb"))
}

/// Checks a backend address: `HOST:PORT` with a port from 1 to 65535 (IPv6 in brackets).
fn check_backend(s: &str) -> Result<(), String> {
    if s.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{s:?}: {port:?} is not a port (1 to 65535)")),
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty()
        || host.contains(|c: char| c.is_whitespace() || c.is_control())
        || (bare.contains(':') && bare.parse::<IpAddr>().is_err())
        || (bare.contains(':') && !host.starts_with('['))
    {
        return Err(format!(
            "{s:?} is not HOST:PORT (write IPv6 addresses in brackets)"
        ));
    }
    Ok(())
}

/// Checks one setting's value.
fn check_setting(key: &str, value: &str) -> Result<(), String> {
    match key {
        "backend" => check_backend(value),
        "max_connections" => value
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| format!("{value:?} is not a number from 0 to 4294967295")),
        "connect_timeout_ms" => match value.parse::<u64>() {
            Ok(ms) if (1..=MAX_CONNECT_TIMEOUT_MS).contains(&ms) => Ok(()),
            _ => Err(format!(
                "{value:?} is not a number of milliseconds from 1 to {MAX_CONNECT_TIMEOUT_MS}"
            )),
        },
        _ => Err("unknown setting".into()),
    }
}

/// What each new connection reads: where to forward and how long to wait for it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    backend: String,
    connect_timeout: Duration,
}

impl Target {
    /// From validated settings (a value that does not parse keeps `self`'s).
    fn updated(&self, s: &BTreeMap<String, String>) -> Target {
        Target {
            backend: s
                .get("backend")
                .cloned()
                .unwrap_or_else(|| self.backend.clone()),
            connect_timeout: s
                .get("connect_timeout_ms")
                .and_then(|v| v.parse().ok())
                .map_or(self.connect_timeout, Duration::from_millis),
        }
    }
}

type Shared = Arc<RwLock<Target>>;

fn target(t: &Shared) -> Target {
    t.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `host:port` with IPv6 hosts in brackets.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The host registered for `bound`: `--advertise`, or the bound IP unless it is a wildcard.
fn advertised(advertise: Option<&str>, bound: SocketAddr) -> Result<String, String> {
    match advertise {
        Some(h) if !h.trim().is_empty() => Ok(join_host_port(h.trim(), bound.port())),
        _ if bound.ip().is_unspecified() => Err(format!(
            "--advertise: required when listening on {} (the balancer cannot reach a wildcard \
             address)",
            bound.ip()
        )),
        _ => Ok(bound.to_string()),
    }
}

/// The hooks `lodge module` gives the SDK: settings, reload (re-resolve the backend), and the
/// deep health check (connect to the backend).
fn hooks(args: &ModuleArgs, shared: &Shared) -> ModuleHooks {
    let values: BTreeMap<String, String> = [
        ("backend", args.backend.clone()),
        ("max_connections", args.max_connections.to_string()),
        ("connect_timeout_ms", args.connect_timeout_ms.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let on_change = {
        let shared = shared.clone();
        Arc::new(move |m: &ModuleHandle, s: &BTreeMap<String, String>| {
            let mut t = shared.write().unwrap_or_else(|e| e.into_inner());
            *t = t.updated(s);
            drop(t);
            if let Some(max) = s.get("max_connections").and_then(|v| v.parse().ok()) {
                m.set_max_connections(max);
            }
        })
    };
    let reload = {
        let shared = shared.clone();
        Arc::new(move || {
            let t = target(&shared);
            Box::pin(async move {
                check_backend(&t.backend).map_err(|e| format!("backend: {e}"))?;
                let addrs: Vec<String> = tokio::net::lookup_host(&t.backend)
                    .await
                    .map_err(|e| format!("backend {}: {e}", t.backend))?
                    .map(|a| a.to_string())
                    .collect();
                Ok(format!(
                    "backend {} resolves to {}",
                    t.backend,
                    addrs.join(", ")
                ))
            }) as lodge_grpc::module::HookFuture<Result<String, String>>
        })
    };
    let deep_check = {
        let shared = shared.clone();
        Arc::new(move || {
            let t = target(&shared);
            Box::pin(async move {
                let start = Instant::now();
                let r = tokio::time::timeout(
                    t.connect_timeout,
                    tokio::net::TcpStream::connect(&t.backend),
                )
                .await;
                let duration_ms = start.elapsed().as_millis() as u64;
                let (ok, message) = match r {
                    Ok(Ok(_)) => (true, format!("{} accepts connections", t.backend)),
                    Ok(Err(e)) => (false, format!("{}: {e}", t.backend)),
                    Err(_) => (
                        false,
                        format!(
                            "{}: no connection within {:?}",
                            t.backend, t.connect_timeout
                        ),
                    ),
                };
                vec![Check {
                    name: "backend".into(),
                    ok,
                    message,
                    duration_ms,
                }]
            }) as lodge_grpc::module::HookFuture<Vec<Check>>
        })
    };
    ModuleHooks {
        reload: Some(reload),
        deep_check: Some(deep_check),
        settings: Some(Settings {
            values,
            validate: Arc::new(check_setting),
            on_change: Some(on_change),
        }),
    }
}

/// Takes connections until the task is dropped: each one admitted is forwarded on its own
/// task; one refused (rate limit, `max_connections`) is closed at once.
async fn accept_loop(listener: TcpListener, module: ModuleHandle, shared: Shared, log: Logger) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, typically: give the connections in flight a moment to
                // close rather than spinning on the error.
                warn!(log, "accept failed"; "error" => %e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let guard = match module.admit() {
            Ok(g) => g,
            Err(why) => {
                debug!(log, "connection refused"; "peer" => %peer, "why" => %why);
                continue;
            }
        };
        let t = target(&shared);
        let log = log.clone();
        tokio::spawn(async move {
            match splice(guard, client, &t.backend, t.connect_timeout).await {
                Ok(Ended::Closed {
                    from_client,
                    to_client,
                }) => debug!(log, "connection closed"; "peer" => %peer,
                             "from_client" => from_client, "to_client" => to_client),
                Ok(Ended::Shed) => debug!(log, "connection shed"; "peer" => %peer),
                Err(e) => warn!(log, "connection failed"; "peer" => %peer, "error" => e),
            }
        });
    }
}

/// Runs the module until SIGTERM, SIGINT or a Shutdown call; the exit status.
pub async fn run(conn: Connection, args: ModuleArgs) -> i32 {
    // Caught before anything is announced, so a signal right after the ready line drains.
    let mut signals = Shutdown::catch();
    match start(conn, args, &mut signals).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lodge module: {e}");
            2
        }
    }
}

async fn start(conn: Connection, args: ModuleArgs, signals: &mut Shutdown) -> Result<(), String> {
    check_backend(&args.backend).map_err(|e| format!("--backend: {e}"))?;
    check_setting("connect_timeout_ms", &args.connect_timeout_ms.to_string())
        .map_err(|e| format!("--connect-timeout-ms: {e}"))?;
    let endpoints = failover::endpoints(&conn);
    if endpoints.is_empty() {
        return Err("--endpoint: no balancer node given".into());
    }
    let data_l = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let grpc_l = TcpListener::bind(&args.grpc)
        .await
        .map_err(|e| format!("--grpc {}: {e}", args.grpc))?;
    let local = |l: &TcpListener| l.local_addr().map_err(|e| format!("local address: {e}"));
    let data = advertised(args.advertise.as_deref(), local(&data_l)?)?;
    let control = advertised(args.advertise.as_deref(), local(&grpc_l)?)?;

    let (root, _log_guard) = crate::logging::build_with(&args.log_level, &args.log_format, o!());
    let mut opts = ModuleOptions::new(args.module_type, endpoints, &control, &data);
    if let Some(id) = &args.instance_id {
        if id.trim().is_empty() {
            return Err("--instance-id: must not be empty".into());
        }
        opts.instance_id = id.clone();
    }
    opts.tls = failover::tls(&conn)?;
    opts.version = args.module_version.clone();
    opts.max_connections = args.max_connections;
    opts.log = root.clone();
    let log = root.new(o!("module" => opts.instance_id.clone()));

    let shared: Shared = Arc::new(RwLock::new(Target {
        backend: args.backend.clone(),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
    }));
    let module = ModuleHandle::start(opts, hooks(&args, &shared));

    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(lodge_grpc::status_limit::StatusLimitLayer)
            .add_service(module.service())
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_l), async {
                let _ = server_stopped.await;
            }),
    );
    let accepting = tokio::spawn(accept_loop(
        data_l,
        module.clone(),
        shared.clone(),
        log.clone(),
    ));

    let drain_timeout = Duration::from_millis(args.drain_timeout_ms);
    let mut registered = module.subscribe();
    let signalled = tokio::select! {
        r = registered.wait_for(|s| s.registered) => {
            r.map_err(|_| "the balancer link stopped".to_string())?;
            let id = module.instance_id();
            println!("module {id} data={data} control={control}");
            let _ = std::io::stdout().flush();
            info!(log, "serving"; "instance" => &id, "data" => &data, "control" => &control,
                  "backend" => &args.backend);
            tokio::select! {
                () = signals.signalled() => true,
                () = module.exit_requested() => false,
            }
        }
        () = signals.signalled() => true,
        () = module.exit_requested() => false,
    };
    if signalled {
        info!(log, "signalled: draining"; "timeout_ms" => args.drain_timeout_ms);
        let r = module.drain(drain_timeout).await;
        if let Err(e) = &r.balancer {
            warn!(log, "the balancer did not confirm the drain"; "error" => e);
        }
    }
    // New connections are no longer taken; the Module service finishes its calls in flight.
    accepting.abort();
    let _ = stop_server.send(());
    let _ = tokio::time::timeout(SERVER_GRACE, server).await;
    info!(log, "stopped"; "remaining" => module.tracker().active());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_addresses() {
        for ok in [
            "127.0.0.1:80",
            "db.internal:5432",
            "[::1]:6379",
            "localhost:1",
            "[fe80::1]:65535",
        ] {
            assert_eq!(check_backend(ok), Ok(()), "{ok}");
        }
        for bad in [
            "nohost",
            "host:",
            ":80",
            "host:0",
            "host:70000",
            "::1:80",
            "[zz::1]:80",
            "a b:80",
            "127.0.0.1:0",
        ] {
            assert!(check_backend(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_are_checked_by_name() {
        assert!(check_setting("backend", "10.0.0.1:80").is_ok());
        assert!(check_setting("backend", "10.0.0.1").is_err());
        assert!(check_setting("max_connections", "0").is_ok());
        assert!(check_setting("max_connections", "-1").is_err());
        assert!(check_setting("connect_timeout_ms", "1").is_ok());
        assert!(check_setting("connect_timeout_ms", "0").is_err());
        assert!(check_setting("connect_timeout_ms", "600001").is_err());
        assert!(check_setting("colour", "blue").is_err());
    }

    #[test]
    fn settings_update_the_target() {
        let t = Target {
            backend: "a:1".into(),
            connect_timeout: Duration::from_secs(5),
        };
        let s: BTreeMap<String, String> = [
            ("backend".to_string(), "b:2".to_string()),
            ("connect_timeout_ms".to_string(), "250".to_string()),
        ]
        .into();
        assert_eq!(
            t.updated(&s),
            Target {
                backend: "b:2".into(),
                connect_timeout: Duration::from_millis(250)
            }
        );
        assert_eq!(t.updated(&BTreeMap::new()), t);
    }

    #[test]
    fn advertised_addresses() {
        let v4: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(advertised(None, v4).unwrap(), "127.0.0.1:9000");
        assert_eq!(
            advertised(Some("mod.local"), any).unwrap(),
            "mod.local:9000"
        );
        assert_eq!(advertised(Some("fd00::5"), any).unwrap(), "[fd00::5]:9000");
        assert!(advertised(None, any)
            .unwrap_err()
            .starts_with("--advertise: required"));
    }
}
