//! End-to-end: the peer port apart from the client port (issue 16, part 1). Raft is not served on
//! the client port; on the peer port a raft message must come from the member the peer's
//! certificate names; a node of another cluster can neither stream nor join; snapshot streams are
//! spooled to disk, capped, and one at a time per peer.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use lodge_grpc::client::ClientTls;
use lodge_grpc::pb::raft::{raft_client::RaftClient, MessageBatch, SnapshotChunk};
use tonic::{Code, Request};

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// An encoded raft `eraftpb.Message` heartbeat (msg_type 8), written by hand: fields 1 to 4 are
/// msg_type, to, from and term.
fn heartbeat(from: u64, to: u64, term: u64) -> Vec<u8> {
    let mut b = Vec::new();
    for (field, v) in [(1u64, 8u64), (2, to), (3, from), (4, term)] {
        varint(field << 3, &mut b);
        varint(v, &mut b);
    }
    b
}

fn cluster_id(node: &Node) -> String {
    std::fs::read_to_string(node.dir.path().join("data/cluster-id"))
        .unwrap()
        .trim()
        .to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn raft_client(addr: &str, tls: &ClientTls) -> RaftClient<lodge_grpc::client::Channel> {
    let channel = lodge_grpc::client::connect(addr, tls).await.unwrap();
    RaftClient::new(channel).max_encoding_message_size(usize::MAX)
}

/// Sends one batch as a peer of cluster `id` (none: no id); the call's outcome.
async fn send(
    client: &mut RaftClient<lodge_grpc::client::Channel>,
    id: Option<&str>,
    msg: Vec<u8>,
) -> Result<(), tonic::Status> {
    let mut req = Request::new(tokio_stream::iter([MessageBatch {
        messages: vec![msg],
    }]));
    if let Some(id) = id {
        req.metadata_mut()
            .insert("lodge-cluster-id", id.parse().unwrap());
    }
    client.send(req).await.map(|_| ())
}

fn term_of(node: &Node) -> u64 {
    let s = json_of(cluster(&node.grpc, &["status", "--json"])).expect("status");
    s["term"].as_u64().unwrap()
}

#[test]
fn raft_is_not_served_on_the_client_port() {
    let node = Node::start(&[]);
    assert_ne!(node.peer, node.grpc);
    let rt = runtime();
    let id = cluster_id(&node);
    let refused = rt.block_on(async {
        let mut c = raft_client(&node.grpc, &ClientTls::default()).await;
        send(&mut c, Some(&id), heartbeat(99, 1, 1002)).await
    });
    assert_eq!(refused.unwrap_err().code(), Code::Unimplemented);
    // The peer port takes it (no peer TLS on loopback: the sender is not authenticated).
    rt.block_on(async {
        let mut c = raft_client(&node.peer, &ClientTls::default()).await;
        send(&mut c, Some(&id), heartbeat(2, 1, 1)).await
    })
    .unwrap();
}

/// A CA and leaf certificates naming whatever a test needs, as PEM files.
struct PeerPki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: PathBuf,
}

