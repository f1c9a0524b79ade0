//! `lodge port-forward`: forwards a local port to a port on the agent's loopback.
//!
//! TCP: every accepted connection is its own session, bridged both ways with half-close
//! preserved. UDP: one session carries every datagram of the forward, each frame naming its local
//! source in `peer` so that replies go back to it. The session is opened by the first datagram
//! and opened again by the next one after it ends (an idle timeout, an agent restart), so an idle
//! forward holds nothing open on the router.
//!
//! Once listening, one line goes to stdout: `lodge port-forward ready listen=ADDR`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lodge_grpc::pb::router::{frame, user_init, Frame, PortForward, Protocol, UserInit};
use lodge_grpc::router_client::{new_session_key, RouterClient};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_stream::StreamExt;

use super::agent::udp::MAX_DATAGRAM;
use super::bridge::bridge_tcp;
use super::shutdown::Shutdown;
use super::{Link, TunnelConn};

/// Arguments of `lodge port-forward`.
#[derive(clap::Args, Debug)]
pub struct PortForwardArgs {
    /// Workflow whose agent bridges the connections.
    #[arg(long)]
    pub workflow_id: String,
    /// Forward UDP datagrams instead of TCP connections.
    #[arg(long)]
    pub udp: bool,
    /// Local address to listen on (`::1` for IPv6 loopback).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// LOCAL:REMOTE ports; LOCAL 0 picks a free port (see the ready line).
    pub ports: String,
}

/// Runs `lodge port-forward` until interrupted.
pub async fn run(conn: TunnelConn, args: PortForwardArgs) -> i32 {
    let (local, remote) = match parse_ports(&args.ports) {
        Ok(p) => p,
        Err(e) => return fail(2, &e),
    };
    if args.workflow_id.is_empty() {
        return fail(2, "--workflow-id: must not be empty");
    }
    // Before anything can print "ready", so that a signal right after it is handled.
    let mut shutdown = Shutdown::catch();
    let local = SocketAddr::new(args.bind, local);
    let protocol = if args.udp {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    let client = match conn.connect().await {
        Ok(c) => c,
        Err(e) => return fail(1, &e),
    };
    let opener = Arc::new(SessionOpener {
        client,
        workflow_id: args.workflow_id,
        forward: PortForward {
            protocol: protocol as i32,
            port: u32::from(remote),
        },
    });
    let forwarding = async {
        if args.udp {
            let socket = UdpSocket::bind(local)
                .await
                .map_err(|e| format!("--bind {local}: {e}"))?;
            announce(socket.local_addr());
            forward_udp(socket, async || opener.open().await).await
        } else {
            let listener = TcpListener::bind(local)
                .await
                .map_err(|e| format!("--bind {local}: {e}"))?;
            announce(listener.local_addr());
            forward_tcp(listener, opener).await
        }
    };
    tokio::select! {
        r = forwarding => match r {
            Ok(()) => 0,
            Err(e) => fail(1, &e),
        },
        () = shutdown.signalled() => 0,
    }
}

fn fail(code: i32, msg: &str) -> i32 {
    eprintln!("lodge port-forward: {msg}");
    code
}

fn announce(addr: std::io::Result<SocketAddr>) {
    match addr {
        Ok(a) => println!("lodge port-forward ready listen={a}"),
        Err(e) => eprintln!("lodge port-forward: listening, address unknown: {e}"),
    }
}

/// `LOCAL:REMOTE` as two ports; LOCAL may be 0 (any free port), REMOTE may not.
fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (local, remote) = s
        .split_once(':')
        .ok_or_else(|| format!("LOCAL:REMOTE: {s:?} is not two ports joined by ':'"))?;
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("LOCAL:REMOTE: {p:?} is not a port (0-65535)"))
    };
    let (local, remote) = (port(local)?, port(remote)?);
    if remote == 0 {
        return Err("LOCAL:REMOTE: port 0 is not a remote port".into());
    }
    Ok((local, remote))
}

