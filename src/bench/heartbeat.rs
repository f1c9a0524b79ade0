//! `lodge bench heartbeat`: client heartbeats per second on one node, beside a bare tonic unary
//! server answering the same RPC with the same messages and no work at all (`lodge bench
//! echo-server`, a child process like the node), measured in the same run, alternating; then the
//! memory of a node holding many registrations.
//!
//! Two heartbeat figures: the usual one (a heartbeat renews its lease through raft at most once
//! per half interval, so a client beating at the asked interval renews on every beat; the load
//! here beats far faster, so most beats are answered from the client's shared figures without a
//! renewal), and one where the interval is 1 ms, so that every beat renews the lease through
//! raft.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lodge_grpc::client::Channel;
use lodge_grpc::client::{self, ClientTls};
use lodge_grpc::pb::registry::{self as pb, registry_client::RegistryClient};

use super::kv::{free_port, launch, start_lodge_with, Proc};
use super::{median, rss_of, Failures, Outcome};

/// What `lodge bench heartbeat` measures, from the command line.
pub struct Options {
    /// Clients beating at once, each on its own connection.
    pub clients: usize,
    /// Measured time per run (after a warm-up).
    pub run_for: Duration,
    /// Runs of each server (the median is reported).
    pub rounds: usize,
    /// Registrations for the memory figure (0: skip it).
    pub registrations: usize,
}

struct Echo {
    child: Child,
    addr: String,
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_echo() -> Outcome<Echo> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = super::net::die_with_bench(Command::new(exe).args(["bench", "echo-server"]))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the echo server: {e}"))?;
    let out = child.stdout.take().expect("piped stdout");
    let mut echo = Echo {
        child,
        addr: String::new(),
    };
    let mut line = String::new();
    let _ = BufReader::new(out).read_line(&mut line);
    echo.addr = line
        .trim()
        .strip_prefix("echo ready ")
        .ok_or_else(|| format!("the echo server did not start (it printed {line:?})"))?
        .to_string();
    Ok(echo)
}

/// The bare server: Heartbeat answered at once; everything else UNIMPLEMENTED.
struct Bare;

#[tonic::async_trait]
impl pb::registry_server::Registry for Bare {
    async fn register_client(
        &self,
        _: tonic::Request<pb::RegisterClientRequest>,
    ) -> Result<tonic::Response<pb::RegisterClientResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::RegisterClientResponse {
            client_id: "c-echo".into(),
            success: true,
            heartbeat_interval_seconds: 60,
            heartbeat_interval_ms: 60_000,
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        _: tonic::Request<pb::HeartbeatRequest>,
    ) -> Result<tonic::Response<pb::HeartbeatResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::HeartbeatResponse {
            success: true,
            received_at: Some(std::time::SystemTime::now().into()),
            heartbeat_interval_seconds: 60,
            heartbeat_interval_ms: 60_000,
            ..Default::default()
        }))
    }

    async fn unregister_client(
        &self,
        _: tonic::Request<pb::UnregisterClientRequest>,
    ) -> Result<tonic::Response<pb::UnregisterClientResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("echo server"))
    }

    async fn list_clients(
        &self,
        _: tonic::Request<pb::ListClientsRequest>,
    ) -> Result<tonic::Response<pb::ListClientsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("echo server"))
    }

    async fn get_client(
        &self,
        _: tonic::Request<pb::GetClientRequest>,
    ) -> Result<tonic::Response<pb::ClientInfo>, tonic::Status> {
        Err(tonic::Status::unimplemented("echo server"))
    }
}

/// `lodge bench echo-server`: serves [`Bare`] on a free loopback port, with the node's I/O
/// runtime shape (2 worker threads), until killed.
pub fn serve_echo() -> i32 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("echo ready {}", listener.local_addr().unwrap());
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(pb::registry_server::RegistryServer::new(Bare))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    0
}

async fn connect(addr: &str, token: Option<&str>) -> Outcome<RegistryClient<Channel>> {
    let tls = ClientTls {
        bearer: token.map(String::from),
        ..Default::default()
    };
    let ch = client::connect(addr, &tls)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    Ok(RegistryClient::new(ch))
}

