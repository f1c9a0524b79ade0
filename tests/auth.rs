//! End-to-end: authentication and roles on every call of the client port (docs/security.md).
//! A real node with auth on; every method of the role table is called with no credential, with a
//! valid token lacking the role, and with the role; KV key scopes, client certificates, the CLI's
//! token flags and the audit log are checked on the same ground.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{make_pki, stderr, stdout, Node, LODGE};
use lodge_grpc::auth::roles::{Access, Role, TABLE};
use lodge_grpc::client::{connect, ClientTls};
use tonic::Code;

const SECRET: &str = "auth-tests-secret-0123456789abcdef0123";

fn auth_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("LODGE_AUTH__ENABLED", "true"),
        ("LODGE_AUTH__HS256_SECRET", SECRET),
    ]
}

fn token(roles: &[Role], prefixes: Option<&[&str]>) -> String {
    token_for("tester", roles, prefixes)
}

fn token_for(subject: &str, roles: &[Role], prefixes: Option<&[&str]>) -> String {
    let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    common::jwt(SECRET, subject, &roles, prefixes)
}

/// Calls `method` with one empty message (every message type accepts it) and returns the
/// status the call ended with, or OK when the node began answering (its handler ran).
async fn call(endpoint: &str, method: &'static str, bearer: Option<String>) -> Code {
    call_with_message(endpoint, method, bearer).await.0
}

/// Like [`call`], with the status message.
async fn call_with_message(
    endpoint: &str,
    method: &'static str,
    bearer: Option<String>,
) -> (Code, String) {
    let tls = ClientTls {
        bearer,
        ..Default::default()
    };
    let channel = connect(endpoint, &tls).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let req = tonic::Request::new(tokio_stream::iter(vec![()]));
    let answer = tokio::time::timeout(Duration::from_secs(10), grpc.streaming(req, path, codec));
    match answer.await {
        Err(_) => (Code::DeadlineExceeded, String::new()),
        Ok(Ok(_)) => (Code::Ok, String::new()),
        Ok(Err(s)) => (s.code(), s.message().to_string()),
    }
}