/// Opens the forward's sessions, each with a fresh key.
struct SessionOpener {
    client: RouterClient,
    workflow_id: String,
    forward: PortForward,
}

impl SessionOpener {
    /// A session paired with an agent, and its key for log lines.
    async fn open(&self) -> Result<(String, Link), String> {
        let key = new_session_key();
        let init = UserInit {
            session_key: key.clone(),
            workflow_id: self.workflow_id.clone(),
            operation: Some(user_init::Operation::PortForward(self.forward)),
        };
        match super::open_user(&self.client, init, "lodge port-forward").await {
            Ok(t) => Ok((key, Link::from(t))),
            Err(e) => Err(format!("session {key}: {e}")),
        }
    }
}

async fn forward_tcp(listener: TcpListener, opener: Arc<SessionOpener>) -> Result<(), String> {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Usually out of file descriptors: pause instead of spinning, and keep serving
                // once connections close.
                eprintln!("lodge port-forward: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let opener = opener.clone();
        tokio::spawn(async move {
            if let Err(e) = forward_connection(stream, &opener).await {
                eprintln!("lodge port-forward: connection from {from}: {e}");
            }
        });
    }
}

async fn forward_connection(stream: TcpStream, opener: &SessionOpener) -> Result<(), String> {
    // Interactive protocols send small writes; batching them adds latency to the tunnel's.
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (key, link) = match opener.open().await {
        Ok(opened) => opened,
        Err(e) => {
            // A reset tells the local client the forward failed; a clean close would look like
            // a server that answered nothing.
            let _ = stream.set_zero_linger();
            return Err(e);
        }
    };
    bridge_tcp(stream, link)
        .await
        .map_err(|e| format!("session {key}: {e}"))
}

/// Forwards the datagrams arriving on `socket`, one session at a time, each made by `open`.
async fn forward_udp<F>(socket: UdpSocket, open: F) -> Result<(), String>
where
    F: AsyncFn() -> Result<(String, Link), String>,
{
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("lodge port-forward: receiving a datagram: {e}");
                continue;
            }
        };
        let first = datagram(&buf[..n], from);
        let (key, link) = match open().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("lodge port-forward: {e} (the datagram from {from} is dropped)");
                continue;
            }
        };
        match udp_session(&socket, link, first).await {
            Ok(()) => eprintln!("lodge port-forward: session {key} ended"),
            Err(e) => eprintln!("lodge port-forward: session {key}: {e}"),
        }
    }
}

/// A frame carrying one datagram from `from`.
fn datagram(data: &[u8], from: SocketAddr) -> Frame {
    Frame {
        data: Bytes::copy_from_slice(data),
        peer: from.to_string(),
        ..Default::default()
    }
}

/// Carries datagrams between `socket` and one session, starting with `first`, until the session
/// ends.
async fn udp_session(socket: &UdpSocket, link: Link, first: Frame) -> Result<(), String> {
    let Link { tx, mut rx } = link;
    if tx.send(first).await.is_err() {
        return Err("the session ended at once".into());
    }
    // Datagrams are small and bounded: one reused buffer and a copy of each costs less than a
    // fresh 64 KiB buffer per datagram.
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, from)) => {
                    if tx.send(datagram(&buf[..n], from)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => eprintln!("lodge port-forward: receiving a datagram: {e}"),
            },
            frame = rx.next() => {
                let frame = match frame {
                    None => return Ok(()),
                    Some(Err(s)) => {
                        return Err(format!("session ended: {:?}: {}", s.code(), s.message()))
                    }
                    Some(Ok(f)) => f,
                };
                match frame.control {
                    None => reply(socket, &frame).await,
                    // The agent ended the forward (it stopped, or refused it).
                    Some(frame::Control::Eof(_)) => return Ok(()),
                    Some(_) => {}
                }
            }
        }
    }
}