impl PeerPki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Lodge test peer CA");
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.path().join("peer-ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        Self {
            dir,
            issuer: Issuer::new(params, key),
            ca,
        }
    }

    /// A certificate and key with these DNS names (and 127.0.0.1); answers (cert, key).
    fn leaf(&self, name: &str, dns: &[&str]) -> (PathBuf, PathBuf) {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut names: Vec<String> = dns.iter().map(|s| s.to_string()).collect();
        names.push("127.0.0.1".into());
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn client(&self, (cert, key): (PathBuf, PathBuf)) -> ClientTls {
        ClientTls {
            bearer: None,
            ca: Some(self.ca.clone()),
            cert: Some(cert),
            key: Some(key),
            domain: Some("localhost".into()),
        }
    }

    /// `LODGE_PEER__TLS__*` for a member with this certificate.
    fn env(&self, (cert, key): &(PathBuf, PathBuf)) -> Vec<(String, String)> {
        let s = |p: &Path| p.display().to_string();
        vec![
            ("LODGE_PEER__TLS__ENABLED".into(), "true".into()),
            ("LODGE_PEER__TLS__CERT_FILE".into(), s(cert)),
            ("LODGE_PEER__TLS__KEY_FILE".into(), s(key)),
            ("LODGE_PEER__TLS__CA_FILE".into(), s(&self.ca)),
        ]
    }
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
fn a_raft_message_not_from_the_certificates_member_is_dropped_and_counted() {
    let pki = PeerPki::new();
    let own = pki.leaf("member-1", &["localhost"]);
    let env = pki.env(&own);
    let node = Node::start_env(&[], &env_refs(&env));
    let id = cluster_id(&node);
    eventually("a leader", || leader_of(&node));
    let term = term_of(&node);
    let rt = runtime();
    // Member 2's certificate, claiming to be member 99 at a far higher term: dropped.
    rt.block_on(async {
        let mut c = raft_client(&node.peer, &pki.client(pki.leaf("member-2", &[]))).await;
        send(&mut c, Some(&id), heartbeat(99, 1, term + 1000)).await
    })
    .unwrap();
    eventually("the forged message counted", || {
        node.scrape()
            .contains("lodge_limit_rejections_total{limit=\"peer_identity\"} 1")
            .then_some(())
    });
    assert_eq!(term_of(&node), term, "the forged heartbeat moved the term");
    // A certificate of the peer CA that names no member is refused outright.
    let refused = rt.block_on(async {
        let mut c = raft_client(&node.peer, &pki.client(pki.leaf("someone", &[]))).await;
        send(&mut c, Some(&id), heartbeat(1, 1, term)).await
    });
    let s = refused.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("member-<ID>"), "{s:?}");
    kv(&node.grpc, &["put", "still", "serving"]);
    assert_eq!(get(&node.grpc, "still", false).as_deref(), Some("serving"));
}

#[test]
fn three_members_with_peer_tls_elect_replicate_and_survive_a_leader_kill() {
    let pki = PeerPki::new();
    let trio = Trio::new("[cluster]\ntick_ms = 20\n", &[]);
    let start = |i: usize, dir: tempfile::TempDir| {
        let cert = pki.leaf(&format!("member-{}", i + 1), &["localhost"]);
        let env = pki.env(&cert);
        let args = trio.args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Node::start_in_env(dir, &trio.addr(i), &args, &env_refs(&env))
    };
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(start(i, tempfile::tempdir().unwrap())))
        .collect();
    let all = (0..3).map(|i| trio.addr(i)).collect::<Vec<_>>().join(",");
    eventually("a write", || {
        kv(&all, &["put", "k", "v1"]).status.success().then_some(())
    });
    let leader = eventually("a leader", || leader_of(nodes[0].as_ref().unwrap()));
    let dir = nodes[leader as usize - 1].take().unwrap().kill9();
    let rest = (0..3)
        .filter(|i| *i != leader as usize - 1)
        .map(|i| trio.addr(i))
        .collect::<Vec<_>>()
        .join(",");
    eventually("a write after the kill", || {
        kv(&rest, &["put", "k", "v2"])
            .status
            .success()
            .then_some(())
    });
    nodes[leader as usize - 1] = Some(start(leader as usize - 1, dir));
    let back = trio.addr(leader as usize - 1);
    assert_eq!(
        eventually("the killed member caught up", || {
            get(&back, "k", true).filter(|v| v == "v2")
        }),
        "v2"
    );
    // Each member knows where clients reach the others.
    let t = json_of(cluster(&trio.addr(0), &["members", "--json"])).unwrap();
    for m in t["members"].as_array().unwrap() {
        let i = m["id"].as_u64().unwrap() as usize - 1;
        assert_eq!(m["address"].as_str(), Some(trio.peer(i).as_str()), "{t}");
    }
    eventually("client addresses known", || {
        let t = json_of(cluster(&trio.addr(0), &["members", "--json"]))?;
        t["members"]
            .as_array()?
            .iter()
            .all(|m| {
                let i = m["id"].as_u64().unwrap() as usize - 1;
                m["client_address"].as_str() == Some(trio.addr(i).as_str())
            })
            .then_some(())
    });
}

