//! End-to-end: the session router's protocol against real `lodge` processes, with users and agents
//! written on the router client library (the CLI's own tests are in `tests/tunnel.rs`).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{eventually, Node, Trio};
use lodge_grpc::client::{connect, ClientTls};
use lodge_grpc::pb::router::{frame, user_init, AgentInit, Exec, Frame, UserInit};
use lodge_grpc::router_client::{data, new_session_key, RouterClient, Tunnel};
use tonic::Code;

const SECRET: &str = "router-tests-secret-0123456789abcdef";

fn env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("LODGE_AUTH__ENABLED", "true"),
        ("LODGE_AUTH__HS256_SECRET", SECRET),
    ]
}

fn token(roles: &[&str]) -> String {
    common::jwt(SECRET, "tests", roles, None)
}

async fn client(endpoint: &str, roles: &[&str]) -> RouterClient {
    let ch = connect(endpoint, &ClientTls::default()).await.unwrap();
    RouterClient::new(ch, Some(&token(roles))).unwrap()
}

fn exec_init(key: &str, workflow: &str) -> UserInit {
    UserInit {
        session_key: key.into(),
        workflow_id: workflow.into(),
        operation: Some(user_init::Operation::Exec(Exec {
            command: vec!["cat".into()],
            ..Default::default()
        })),
    }
}

fn agent_init(key: &str, workflow: &str) -> AgentInit {
    AgentInit {
        session_key: key.into(),
        workflow_id: workflow.into(),
    }
}

/// The next frame; panics on an error or the end.
async fn next(rx: &mut tonic::Streaming<Frame>) -> Frame {
    rx.message().await.unwrap().expect("a frame")
}

fn is_eof(f: &Frame) -> bool {
    matches!(f.control, Some(frame::Control::Eof(_)))
}