async fn register(c: &mut RegistryClient<Channel>, name: String) -> Outcome<String> {
    let r = c
        .register_client(pb::RegisterClientRequest {
            client_name: name,
            namespace: "bench".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("RegisterClient: {:?}: {}", e.code(), e.message()))?;
    Ok(r.into_inner().client_id)
}

/// Heartbeats per second from `ids.len()` clients, each on its own connection, for `duration`
/// after a warm-up.
async fn beats(
    addr: &str,
    token: Option<&str>,
    ids: &[String],
    duration: Duration,
) -> Outcome<(f64, Failures)> {
    let start_at = Instant::now() + Duration::from_millis(500);
    let end_at = start_at + duration;
    let mut tasks = Vec::new();
    for id in ids {
        let mut c = connect(addr, token).await?;
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let mut failed = Failures::default();
            loop {
                let now = Instant::now();
                if now >= end_at {
                    return (ok, failed);
                }
                let r = c
                    .heartbeat(pb::HeartbeatRequest {
                        client_id: id.clone(),
                        ..Default::default()
                    })
                    .await;
                if now >= start_at {
                    match r {
                        Ok(a) if a.get_ref().success => ok += 1,
                        Ok(a) => failed.add(format!(
                            "Heartbeat answered success = false: {}",
                            a.get_ref().message
                        )),
                        Err(e) => failed.add(format!("Heartbeat: {:?}: {}", e.code(), e.message())),
                    }
                }
            }
        }));
    }
    let mut ok = 0;
    let mut failed = Failures::default();
    for t in tasks {
        match t.await {
            Ok((o, f)) => {
                ok += o;
                failed.merge(f);
            }
            Err(e) => failed.add(format!("a client task: {e}")),
        }
    }
    Ok((ok as f64 / duration.as_secs_f64(), failed))
}

fn node(env: &[(&str, &str)]) -> Outcome<Proc> {
    Ok(start_lodge_with(1, env)?.remove(0))
}

pub fn run(o: &Options) -> Outcome {
    super::on_io_runtime(|io| measure(io, o))
}