/// Sends a reply to the local source its frame names.
async fn reply(socket: &UdpSocket, frame: &Frame) {
    let Ok(to) = frame.peer.parse::<SocketAddr>() else {
        eprintln!(
            "lodge port-forward: a reply names no source ({:?}); dropped",
            frame.peer
        );
        return;
    };
    // UDP gives no delivery promise: a failed send is a lost datagram, not an error.
    let _ = socket.send_to(&frame.data, to).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    use super::*;
    use crate::tunnel::agent::tcp::serve_tcp;
    use crate::tunnel::agent::through_grpc::router_and_agent;
    use crate::tunnel::agent::udp::{serve_udp, UdpOptions, UdpStats};
    use crate::tunnel::agent::OperationKind;
    use crate::tunnel::link_pair;

    /// Longest any step may take before the test fails instead of hanging.
    const STEP: Duration = Duration::from_secs(5);

    #[test]
    fn ports_are_checked_with_the_field_named() {
        assert_eq!(parse_ports("0:8080"), Ok((0, 8080)));
        assert_eq!(parse_ports("5432:5432"), Ok((5432, 5432)));
        assert_eq!(
            parse_ports("8080:0").unwrap_err(),
            "LOCAL:REMOTE: port 0 is not a remote port"
        );
        assert!(parse_ports("8080")
            .unwrap_err()
            .starts_with("LOCAL:REMOTE: "));
        assert!(parse_ports("x:1")
            .unwrap_err()
            .contains("\"x\" is not a port"));
        assert!(parse_ports("1:70000").unwrap_err().contains("\"70000\""));
    }

    /// A TCP server on the loopback running `answer` on each connection; answers its port.
    async fn tcp_server<F, Fut>(answer: F) -> u16
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(answer(s));
            }
        });
        port
    }

    async fn echo(mut s: TcpStream) {
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    }

    /// A client connection forwarded to `port` through both ends over an in-memory link: the
    /// client, and the user's and the agent's tasks.
    async fn forwarded_tcp(
        port: u16,
    ) -> (
        TcpStream,
        JoinHandle<Result<(), String>>,
        JoinHandle<Result<(), String>>,
    ) {
        let (user, agent) = link_pair();
        let agent = tokio::spawn(serve_tcp(agent, port));
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(local.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = local.accept().await.unwrap();
        let user = tokio::spawn(bridge_tcp(accepted, user));
        (client, user, agent)
    }

    #[tokio::test]
    async fn tcp_carries_bytes_both_ways() {
        let port = tcp_server(echo).await;
        let (client, user, agent) = forwarded_tcp(port).await;
        // More than a few chunks, in a pattern that shows reordering or loss.
        let sent: Vec<u8> = (0..3 * MAX_DATAGRAM as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let (mut r, mut w) = client.into_split();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                w.write_all(&sent).await.unwrap();
                w.shutdown().await.unwrap();
            })
        };
        let mut got = Vec::new();
        timeout(STEP, r.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the echo differs from what was sent");
        assert_eq!(timeout(STEP, user).await.unwrap().unwrap(), Ok(()));
        assert_eq!(timeout(STEP, agent).await.unwrap().unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn tcp_half_close_lets_the_answer_through() {
        // Answers only once it has read end-of-file, as a request-then-response protocol does.
        let port = tcp_server(|mut s: TcpStream| async move {
            let mut request = Vec::new();
            s.read_to_end(&mut request).await.unwrap();
            let answer = format!("got {} bytes", request.len());
            s.write_all(answer.as_bytes()).await.unwrap();
        })
        .await;
        let (mut client, user, agent) = forwarded_tcp(port).await;
        client.write_all(b"hello world").await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        timeout(STEP, client.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, "got 11 bytes");
        assert_eq!(timeout(STEP, user).await.unwrap().unwrap(), Ok(()));
        assert_eq!(timeout(STEP, agent).await.unwrap().unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn tcp_connect_failure_ends_the_session() {
        // A port nothing listens on: bound, then released.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (mut client, user, agent) = forwarded_tcp(port).await;
        let err = timeout(STEP, agent).await.unwrap().unwrap().unwrap_err();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        // The local client sees the end of the connection.
        let mut rest = Vec::new();
        let n = timeout(STEP, client.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        drop(client);
        timeout(STEP, user).await.unwrap().unwrap().ok();
    }

    /// A UDP echo server on 127.0.0.1; answers its port.
    async fn udp_echo() -> u16 {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                socket.send_to(&buf[..n], from).await.unwrap();
            }
        });
        port
    }

    /// A UDP forward on `bind` to `port`, through both ends over an in-memory link: the local
    /// address, the user's task (abort it to stop forwarding) and the agent's.
    async fn forwarded_udp(
        bind: IpAddr,
        port: u16,
        opts: UdpOptions,
    ) -> (
        SocketAddr,
        JoinHandle<Result<(), String>>,
        JoinHandle<Result<UdpStats, String>>,
    ) {
        let (user, agent) = link_pair();
        let agent = tokio::spawn(serve_udp(agent, port, opts));
        let socket = UdpSocket::bind((bind, 0)).await.unwrap();
        let local = socket.local_addr().unwrap();
        let session = Mutex::new(Some(user));
        let user = tokio::spawn(forward_udp(socket, async move || {
            let link = session.lock().unwrap().take();
            link.map(|l| ("s-test".to_string(), l))
                .ok_or_else(|| "no second session in this test".to_string())
        }));
        (local, user, agent)
    }

    async fn client(to: SocketAddr) -> UdpSocket {
        let s = UdpSocket::bind((to.ip(), 0)).await.unwrap();
        s.connect(to).await.unwrap();
        s
    }

    async fn round_trip(client: &UdpSocket, msg: &[u8]) {
        client.send(msg).await.unwrap();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = timeout(STEP, client.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], msg);
    }

    /// Stops the user's side and answers what the agent's did.
    async fn stop(
        user: JoinHandle<Result<(), String>>,
        agent: JoinHandle<Result<UdpStats, String>>,
    ) -> UdpStats {
        user.abort();
        timeout(STEP, agent).await.unwrap().unwrap().unwrap()
    }

    async fn udp_echo_from(bind: IpAddr) {
        let port = udp_echo().await;
        let (local, user, agent) = forwarded_udp(bind, port, UdpOptions::default()).await;
        let (a, b) = (client(local).await, client(local).await);
        round_trip(&a, b"from a").await;
        round_trip(&b, b"from b").await;
        round_trip(&a, b"from a again").await;
        let big = vec![7u8; 60_000];
        round_trip(&b, &big).await;
        let stats = stop(user, agent).await;
        assert_eq!(stats.sources, 2);
        assert_eq!(stats.reaped, 0);
    }

    #[tokio::test]
    async fn udp_echo_over_ipv4() {
        udp_echo_from(IpAddr::from([127, 0, 0, 1])).await;
    }

    #[tokio::test]
    async fn udp_echo_over_ipv6() {
        let v6 = IpAddr::from(std::net::Ipv6Addr::LOCALHOST);
        if let Err(e) = std::net::UdpSocket::bind((v6, 0)) {
            eprintln!("skipped: ::1 cannot be bound here ({e})");
            return;
        }
        udp_echo_from(v6).await;
    }

    #[tokio::test]
    async fn udp_idle_sources_are_reaped() {
        let port = udp_echo().await;
        let opts = UdpOptions {
            idle: Duration::from_secs(5),
            ..UdpOptions::default()
        };
        let (local, user, agent) = forwarded_udp(IpAddr::from([127, 0, 0, 1]), port, opts).await;
        let a = client(local).await;
        round_trip(&a, b"one").await;
        // Paused, the clock jumps to the next timer whenever every task waits: the source's idle
        // timer fires (and its end is handled) before this sleep's.
        tokio::time::pause();
        tokio::time::sleep(opts.idle * 2).await;
        tokio::time::resume();
        round_trip(&a, b"two").await;
        let stats = stop(user, agent).await;
        assert_eq!(stats.sources, 2, "{stats:?}");
        assert_eq!(stats.reaped, 1, "{stats:?}");
    }

    #[tokio::test]
    async fn udp_sources_past_the_limit_are_dropped() {
        let port = udp_echo().await;
        let opts = UdpOptions {
            max_sources: 1,
            ..UdpOptions::default()
        };
        let (local, user, agent) = forwarded_udp(IpAddr::from([127, 0, 0, 1]), port, opts).await;
        let (a, b) = (client(local).await, client(local).await);
        round_trip(&a, b"first source").await;
        b.send(b"second source").await.unwrap();
        // Frames are handled in order: once this answer is back, b's datagram was dropped.
        round_trip(&a, b"first again").await;
        let stats = stop(user, agent).await;
        assert_eq!(stats.sources, 1, "{stats:?}");
        assert_eq!(stats.over_limit, 1, "{stats:?}");
    }

    /// The user's own session opener, on a stand-in router with a real agent behind it.
    async fn opener_through_grpc(
        allow: OperationKind,
        protocol: Protocol,
        port: u16,
    ) -> SessionOpener {
        SessionOpener {
            client: router_and_agent(vec![allow]).await,
            workflow_id: "w".into(),
            forward: PortForward {
                protocol: protocol as i32,
                port: u32::from(port),
            },
        }
    }

    #[tokio::test]
    async fn tcp_forward_through_grpc_serves_each_connection() {
        let port = tcp_server(echo).await;
        let opener = opener_through_grpc(OperationKind::PortForward, Protocol::Tcp, port).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let forwarding = tokio::spawn(forward_tcp(listener, Arc::new(opener)));
        let mut connections = tokio::task::JoinSet::new();
        for i in 0..3 {
            connections.spawn(async move {
                let mut c = TcpStream::connect(local).await.unwrap();
                let sent = format!("connection {i};").repeat(20_000);
                let (mut r, mut w) = c.split();
                let write = async {
                    w.write_all(sent.as_bytes()).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let mut back = String::new();
                tokio::join!(write, r.read_to_string(&mut back)).1.unwrap();
                assert!(back == sent, "connection {i}: the echo differs");
            });
        }
        while let Some(done) = timeout(STEP, connections.join_next()).await.unwrap() {
            done.unwrap();
        }
        forwarding.abort();
    }

    #[tokio::test]
    async fn a_refused_tcp_forward_closes_the_local_connection() {
        let port = tcp_server(echo).await;
        let opener = opener_through_grpc(OperationKind::Exec, Protocol::Tcp, port).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let forwarding = tokio::spawn(forward_tcp(listener, Arc::new(opener)));
        let mut c = TcpStream::connect(local).await.unwrap();
        c.write_all(b"anyone?").await.unwrap();
        let mut rest = Vec::new();
        // A clean end or a reset: either way, nothing comes back.
        let read = timeout(STEP, c.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty() && read.map_or(true, |n| n == 0));
        forwarding.abort();
    }

    #[tokio::test]
    async fn udp_forward_through_grpc() {
        let port = udp_echo().await;
        let opener = opener_through_grpc(OperationKind::PortForward, Protocol::Udp, port).await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let forwarding = forward_udp(socket, async || opener.open().await);
        let exchanges = async {
            let (a, b) = (client(local).await, client(local).await);
            round_trip(&a, b"from a").await;
            round_trip(&b, b"from b").await;
            round_trip(&a, &[9u8; 30_000]).await;
        };
        tokio::select! {
            r = forwarding => panic!("the forward stopped: {r:?}"),
            () = exchanges => {}
        }
    }
}