/// Waits until a user tunnel is paired, while an agent joins from another task.
async fn pair(
    user: &RouterClient,
    agent: &RouterClient,
    key: &str,
    agent_first: bool,
) -> (Tunnel, Tunnel) {
    let (u, a) = (user.clone(), agent.clone());
    let (k1, k2) = (key.to_string(), key.to_string());
    if agent_first {
        let agent_side = tokio::spawn(async move { a.open_agent(agent_init(&k2, "wf")).await });
        // The agent is waiting in the session before the user arrives.
        let _ = &k1;
        let user_side = u.open_user(exec_init(&k1, "wf")).await.unwrap();
        let (agent_side, init) = agent_side.await.unwrap().unwrap();
        assert_eq!(init.session_key, key);
        (user_side, agent_side)
    } else {
        let user_side = tokio::spawn(async move { u.open_user(exec_init(&k1, "wf")).await });
        let (agent_side, init) = a.open_agent(agent_init(&k2, "wf")).await.unwrap();
        assert!(
            matches!(init.operation, Some(user_init::Operation::Exec(_))),
            "the agent learns the user's request"
        );
        (user_side.await.unwrap().unwrap(), agent_side)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_pairs_either_way_round_and_half_close_keeps_the_other_direction() {
    let node = Node::start_env(&[], &env());
    let user = client(&node.grpc, &["exec"]).await;
    let agent = client(&node.grpc, &["agent"]).await;
    for agent_first in [false, true] {
        let key = new_session_key();
        let (mut u, mut a) = pair(&user, &agent, &key, agent_first).await;
        u.tx.send(data(Bytes::from_static(b"question")))
            .await
            .unwrap();
        assert_eq!(next(&mut a.rx).await.data, Bytes::from_static(b"question"));
        drop(u.tx); // the user finished sending
        assert!(is_eof(&next(&mut a.rx).await), "the agent is told");
        // ... and still answers: the user's direction being closed does not end the session.
        a.tx.send(data(Bytes::from_static(b"answer")))
            .await
            .unwrap();
        assert_eq!(next(&mut u.rx).await.data, Bytes::from_static(b"answer"));
        drop(a.tx);
        let mut u_rx = u.rx;
        let f = u_rx.message().await.unwrap().unwrap();
        assert!(is_eof(&f));
        assert!(
            u_rx.message().await.unwrap().is_none(),
            "the call ends with OK"
        );
        assert!(a.rx.message().await.unwrap().is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_refuses_duplicates_wrong_workflows_and_bad_init_without_touching_the_session() {
    let node = Node::start_env(&[], &env());
    let user = client(&node.grpc, &["exec"]).await;
    let agent = client(&node.grpc, &["agent"]).await;
    let key = new_session_key();
    let (u, mut a) = pair(&user, &agent, &key, false).await;

    let dup = agent
        .open_agent(agent_init(&key, "wf"))
        .await
        .err()
        .unwrap();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    let dup = user.open_user(exec_init(&key, "wf")).await.err().unwrap();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");
    // The live session still works.
    u.tx.send(data(Bytes::from_static(b"still here")))
        .await
        .unwrap();
    assert_eq!(
        next(&mut a.rx).await.data,
        Bytes::from_static(b"still here")
    );

    let other = new_session_key();
    let waiting = {
        let user = user.clone();
        let other = other.clone();
        tokio::spawn(async move { user.open_user(exec_init(&other, "wf")).await })
    };
    let admin = client(&node.grpc, &["admin"]).await;
    eventually("the user is waiting", || {
        let (admin, other) = (admin.clone(), other.clone());
        futures_now(async move { admin.info(&other, Duration::from_secs(5)).await })
            .ok()
            .filter(|i| i.user_connected)
    });
    let wrong = agent
        .open_agent(agent_init(&other, "another-workflow"))
        .await
        .err()
        .unwrap();
    assert_eq!(wrong.code(), Code::PermissionDenied);
    assert!(wrong.message().contains("workflow_id"), "{wrong:?}");
    // The right agent still gets the waiting user.
    let (mut a2, _) = agent.open_agent(agent_init(&other, "wf")).await.unwrap();
    let u2 = waiting.await.unwrap().unwrap();
    u2.tx.send(data(Bytes::from_static(b"x"))).await.unwrap();
    assert_eq!(next(&mut a2.rx).await.data, Bytes::from_static(b"x"));

    let mut bad = exec_init(&new_session_key(), "wf");
    bad.workflow_id = "w".repeat(300);
    let e = user.open_user(bad).await.err().unwrap();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("workflow_id"), "{e:?}");
    let mut no_op = exec_init(&new_session_key(), "wf");
    no_op.operation = None;
    assert_eq!(
        user.open_user(no_op).await.err().unwrap().code(),
        Code::InvalidArgument
    );
}

/// Runs `f` to completion on a fresh runtime thread (for `eventually`, which is synchronous).
fn futures_now<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_times_out_a_lonely_side_and_terminates_on_request() {
    let mut e = env();
    e.push(("LODGE_ROUTER__RENDEZVOUS_TIMEOUT_MS", "300"));
    let node = Node::start_env(&[], &e);
    let user = client(&node.grpc, &["exec"]).await;
    let agent = client(&node.grpc, &["agent"]).await;
    let admin = client(&node.grpc, &["admin"]).await;

    let lonely = user
        .open_user(exec_init(&new_session_key(), "wf"))
        .await
        .err()
        .unwrap();
    assert_eq!(lonely.code(), Code::DeadlineExceeded, "{lonely:?}");

    let key = new_session_key();
    let (mut u, mut a) = pair(&user, &agent, &key, false).await;
    let info = admin.info(&key, Duration::from_secs(5)).await.unwrap();
    assert!(info.active && info.user_connected && info.agent_connected);
    assert_eq!(info.operation_type, "exec");
    let listed = admin.list("wf", Duration::from_secs(5)).await.unwrap();
    assert!(listed.iter().any(|s| s.session_key == key));
    assert!(admin
        .terminate(&key, "maintenance", Duration::from_secs(5))
        .await
        .unwrap());
    for t in [&mut u, &mut a] {
        let end = t.rx.message().await.expect_err("ABORTED");
        assert_eq!(end.code(), Code::Aborted);
        assert!(end.message().contains("maintenance"), "{end:?}");
    }
    let gone = eventually("the session is gone", || {
        futures_now({
            let admin = admin.clone();
            let key = key.clone();
            async move { admin.info(&key, Duration::from_secs(5)).await }
        })
        .err()
    });
    assert_eq!(gone.code(), Code::NotFound);
    let metrics = node.scrape();
    assert!(
        metrics.contains("lodge_router_errors_total{operation=\"exec\",code=\"aborted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lodge_router_sessions_expired_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_requires_a_valid_token_with_the_right_role() {
    let node = Node::start_env(&[], &env());
    let ch = connect(&node.grpc, &ClientTls::default()).await.unwrap();
    let anonymous = RouterClient::new(ch.clone(), None).unwrap();
    let e = anonymous
        .open_user(exec_init("k", "wf"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::Unauthenticated);
    let forged = RouterClient::new(ch.clone(), Some("eyJhbGciOiJIUzI1NiJ9.e30.bad")).unwrap();
    assert_eq!(
        forged
            .list("", Duration::from_secs(5))
            .await
            .err()
            .unwrap()
            .code(),
        Code::Unauthenticated
    );
    let port_forwarder = client(&node.grpc, &["port-forward"]).await;
    let e = port_forwarder
        .open_user(exec_init("k", "wf"))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("exec"));
    assert_eq!(
        port_forwarder.listen("wf").await.err().unwrap().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        port_forwarder
            .terminate("k", "", Duration::from_secs(5))
            .await
            .err()
            .unwrap()
            .code(),
        Code::PermissionDenied
    );
    let log = node.stderr();
    assert!(
        !log.contains(&token(&["port-forward"])[..20]),
        "tokens never reach the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_offers_sessions_to_listening_agents() {
    let node = Node::start_env(&[], &env());
    let user = client(&node.grpc, &["exec"]).await;
    let agent = client(&node.grpc, &["agent"]).await;
    let mut offers = agent.listen("wf").await.unwrap();
    let key = new_session_key();
    let waiting = {
        let (user, key) = (user.clone(), key.clone());
        tokio::spawn(async move { user.open_user(exec_init(&key, "wf")).await })
    };
    let offer = offers.message().await.unwrap().unwrap();
    assert_eq!(
        (offer.session_key.as_str(), offer.operation.as_str()),
        (key.as_str(), "exec")
    );
    let (_a, init) = agent.open_agent(agent_init(&key, "wf")).await.unwrap();
    assert_eq!(init.session_key, key);
    waiting.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_ends_a_session_whose_reader_stopped_reading() {
    let mut e = env();
    e.push(("LODGE_ROUTER__STALL_TIMEOUT_MS", "500"));
    let node = Node::start_env(&[], &e);
    let user = client(&node.grpc, &["exec"]).await;
    let agent = client(&node.grpc, &["agent"]).await;
    let (u, _agent_never_reads) = pair(&user, &agent, &new_session_key(), false).await;
    // Far more than the windows and queues hold: the router must give up, not buffer it all.
    let chunk = Bytes::from(vec![7u8; 128 * 1024]);
    let writer = tokio::spawn(async move {
        for _ in 0..2048 {
            if u.tx.send(data(chunk.clone())).await.is_err() {
                break;
            }
        }
        u
    });
    let mut u = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer is released")
        .unwrap();
    let end = loop {
        match u.rx.message().await {
            Err(s) => break s,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("ended without an error"),
        }
    };
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    // The session's actor counts it once the end reaches it, just after the callers see it.
    eventually("the stall is counted", || {
        let m = node.scrape();
        m.contains("lodge_router_flow_control_timeouts_total 1")
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_relays_a_side_to_the_member_that_owns_the_session() {
    let trio = Trio::new("", &[]);
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let id = (i + 1).to_string();
            let peer = trio.peer(i);
            let args = [
                "--node-id",
                id.as_str(),
                "--peer-listen",
                peer.as_str(),
                "--initial-cluster",
                trio.initial.as_str(),
            ];
            Node::start_in_env(tempfile::tempdir().unwrap(), &trio.addr(i), &args, &env())
        })
        .collect();
    let user = client(&nodes[0].grpc, &["exec"]).await;
    let agent = client(&nodes[2].grpc, &["agent"]).await;
    let admin = client(&nodes[1].grpc, &["admin"]).await;
    let key = new_session_key();
    let mut offers = agent.listen("wf").await.unwrap();
    // Until a leader is elected the router has no owner lease; the user's call waits for it.
    let waiting = {
        let (user, key) = (user.clone(), key.clone());
        tokio::spawn(async move { user.open_user(exec_init(&key, "wf")).await })
    };
    let offer = offers.message().await.unwrap().unwrap();
    assert_eq!(
        offer.session_key, key,
        "an agent on another member hears of the session"
    );
    let (mut a, _) = agent.open_agent(agent_init(&key, "wf")).await.unwrap();
    let mut u = waiting.await.unwrap().unwrap();
    u.tx.send(data(Bytes::from_static(b"across")))
        .await
        .unwrap();
    assert_eq!(next(&mut a.rx).await.data, Bytes::from_static(b"across"));
    a.tx.send(data(Bytes::from_static(b"back"))).await.unwrap();
    assert_eq!(next(&mut u.rx).await.data, Bytes::from_static(b"back"));
    let info = admin.info(&key, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        info.owner, 1,
        "the member the user reached owns the session"
    );
    assert!(info.active);
    drop((u.tx, a.tx));
    let mut u_rx = u.rx;
    assert!(is_eof(&u_rx.message().await.unwrap().unwrap()));
    assert!(u_rx.message().await.unwrap().is_none());

    // The other way round: the agent is first, so its member owns the session, and the user's
    // call is relayed there; it is still told, before pairing, how long the owner waits.
    let key = new_session_key();
    let agent_first = {
        let (agent, key) = (agent.clone(), key.clone());
        tokio::spawn(async move { agent.open_agent(agent_init(&key, "wf")).await })
    };
    eventually("the agent waits on the member it reached", || {
        let (admin, key) = (admin.clone(), key.clone());
        futures_now(async move { admin.info(&key, Duration::from_secs(5)).await })
            .ok()
            .filter(|i| i.agent_connected && i.owner == 3)
    });
    let rendezvous = user.start_user(exec_init(&key, "wf")).await.unwrap();
    assert_eq!(rendezvous.timeout, Some(Duration::from_secs(60)));
    let u = rendezvous.paired().await.unwrap();
    let (a, _) = agent_first.await.unwrap().unwrap();
    drop((u.tx, a.tx));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_carries_200_concurrent_sessions() {
    let node = Node::start_env(&[], &env());
    let user = client(&node.grpc, &["exec"]).await;
    let agent = client(&node.grpc, &["agent"]).await;
    let mut running = Vec::new();
    for i in 0..200u32 {
        let (user, agent) = (user.clone(), agent.clone());
        running.push(tokio::spawn(async move {
            let key = format!("many-{i}");
            let (mut u, mut a) = pair(&user, &agent, &key, i % 2 == 0).await;
            let msg = Bytes::from(format!("hello {i}"));
            u.tx.send(data(msg.clone())).await.unwrap();
            assert_eq!(next(&mut a.rx).await.data, msg);
            a.tx.send(data(msg.clone())).await.unwrap();
            assert_eq!(next(&mut u.rx).await.data, msg);
            drop((u.tx, a.tx));
            let mut u_rx = u.rx;
            assert!(is_eof(&u_rx.message().await.unwrap().unwrap()));
            assert!(u_rx.message().await.unwrap().is_none());
        }));
    }
    for r in running {
        r.await.unwrap();
    }
    let active = eventually("every session ended", || {
        let m = node.scrape();
        (!m.contains("lodge_router_sessions_active{operation=\"exec\"} 1")
            && m.contains("lodge_router_sessions_active{operation=\"exec\"} 0"))
        .then_some(m)
    });
    assert!(
        active.contains("lodge_router_bytes_total{operation=\"exec\",direction=\"user_to_agent\"}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_ends_an_idle_session() {
    let mut e = env();
    e.push(("LODGE_ROUTER__IDLE_TIMEOUT_MS", "300"));
    let node = Node::start_env(&[], &e);
    let user = client(&node.grpc, &["exec"]).await;
    let agent = client(&node.grpc, &["agent"]).await;
    let (mut u, mut a) = pair(&user, &agent, &new_session_key(), false).await;
    for t in [&mut u, &mut a] {
        let end = t.rx.message().await.expect_err("DEADLINE_EXCEEDED");
        assert_eq!(end.code(), Code::DeadlineExceeded);
        assert!(end.message().contains("idle"), "{end:?}");
    }
    eventually("the expiry is counted", || {
        let m = node.scrape();
        m.contains("lodge_router_sessions_expired_total 1")
            .then_some(())
    });
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_memory_stays_bounded_while_a_reader_is_slow() {
    let node = Node::start_env(&[], &env());
    let user = client(&node.grpc, &["exec"]).await;
    let agent = client(&node.grpc, &["agent"]).await;
    let (u, mut a) = pair(&user, &agent, &new_session_key(), false).await;
    let before = rss_kib(node.pid());
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let chunk = Bytes::from(vec![1u8; 128 * 1024]);
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            // 512 MiB offered; flow control must hold the writer back long before.
            for _ in 0..4096 {
                if u.tx.send(data(chunk.clone())).await.is_err() {
                    return;
                }
                sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    // The agent reads nothing for a while. A slower machine only sends less in this time, so the
    // bound below cannot fail for lack of speed; it fails if the router buffers without limit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let offered = sent.load(std::sync::atomic::Ordering::Relaxed);
    let grown_kib = rss_kib(node.pid()).saturating_sub(before);
    eprintln!("slow reader: writer got {offered} bytes in; router grew {grown_kib} KiB");
    assert!(
        offered < 48 << 20,
        "the writer got {offered} bytes in while the reader read nothing"
    );
    assert!(grown_kib < 64 * 1024, "the router grew by {grown_kib} KiB");
    // Reading again releases the writer: nothing was lost on the way.
    let mut got = 0u64;
    while got < offered {
        got += next(&mut a.rx).await.data.len() as u64;
    }
    writer.abort();
}
