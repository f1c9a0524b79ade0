//! End-to-end: the real `lodge module` process against a stub balancer served by the test
//! process, forwarding to TCP backends on the test's own threads.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::backends::echo_backend;
use common::{signal, Lodge};
use lodge_grpc::module::stub::{Seen, StubBalancer};
use lodge_grpc::pb::balancer as pb;
use lodge_grpc::pb::balancer::module_client::ModuleClient;

/// Bound on every wait; only turns a hang into a failure.
const WAIT: Duration = Duration::from_secs(20);

fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

fn start_module(stub: &StubBalancer, backend: &str, extra: &[&str]) -> Lodge {
    let mut args = vec![
        "module",
        "--type",
        "alb",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend,
        "--endpoint",
        &stub.addr,
        "--instance-id",
        "alb-e2e",
    ];
    args.extend_from_slice(extra);
    Lodge::start(&args, "module ")
}

#[test]
fn module_forwards_with_half_close_and_drains_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut stub = rt.block_on(StubBalancer::start(100)).unwrap();
    let echo = echo_backend(b"");
    let mut m = start_module(
        &stub,
        &echo,
        &["--version", "2.0.0", "--drain-timeout-ms", "15000"],
    );
    assert!(m.ready.starts_with("module alb-e2e "), "{}", m.ready);
    let (data, control) = (m.field("data"), m.field("control"));
    let Some(Seen::Register(r)) = rt.block_on(stub.next(WAIT, |e| matches!(e, Seen::Register(_))))
    else {
        panic!("no registration: {}", m.stderr())
    };
    assert_eq!(r.instance_id, "alb-e2e");
    assert_eq!(r.module_type, pb::ModuleType::Alb as i32);
    assert_eq!(r.version, "2.0.0");
    assert_eq!(
        (r.data_address.as_str(), r.control_address.as_str()),
        (data.as_str(), control.as_str())
    );

    // A megabyte through, then the client's half-close: all of it comes back, then the
    // backend's own end of stream.
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut c = TcpStream::connect(&data).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut w = c.try_clone().unwrap();
    let p = payload.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&p).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "the bytes came back changed");
    drop(c);

    // A connection left open: heartbeats count it, and the drain waits for it.
    let mut open = TcpStream::connect(&data).unwrap();
    open.set_read_timeout(Some(WAIT)).unwrap();
    round_trip(&mut open, b"hi");
    let beat = rt.block_on(stub.next(WAIT, |e| {
        // Named completely: earlier beats may have counted the same connections.
        matches!(e, Seen::Heartbeat(h) if h.stats.is_some_and(|s| {
            let all = (1 << 20) + 2;
            s.active_connections == 1
                && s.total_connections == 2
                && s.bytes_in == all
                && s.bytes_out == all
        }))
    }));
    let Some(Seen::Heartbeat(h)) = beat else {
        panic!(
            "no heartbeat counting the connections and their bytes: {}",
            m.stderr()
        )
    };
    assert_eq!(h.health, pb::HealthStatus::Healthy as i32);

    signal(m.pid(), "TERM");
    let Some(Seen::Unregister(u)) =
        rt.block_on(stub.next(WAIT, |e| matches!(e, Seen::Unregister(_))))
    else {
        panic!("no UnregisterModule after SIGTERM: {}", m.stderr())
    };
    assert_eq!(u.instance_id, "alb-e2e");
    assert!(u.graceful);
    assert_eq!(u.drain_timeout_ms, 15000);
    // The connection is still open, so the drain holds the process, and it still works.
    assert!(!m.exited(), "exited before its connection closed");
    round_trip(&mut open, b"still here");
    drop(open);
    let status = m.wait_exit(WAIT).expect("no exit after the drain");
    assert!(status.success(), "{status:?}: {}", m.stderr());
}

#[test]
fn module_settings_health_and_shutdown_over_grpc() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut stub = rt.block_on(StubBalancer::start(100)).unwrap();
    let first = echo_backend(b"");
    let second = echo_backend(b"B2:");
    let mut m = start_module(&stub, &first, &["--max-connections", "5"]);
    let (data, control) = (m.field("data"), m.field("control"));
    let Some(Seen::Register(registered)) =
        rt.block_on(stub.next(WAIT, |e| matches!(e, Seen::Register(_))))
    else {
        panic!("no registration")
    };
    let ch = rt.block_on(async {
        lodge_grpc::client::connect(&control, &Default::default())
            .await
            .unwrap()
    });
    // Anyone else who reaches the control port is refused, and the module keeps running.
    let mut anonymous = ModuleClient::new(ch.clone());
    let e = rt
        .block_on(anonymous.shutdown(pb::ShutdownRequest {
            graceful: false,
            drain_timeout_ms: 1,
        }))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(!m.exited(), "an anonymous Shutdown stopped the module");
    // The balancer (this stub) calls with the token the module registered with.
    let mut client = ModuleClient::with_interceptor(
        ch,
        lodge_grpc::module::control::Bearer::new(&registered.control_token),
    );

    let cfg = rt
        .block_on(client.get_config(pb::GetConfigRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(cfg.settings["backend"], first);
    assert_eq!(cfg.settings["max_connections"], "5");
    let upd = |k: &str, v: &str| pb::UpdateConfigRequest {
        settings: [(k.to_string(), v.to_string())].into(),
        validate_only: false,
    };
    let e = rt
        .block_on(client.update_config(upd("backend", "nowhere")))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("settings[\"backend\"]: "),
        "{}",
        e.message()
    );

    // New connections go to the new backend; a new limit is registered again.
    rt.block_on(client.update_config(upd("backend", &second)))
        .unwrap();
    let mut c = TcpStream::connect(&data).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut hello = [0u8; 3];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"B2:");
    drop(c);
    rt.block_on(client.update_config(upd("max_connections", "7")))
        .unwrap();
    let again = rt.block_on(stub.next(WAIT, |e| matches!(e, Seen::Register(_))));
    let Some(Seen::Register(r)) = again else {
        panic!("the new limit was not registered")
    };
    assert_eq!(r.max_connections, 7);

    // Deep health: the backend is connected to, with timing.
    let h = rt
        .block_on(client.health_check(pb::HealthCheckRequest { deep: true }))
        .unwrap()
        .into_inner();
    assert_eq!(h.health, pb::HealthStatus::Healthy as i32, "{h:?}");
    assert_eq!(h.checks.len(), 1);
    assert!(h.checks[0].ok && h.checks[0].name == "backend", "{h:?}");
    // Reload re-resolves the backend.
    let r = rt
        .block_on(client.reload(pb::ReloadRequest {}))
        .unwrap()
        .into_inner();
    assert!(r.reloaded, "{r:?}");
    assert!(r.message.contains(&second), "{r:?}");

    // Shutdown drains, answers, then the process exits 0.
    let r = rt
        .block_on(client.shutdown(pb::ShutdownRequest {
            graceful: true,
            drain_timeout_ms: 5000,
        }))
        .unwrap()
        .into_inner();
    assert_eq!(r.remaining_connections, 0);
    rt.block_on(stub.next(WAIT, |e| matches!(e, Seen::Unregister(u) if u.graceful)))
        .expect("no graceful UnregisterModule");
    let status = m.wait_exit(WAIT).expect("no exit after Shutdown");
    assert!(status.success(), "{status:?}: {}", m.stderr());
}