fn measure(io: &tokio::runtime::Runtime, o: &Options) -> Outcome {
    let &Options {
        clients,
        run_for: duration,
        rounds,
        registrations,
    } = o;
    println!(
        "lodge bench heartbeat: {clients} clients (one connection each), {:.1} s per run, {rounds} rounds, 2 CPUs shared by servers and load",
        duration.as_secs_f64()
    );
    let echo = start_echo()?;
    let usual = node(&[])?;
    let renewing = node(&[
        ("LODGE_REGISTRY__HEARTBEAT_INTERVAL_MS", "1"),
        ("LODGE_REGISTRY__MAX_MISSED_HEARTBEATS", "60000"),
    ])?;
    // Auth's cost, beside the default configuration in the same run.
    let auth = super::auth::BenchAuth::new()?;
    let token = auth.token(&[lodge_grpc::auth::Role::RegistryClient], None)?;
    let authed = node(&auth.env())?;
    let register_all = |addr: String, token: Option<String>| -> Outcome<Vec<String>> {
        io.block_on(async move {
            let mut c = connect(&addr, token.as_deref()).await?;
            let mut ids = Vec::new();
            for i in 0..clients {
                ids.push(register(&mut c, format!("bench-{i}")).await?);
            }
            Ok(ids)
        })
    };
    let usual_ids = register_all(usual.client.clone(), None)?;
    let renewing_ids = register_all(renewing.client.clone(), None)?;
    let authed_ids = register_all(authed.client.clone(), Some(token.clone()))?;
    let echo_ids = vec!["c-echo".to_string(); clients];
    let (mut e, mut u, mut r, mut a) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut failures = Failures::default();
    for round in 0..rounds {
        // Alternate the order, so that neither side always runs on a warmer machine.
        let mut order = [0, 1, 2, 3];
        order.rotate_left(round % 4);
        for which in order {
            let (rate, failed) = match which {
                0 => io.block_on(beats(&echo.addr, None, &echo_ids, duration))?,
                1 => io.block_on(beats(&usual.client, None, &usual_ids, duration))?,
                2 => io.block_on(beats(&renewing.client, None, &renewing_ids, duration))?,
                _ => io.block_on(beats(&authed.client, Some(&token), &authed_ids, duration))?,
            };
            failures.merge(failed);
            [&mut e, &mut u, &mut r, &mut a][which].push(rate);
        }
    }
    let (e, u, r, a) = (median(e), median(u), median(r), median(a));
    println!();
    println!("| server | heartbeats/s (median) | ÷ bare tonic |");
    println!("|---|---|---|");
    println!("| bare tonic unary (same RPC, no work) | {e:.0} | 1.00 |");
    println!("| Lodge Heartbeat | {u:.0} | {:.2} |", u / e);
    println!(
        "| Lodge Heartbeat, lease renewed through raft on every beat | {r:.0} | {:.2} |",
        r / e
    );
    println!(
        "| Lodge Heartbeat, auth on (a JWT checked on every beat) | {a:.0} | {:.2} |",
        a / e
    );
    println!("auth on / auth off (Lodge Heartbeat): {:.2}", a / u);
    println!("failed heartbeats: {}", failures.count);
    drop(usual);
    drop(renewing);
    drop(authed);
    drop(echo);
    failures.check("heartbeats")?;

    if registrations == 0 {
        return Ok(());
    }
    // Memory: a fresh node, then `registrations` clients registered by 64 concurrent callers;
    // then the same node restarted on its data, once it has rebuilt every client actor (its
    // steady state, without what the registration burst left in the allocator).
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let addr = format!("127.0.0.1:{}", free_port());
    let args = ["--listen".to_string(), addr.clone()];
    let env = [("LODGE_LOG__LEVEL", "warning")];
    let child = Killed(launch(&args, dir.path(), &env)?);
    let before = rss_of(&child.0.id().to_string());
    let t = Instant::now();
    let target = addr.clone();
    io.block_on(async move {
        let mut tasks = Vec::new();
        let per = registrations.div_ceil(64);
        for w in 0..64 {
            let addr = target.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = connect(&addr, None).await?;
                for i in (w * per)..((w + 1) * per).min(registrations) {
                    register(&mut c, format!("mem-{i}")).await?;
                }
                Ok::<_, String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| format!("a registering task: {e}"))??;
        }
        Ok::<_, String>(())
    })?;
    let took = t.elapsed();
    let after = rss_of(&child.0.id().to_string());
    drop(child);
    let restarted_at = Instant::now();
    let child = Killed(launch(&args, dir.path(), &env)?);
    io.block_on(all_actors_back(&addr, registrations))?;
    let reloaded = restarted_at.elapsed();
    let steady = rss_of(&child.0.id().to_string());
    drop(child);
    let per = |b: u64| b.saturating_sub(before) as f64 / registrations as f64 / 1024.0;
    println!();
    println!("| registrations | empty node RSS | after registering | restarted, actors rebuilt | per registration (restarted) | registering took | restart to all actors |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {registrations} | {:.1} MB | {:.1} MB | {:.1} MB | {:.2} KB | {:.1} s ({:.0}/s) | {:.1} s |",
        before as f64 / 1e6,
        after as f64 / 1e6,
        steady as f64 / 1e6,
        per(steady),
        took.as_secs_f64(),
        registrations as f64 / took.as_secs_f64(),
        reloaded.as_secs_f64()
    );
    Ok(())
}

/// A node process killed and reaped on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the restarted node at `addr` has rebuilt the actor of every registration (at
/// most 10 minutes: 100 k take seconds).
async fn all_actors_back(addr: &str, registrations: usize) -> Outcome {
    use lodge_grpc::pb::admin::{admin_client::AdminClient, GetActorRequest};
    let ch = client::connect(addr, &ClientTls::default())
        .await
        .map_err(|e| format!("connecting to the restarted node: {e}"))?;
    let mut admin = AdminClient::new(ch);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = admin
            .get_actor(GetActorRequest {
                path: "/node/registry/index".into(),
            })
            .await
            .map_err(|e| format!("the registry index: {:?}: {}", e.code(), e.message()))?
            .into_inner();
        let state: serde_json::Value = serde_json::from_str(&r.state_json)
            .map_err(|e| format!("the registry index's state: {e}"))?;
        let actors = state["actors"].as_u64();
        if actors == Some(registrations as u64) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the restarted node rebuilt {actors:?} of {registrations} client actors in 10 minutes"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