/// A role none of `roles` is (and not admin, which grants all).
fn another_role(roles: &[Role]) -> Role {
    Role::ALL
        .into_iter()
        .find(|r| *r != Role::Admin && !roles.contains(r))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_refuses_the_anonymous_and_the_wrong_role_and_takes_the_right_one() {
    let node = Node::start_env(&[], &auth_env());
    let mut failures = Vec::new();
    for rule in TABLE {
        let m = rule.method;
        let anonymous = call(&node.grpc, m, None).await;
        let (wrong, right) = match rule.access {
            Access::Public => (Some(Role::Exec), Some(Role::Exec)),
            Access::Members => (Some(Role::Admin), None),
            Access::AnyOf(roles) => (Some(another_role(roles)), Some(roles[0])),
        };
        let wrong = call(&node.grpc, m, Some(token(&[wrong.unwrap()], None))).await;
        // With the role, the handler runs: it may still refuse the empty message on its own
        // grounds (an instance that is not the caller's, admin.allow_mutations off), but never
        // for want of a role or a credential.
        let right = match right {
            Some(r) => {
                let (code, msg) = call_with_message(&node.grpc, m, Some(token(&[r], None))).await;
                let handler_refusal = code == Code::PermissionDenied && !msg.contains(" role");
                Some(if handler_refusal { Code::Ok } else { code })
            }
            None => None,
        };
        let refused = |c: Code| matches!(c, Code::Unauthenticated | Code::PermissionDenied);
        let ok = match rule.access {
            Access::Public => !refused(anonymous) && !refused(wrong),
            Access::Members => {
                anonymous == Code::Unauthenticated && wrong == Code::PermissionDenied
            }
            Access::AnyOf(_) => {
                anonymous == Code::Unauthenticated
                    && wrong == Code::PermissionDenied
                    && right.is_some_and(|c| !refused(c))
            }
        };
        if !ok {
            failures.push(format!(
                "{m}: anonymous {anonymous:?}, wrong role {wrong:?}, right role {right:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs `lodge ARGS` against `node` with the token `token` (through LODGE_TOKEN).
fn lodge(node: &Node, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(LODGE);
    cmd.args(args).args(["--endpoint", &node.grpc]);
    cmd.env_remove("LODGE_TOKEN").env_remove("LODGE_ENDPOINT");
    if let Some(t) = token {
        cmd.env("LODGE_TOKEN", t);
    }
    cmd.output().unwrap()
}

#[test]
fn a_scoped_writer_stays_in_its_prefix_and_nobody_writes_the_nodes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let audit_path = audit.display().to_string();
    let mut env = auth_env();
    env.push(("LODGE_AUDIT__ENABLED", "true"));
    env.push(("LODGE_AUDIT__PATH", &audit_path));
    let node = Node::start_env(&[], &env);
    let app = token(&[Role::KvWrite, Role::KvRead], Some(&["app/"]));
    let out = lodge(&node, Some(&app), &["kv", "put", "app/x", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = lodge(&node, Some(&app), &["kv", "put", "other/x", "1"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("PermissionDenied") && e.contains("app/"), "{e}");
    for t in [&app, &token(&[Role::KvWrite, Role::KvRead], None)] {
        let out = lodge(
            &node,
            Some(t),
            &["kv", "put", "/lodge/registry/forged", "1"],
        );
        assert!(!out.status.success());
        assert!(stderr(&out).contains("/lodge/"), "{}", stderr(&out));
        let out = lodge(&node, Some(t), &["kv", "get", "/lodge/", "--prefix"]);
        assert!(
            stderr(&out).contains("PermissionDenied"),
            "{}",
            stderr(&out)
        );
    }
    // A revoke deletes the lease's keys: it needs kv-write on each of them (etcd's rule).
    let anywhere = token(&[Role::KvWrite, Role::KvRead], None);
    let out = lodge(
        &node,
        Some(&anywhere),
        &["kv", "lease", "grant", "600", "--json"],
    );
    let lease = serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["lease"]
        .as_i64()
        .unwrap()
        .to_string();
    let out = lodge(
        &node,
        Some(&anywhere),
        &["kv", "put", "shared/x", "1", "--lease", &lease],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = lodge(&node, Some(&app), &["kv", "lease", "revoke", &lease]);
    let e = stderr(&out);
    assert!(
        e.contains("PermissionDenied") && e.contains("shared/x"),
        "{e}"
    );
    let out = lodge(&node, Some(&anywhere), &["kv", "lease", "revoke", &lease]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The router's records are there, and an admin may read them.
    let admin = token(&[Role::Admin], None);
    let out = lodge(
        &node,
        Some(&admin),
        &["kv", "get", "/lodge/", "--prefix", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = lodge(&node, None, &["kv", "get", "app/x"]);
    let e = stderr(&out);
    assert!(
        e.contains("Unauthenticated") && e.contains("--token-file"),
        "{e}"
    );
    // A token file works as LODGE_TOKEN does.
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{app}\n")).unwrap();
    let mut cmd = Command::new(LODGE);
    let out = cmd
        .args(["kv", "get", "app/x", "--endpoint", &node.grpc])
        .arg("--token-file")
        .arg(&file)
        .env_remove("LODGE_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains('1'));

    // The audit log holds the put, the refused put and who made them; never the token.
    let lines = common::eventually("the audit records are written", || {
        let text = std::fs::read_to_string(&audit).ok()?;
        (text.lines().count() >= 4).then_some(text)
    });
    assert!(!lines.contains(&app), "a token in the audit log");
    let records: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let put = records
        .iter()
        .find(|r| r["target"] == "\"app/x\"")
        .expect("the put is recorded");
    assert_eq!(put["who"], "tester");
    assert_eq!(put["via"], "token");
    assert_eq!(put["method"], "lodge.kv.v1.KV/Put");
    assert_eq!(put["outcome"], "Ok");
    assert!(records
        .iter()
        .any(|r| r["target"] == "\"other/x\"" && r["outcome"] == "PermissionDenied"));
}

#[test]
fn a_client_certificate_is_an_identity_with_the_roles_it_is_mapped_to() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let (ca, cert, key) = (
        pki.ca.display().to_string(),
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
    );
    let mut env = auth_env();
    env.extend([
        ("LODGE_SERVER__TLS__ENABLED", "true"),
        ("LODGE_SERVER__TLS__CERT_FILE", cert.as_str()),
        ("LODGE_SERVER__TLS__KEY_FILE", key.as_str()),
        ("LODGE_SERVER__TLS__CLIENT_CA_FILE", ca.as_str()),
        ("LODGE_AUTH__CERTIFICATE_ROLES", "client.lodge.test=kv-read"),
    ]);
    let node = Node::start_env(&[], &env);
    let with_cert = |args: &[&str]| {
        Command::new(LODGE)
            .args(args)
            .args(["--endpoint", &node.grpc, "--tls-ca", &ca])
            .arg("--tls-cert")
            .arg(&pki.client_cert)
            .arg("--tls-key")
            .arg(&pki.client_key)
            .args(["--tls-domain", "localhost"])
            .env_remove("LODGE_TOKEN")
            .output()
            .unwrap()
    };
    let out = with_cert(&["kv", "get", "k"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = with_cert(&["kv", "put", "k", "v"]);
    let e = stderr(&out);
    assert!(
        e.contains("PermissionDenied") && e.contains("kv-write") && e.contains("client.lodge.test"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_client_acts_only_on_its_own_registrations() {
    use lodge_grpc::pb::registry::{self as pb, registry_client::RegistryClient};
    let node = Node::start_env(&[], &auth_env());
    let as_ = |subject: &str, roles: &[Role]| {
        let tls = ClientTls {
            bearer: Some(token_for(subject, roles, None)),
            ..Default::default()
        };
        let grpc = node.grpc.clone();
        async move { RegistryClient::new(connect(&grpc, &tls).await.unwrap()) }
    };
    let mut alice = as_("alice", &[Role::RegistryClient]).await;
    let mut bob = as_("bob", &[Role::RegistryClient]).await;
    let identity = || pb::RegisterClientRequest {
        client_name: "glooscap".into(),
        namespace: "wiki".into(),
        instance_id: "a".into(),
        ..Default::default()
    };
    let id = alice
        .register_client(identity())
        .await
        .unwrap()
        .into_inner()
        .client_id;
    let beat = |id: &str| pb::HeartbeatRequest {
        client_id: id.to_string(),
        ..Default::default()
    };
    assert!(alice.heartbeat(beat(&id)).await.unwrap().get_ref().success);
    let e = bob.heartbeat(beat(&id)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("another identity"), "{}", e.message());
    let e = bob
        .unregister_client(pb::UnregisterClientRequest {
            client_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Registering alice's identity again would replace (end) her registration: not for bob.
    let e = bob.register_client(identity()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let get = || pb::GetClientRequest {
        client_id: id.clone(),
    };
    assert_eq!(
        bob.get_client(get()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mut observer = as_("ops", &[Role::Observer]).await;
    assert!(observer.get_client(get()).await.is_ok());
    // Alice's registration survived all of it, and she may replace it herself.
    assert!(alice.heartbeat(beat(&id)).await.unwrap().get_ref().success);
    let again = alice
        .register_client(identity())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.replaced_client_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_registers_only_itself_and_only_inside_the_module_networks() {
    use lodge_grpc::pb::balancer::{self as pb, balancer_client::BalancerClient};
    let mut env = auth_env();
    env.push(("LODGE_AUTH__MODULE_NETWORKS", "127.0.0.0/8"));
    let node = Node::start_env(&[], &env);
    let tls = ClientTls {
        bearer: Some(token_for("m1", &[Role::Module], None)),
        ..Default::default()
    };
    let mut m1 = BalancerClient::new(connect(&node.grpc, &tls).await.unwrap());
    let register = |instance: &str, data: &str| pb::RegisterModuleRequest {
        instance_id: instance.into(),
        module_type: pb::ModuleType::Alb as i32,
        control_address: "127.0.0.1:1".into(),
        data_address: data.into(),
        ..Default::default()
    };
    let e = m1
        .register_module(register("m2", "127.0.0.1:2"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("instance_id"), "{}", e.message());
    let e = m1
        .register_module(register("m1", "10.9.9.9:80"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("auth.module_networks"),
        "{}",
        e.message()
    );
    let ok = m1.register_module(register("m1", "127.0.0.1:2")).await;
    assert!(
        ok.as_ref()
            .err()
            .is_none_or(|e| e.code() != Code::PermissionDenied),
        "{ok:?}"
    );
    let e = m1
        .heartbeat(pb::HeartbeatRequest {
            instance_id: "m2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[test]
fn with_auth_on_followers_forward_over_the_peer_port_and_a_leader_kill_loses_no_write() {
    let trio = common::Trio::new(
        &format!("[auth]\nenabled = true\nhs256_secret = \"{SECRET}\"\n"),
        &[],
    );
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(trio.start(i, tempfile::tempdir().unwrap())))
        .collect();
    let app = token(&[Role::KvRead, Role::KvWrite], Some(&["app/"]));
    let admin = token(&[Role::Admin], None);
    let run = |node: &Node, t: &str, args: &[&str]| lodge(node, Some(t), args);
    let leader = || {
        nodes.iter().flatten().find_map(|n| {
            let out = run(n, &admin, &["ctl", "actor", "/node/cluster/raft", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&stdout(&out)).ok()?;
            v["state_dump"]["leader"].as_u64().filter(|l| *l > 0)
        })
    };
    let first = common::eventually("a leader", leader);
    // Every write goes through a follower, which forwards it to the leader as a member.
    let follower = |leader: u64| {
        nodes
            .iter()
            .enumerate()
            .find(|(i, n)| n.is_some() && *i as u64 + 1 != leader)
            .map(|(i, _)| i)
            .unwrap()
    };
    for k in 0..20 {
        let f = nodes[follower(first)].as_ref().unwrap();
        let out = run(f, &app, &["kv", "put", &format!("app/{k}"), "v"]);
        assert!(out.status.success(), "put {k}: {}", stderr(&out));
    }
    // A scoped token is refused on a follower as on the leader: the check is where it arrives.
    let f = nodes[follower(first)].as_ref().unwrap();
    let out = run(f, &app, &["kv", "put", "other/x", "v"]);
    assert!(
        stderr(&out).contains("PermissionDenied"),
        "{}",
        stderr(&out)
    );

    let killed = nodes[first as usize - 1].take().unwrap();
    drop(killed.kill9());
    let alive: Vec<&Node> = nodes.iter().flatten().collect();
    let endpoints = alive
        .iter()
        .map(|n| n.grpc.clone())
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new(LODGE)
        .args(["kv", "put", "app/after", "v", "--endpoint", &endpoints])
        .env("LODGE_TOKEN", &app)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(alive[0], &app, &["kv", "get", "app/", "--prefix", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["count"], 21, "{doc}");
}

#[test]
fn a_runbook_runs_shell_commands_so_only_an_admin_starts_one() {
    let node = Node::start_env(&[], &auth_env());
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("book.json");
    std::fs::write(
        &book,
        r#"{"name": "n", "steps": [{"name": "s", "run": "true", "idempotent": true}]}"#,
    )
    .unwrap();
    let book = book.display().to_string();
    let writer = token(&[Role::WorkflowWrite], None);
    let refused = lodge(
        &node,
        Some(&writer),
        &["workflow", "run", &book, "--id", "r1"],
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("admin"),
        "{err}"
    );
    let admin = token(&[Role::Admin], None);
    let ran = lodge(
        &node,
        Some(&admin),
        &["workflow", "run", &book, "--id", "r1"],
    );
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    // A reader sees it; an anonymous caller does not.
    let reader = token(&[Role::WorkflowRead], None);
    let got = lodge(&node, Some(&reader), &["workflow", "get", "r1", "--json"]);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let anonymous = lodge(&node, None, &["workflow", "get", "r1"]);
    assert!(!anonymous.status.success());
}