#[test]
fn a_node_of_another_cluster_can_neither_stream_nor_join() {
    let a = Node::start(&[]);
    let b = Node::start(&["--node-id", "2"]);
    let (id_a, id_b) = (cluster_id(&a), cluster_id(&b));
    assert_ne!(id_a, id_b);
    let rt = runtime();
    let refused = rt.block_on(async {
        let mut c = raft_client(&a.peer, &ClientTls::default()).await;
        send(&mut c, Some(&id_b), heartbeat(2, 1, 1)).await
    });
    let s = refused.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(
        s.message().contains(&id_a) && s.message().contains(&id_b),
        "{s:?}"
    );
    // Without an id at all: refused too.
    let s = rt
        .block_on(async {
            let mut c = raft_client(&a.peer, &ClientTls::default()).await;
            send(&mut c, None, heartbeat(2, 1, 1)).await
        })
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");

    // Node 2's data directory belongs to its own cluster: it cannot join a's.
    let dir = b.kill9();
    let err = match Node::try_start_in(
        dir,
        "127.0.0.1:0",
        &["--node-id", "2", "--join", &a.peer],
        &[],
    ) {
        Ok(n) => panic!("joined: {}", n.stderr()),
        Err(f) => {
            assert_eq!(f.status.code(), Some(2), "{}", f.stderr);
            f.stderr
        }
    };
    assert!(
        err.contains("cluster id mismatch") && err.contains(&id_a) && err.contains(&id_b),
        "{err}"
    );
    // A fresh node joins, and stores a's id.
    let c = Node::start(&["--node-id", "3", "--join", &a.peer]);
    assert_eq!(cluster_id(&c), id_a);
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_gigabyte_snapshot_stream_is_spooled_not_held_in_memory() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 1024;
    let node = Node::start(&[]);
    let id = cluster_id(&node);
    let rt = runtime();
    let before = rss_kib(node.pid(), "VmRSS:");
    let (first, second) = rt.block_on(async {
        let mut c = raft_client(&node.peer, &ClientTls::default()).await;
        let mut c2 = c.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("lodge-cluster-id", id.parse().unwrap());
        let call = tokio::spawn(async move { c.snapshot(req).await });
        // More is announced than will come: the stream is refused at its end, never decoded.
        tx.send(SnapshotChunk {
            data: vec![0u8; CHUNK],
            total_bytes: 2 * (CHUNK * CHUNKS) as u64,
        })
        .await
        .unwrap();
        // Once it holds its place (its spool file exists), a second stream from the same peer
        // is refused.
        let spool = node.dir.path().join("data/snapshots-in");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::read_dir(&spool).unwrap().count() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no spool file in 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut req = Request::new(tokio_stream::iter([SnapshotChunk {
            data: vec![1],
            total_bytes: 1,
        }]));
        req.metadata_mut()
            .insert("lodge-cluster-id", id.parse().unwrap());
        let second = c2.snapshot(req).await;
        for _ in 1..CHUNKS {
            tx.send(SnapshotChunk {
                data: vec![0u8; CHUNK],
                total_bytes: 0,
            })
            .await
            .unwrap();
        }
        drop(tx);
        (call.await.unwrap(), second)
    });
    let s = second.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("already streaming"), "{s:?}");
    let s = first.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("ended after 1073741824"), "{s:?}");
    let peak = rss_kib(node.pid(), "VmHWM:");
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 256 * 1024,
        "resident memory grew by {grown} KiB over a 1 GiB stream (before {before} KiB, peak {peak} KiB)"
    );
    // The spool file went with the stream.
    let spool = node.dir.path().join("data/snapshots-in");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
}

#[test]
fn a_snapshot_over_the_cap_is_refused_naming_the_key() {
    let node = Node::start_env(&[], &[("LODGE_PEER__MAX_SNAPSHOT_BYTES", "1048576")]);
    let id = cluster_id(&node);
    let rt = runtime();
    let s = rt
        .block_on(async {
            let mut c = raft_client(&node.peer, &ClientTls::default()).await;
            let mut req = Request::new(tokio_stream::iter([SnapshotChunk {
                data: vec![0; 1024],
                total_bytes: 2 << 20,
            }]));
            req.metadata_mut()
                .insert("lodge-cluster-id", id.parse().unwrap());
            c.snapshot(req).await
        })
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("peer.max_snapshot_bytes"), "{s:?}");
}
