//! End-to-end: the gRPC listener's connection limits, who they apply to (loopback exempt, the
//! client named by a trusted proxy's PROXY header) and how a refused client learns which limit
//! refused it.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{kv, stderr, Node};
use lodge_grpc::pb::kv::kv_client::KvClient;
use lodge_grpc::pb::kv::{PutRequest, RangeRequest};
use tokio::io::AsyncWriteExt;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

/// The value of an unlabelled-or-labelled series on a metrics page (0 when absent).
fn series(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn three_hundred_cli_calls_from_loopback_all_succeed() {
    // The default configuration: loopback is exempt from the per-IP limits (50 new connections
    // per 10 s), so a script of CLI calls, one connection each, is never refused.
    let node = Node::start(&[]);
    for i in 0..300 {
        let out = kv(&node.grpc, &["put", &format!("script/{i}"), "v"]);
        assert!(out.status.success(), "call {i}: {}", stderr(&out));
    }
    let out = kv(&node.grpc, &["get", "script/", "--prefix", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&common::stdout(&out)).unwrap();
    assert_eq!(doc["count"], 300, "{doc}");
}

#[test]
fn a_client_over_a_per_ip_limit_is_told_which_limit() {
    // Loopback is held to the limits here, as any other address would be.
    let node = Node::start_env(
        &[],
        &[
            ("LODGE_SERVER__PER_IP_EXEMPT", ""),
            ("LODGE_SERVER__PER_IP_CONNECTION_RATE", "5"),
            ("LODGE_SERVER__PER_IP_WINDOW_MS", "600000"),
        ],
    );
    // The node's own start-up checks ask its peer address, a port with limits of its own: all
    // five of the client port's window are the CLI's.
    let outs: Vec<_> = (0..8)
        .map(|i| kv(&node.grpc, &["put", &format!("burst/{i}"), "v"]))
        .collect();
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 5, "5 new connections per window from one address");
    for refused in outs.iter().filter(|o| !o.status.success()) {
        let e = stderr(refused);
        assert!(
            e.contains("ResourceExhausted")
                && e.contains("refused by the node's connection limit (server.per_ip_connection_rate: 5 new connections per 600000 ms from 127.0.0.1)"),
            "{e}"
        );
    }
    assert_eq!(
        series(
            &node.scrape(),
            "lodge_limit_rejections_total{limit=\"ip_rate\"}"
        ),
        (8 - ok) as f64
    );

    let node = Node::start_env(
        &[],
        &[
            ("LODGE_SERVER__PER_IP_EXEMPT", "10.0.0.0/8"),
            ("LODGE_SERVER__PER_IP_MAX_CONNECTIONS", "3"),
        ],
    );
    // The node's own start-up probe of its address is a loopback connection too: wait for it
    // to close, or it would hold one of the three places.
    common::eventually("the node's own connections are closed", || {
        (series(&node.scrape(), "lodge_grpc_connections_active") == 0.0).then_some(())
    });
    let held: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(&node.grpc).unwrap())
        .collect();
    common::eventually("the held connections are counted", || {
        (series(&node.scrape(), "lodge_grpc_connections_active") >= 3.0).then_some(())
    });
    let out = kv(&node.grpc, &["get", "k"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("server.per_ip_max_connections: 3 open connections from 127.0.0.1"),
        "{e}"
    );
    drop(held);
    common::eventually("a place frees up once the held connections close", || {
        kv(&node.grpc, &["get", "k"]).status.success().then_some(())
    });
    assert!(
        series(
            &node.scrape(),
            "lodge_limit_rejections_total{limit=\"ip_concurrency\"}"
        ) >= 1.0
    );
}

/// A connection with a call in flight for as long as it is held (a grpc.health.v1 watch), so
/// that it is never the one shed to make room.
async fn busy_connection(
    endpoint: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let ch = lodge_grpc::client::connect(endpoint, &Default::default())
        .await
        .unwrap();
    let mut watch = tonic_health::pb::health_client::HealthClient::new(ch)
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();
    watch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_a_refusal_names_the_limit_even_past_the_answered_ones() {
    // max_connections = 1, taken by a connection with a call in flight: the next is refused.
    // 64 more refusals held open (each answered for 2 s) use up the answers, so later ones are
    // closed at accept and the CLI can only guess; it names the limits it may have been.
    let node = Node::start_env(&[], &[("LODGE_SERVER__MAX_CONNECTIONS", "1")]);
    let _busy = busy_connection(&node.grpc).await;
    let grpc = node.grpc.clone();
    let refused = move || kv(&grpc, &["get", "k"]);
    let out = tokio::task::spawn_blocking(refused.clone()).await.unwrap();
    let e = stderr(&out);
    assert!(
        e.contains(
            "refused by the node's connection limit (server.max_connections: 1 open connections)"
        ),
        "{e}"
    );
    let answered: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&node.grpc).unwrap())
        .collect();
    // The last of them is being answered once the server's SETTINGS arrive on it.
    let mut last = answered.last().unwrap().try_clone().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut first = [0u8; 9];
    last.read_exact(&mut first).unwrap();
    assert_eq!(first[3], 4, "an HTTP/2 SETTINGS frame");
    let out = tokio::task::spawn_blocking(refused).await.unwrap();
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("connection limit") && e.contains("server.max_connections"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_the_quietest_connection_makes_room() {
    // Two places: one connection busy with a call, one that has not spoken since it opened.
    // A newcomer sheds the silent one, not the busy one, and is served.
    let node = Node::start_env(&[], &[("LODGE_SERVER__MAX_CONNECTIONS", "2")]);
    let mut busy = busy_connection(&node.grpc).await;
    let mut silent = std::net::TcpStream::connect(&node.grpc).unwrap();
    let grpc = node.grpc.clone();
    let out = tokio::task::spawn_blocking(move || kv(&grpc, &["put", "k", "v"]))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    silent.read_to_end(&mut rest).unwrap();
    assert!(
        series(
            &node.scrape(),
            "lodge_limit_rejections_total{limit=\"connection_shed\"}"
        ) >= 1.0
    );
    // The busy connection was kept: its watch still delivers (the node's NOT_SERVING on SIGTERM).
    common::signal(node.pid(), "TERM");
    let update = busy.message().await.unwrap().unwrap();
    assert_eq!(
        update.status(),
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
}

/// A client that puts a PROXY protocol header before its HTTP/2 bytes, as a proxy would.
async fn proxied_channel(node: &str, header: Vec<u8>) -> Result<Channel, tonic::transport::Error> {
    let addr = node.to_string();
    Endpoint::from_shared(format!("http://{node}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower_fn(move |_uri: Uri| {
            let (addr, header) = (addr.clone(), header.clone());
            async move {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                s.write_all(&header).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// `tower::service_fn` without the dependency: a connector from a closure.
fn tower_fn<F>(f: F) -> FnConnector<F> {
    FnConnector(f)
}

#[derive(Clone)]
struct FnConnector<F>(F);

impl<F, Fut, T> tonic::codegen::Service<Uri> for FnConnector<F>
where
    F: FnMut(Uri) -> Fut,
    Fut: std::future::Future<Output = Result<T, std::io::Error>>,
{
    type Response = T;
    type Error = std::io::Error;
    type Future = Fut;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Fut {
        (self.0)(uri)
    }
}

fn v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40000 7400\r\n").into_bytes()
}

fn v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1, 0x9c, 0x40, 0x1c, 0xe8]);
    h
}

async fn put(ch: Channel, key: &str) -> Result<(), tonic::Status> {
    KvClient::new(ch)
        .put(PutRequest {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_names_the_client_and_nobody_else_can() {
    // The node trusts loopback as its proxy; each client may hold one connection.
    let node = Node::start_env(
        &[],
        &[
            ("LODGE_SERVER__PROXY_PROTOCOL_FROM", "127.0.0.1"),
            ("LODGE_SERVER__PER_IP_EXEMPT", ""),
            ("LODGE_SERVER__PER_IP_MAX_CONNECTIONS", "1"),
        ],
    );
    let first = proxied_channel(&node.grpc, v1("192.0.2.1")).await.unwrap();
    put(first.clone(), "a").await.unwrap();
    // The same client through the same proxy again: over its limit, and named.
    let again = proxied_channel(&node.grpc, v1("192.0.2.1")).await.unwrap();
    let s = put(again, "b").await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message()
            .contains("server.per_ip_max_connections: 1 open connections from 192.0.2.1"),
        "{s:?}"
    );
    // Another client (a v2 header this time) has its own allowance.
    let other = proxied_channel(&node.grpc, v2([192, 0, 2, 2]))
        .await
        .unwrap();
    put(other, "c").await.unwrap();
    // From the trusted proxy a header is required (the node's own start-up check of its address
    // may have been refused so already).
    let refused = |page: &str| series(page, "lodge_limit_rejections_total{limit=\"proxy_header\"}");
    let before = refused(&node.scrape());
    let out = kv(&node.grpc, &["get", "a"]);
    assert!(!out.status.success());
    let page = node.scrape();
    assert_eq!(refused(&page) - before, 1.0, "{page}");
    // The first client's connection still works.
    let mut c = KvClient::new(first);
    let r = c
        .range(RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kvs.len(), 1);

    // A node that trusts another proxy never reads a header from us: the bytes are taken as
    // the client's own, which are not HTTP/2, and the connection is refused.
    let strict = Node::start_env(&[], &[("LODGE_SERVER__PROXY_PROTOCOL_FROM", "192.0.2.250")]);
    let spoofed = proxied_channel(&strict.grpc, v1("192.0.2.9")).await;
    let refused = match spoofed {
        Err(_) => true,
        Ok(ch) => put(ch, "x").await.is_err(),
    };
    assert!(refused, "a header from an untrusted peer is refused");
    let out = kv(&strict.grpc, &["put", "x", "y"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let hz = rustix::param::clock_ticks_per_second() as f64;
    ticks / hz
}

/// Opens `n` connections to `addr` that never send a byte.
fn idle_sockets(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .filter_map(|_| {
            let addr = addr.parse().unwrap();
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()
        })
        .collect()
}

#[test]
fn two_thousand_idle_sockets_on_each_port_do_not_keep_a_client_out() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    // This process holds 4,000 sockets.
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
    let have = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    assert!(
        have >= 4500,
        "this test needs 4,500 open files; the hard limit is {have}"
    );

    // The default configuration: 1,024 gRPC and 64 metrics connections at most; loopback is
    // exempt from the per-IP limits, so nothing but the shedding keeps a place free.
    let node = Node::start(&[]);
    let grpc_idle = idle_sockets(&node.grpc, 2000);
    let metrics_idle = idle_sockets(&node.metrics, 2000);
    assert!(grpc_idle.len() > 1024 && metrics_idle.len() > 64);
    let cpu_before = cpu_seconds(node.pid());
    // A well-behaved client within its own deadline (the CLI gives up after 5 s of retries).
    let out = kv(&node.grpc, &["put", "k", "v"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kv(&node.grpc, &["get", "k"]);
    assert!(common::stdout(&out).contains('v'), "{}", stderr(&out));
    let page = node.scrape();
    assert!(page.contains("lodge_grpc_connections_active"));
    // Held sockets cost nothing while nobody speaks: over a second, the node is nearly idle.
    let cpu_mid = cpu_seconds(node.pid());
    std::thread::sleep(Duration::from_secs(1));
    let idle_cpu = cpu_seconds(node.pid()) - cpu_mid;
    assert!(
        idle_cpu < 0.3,
        "the node used {idle_cpu:.2} CPU-s in 1 s with idle sockets held"
    );
    eprintln!(
        "node CPU: {:.2} s serving the client and the scrape, {idle_cpu:.2} s in 1 s idle",
        cpu_mid - cpu_before
    );
    let shed = series(
        &page,
        "lodge_limit_rejections_total{limit=\"connection_shed\"}",
    );
    assert!(shed >= 1.0, "{page}");
    let shed = series(
        &page,
        "lodge_limit_rejections_total{limit=\"metrics_connection_shed\"}",
    );
    assert!(shed >= 1.0, "{page}");
    drop((grpc_idle, metrics_idle));
}
