//! End-to-end: clients the project did not write find and call a node's services from server
//! reflection alone, and reflection, health and the routes agree on what a node serves.
//!
//! The Python client (tests/reflection/client.py) uses the stock `grpcio-reflection`, which speaks
//! only `grpc.reflection.v1alpha`; `bash scripts/test` installs it into target/reflection-venv.
//! grpcurl is used too when one is installed (`grpcurl` on PATH, or `LODGE_GRPCURL`).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;
use lodge_grpc::client::{connect, ClientTls};
use lodge_grpc::served::NODE_SERVICES;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const WORKSPACE: &str = env!("CARGO_MANIFEST_DIR");

/// A single node with a leader, so that KV writes are taken at once.
fn node() -> Node {
    let node = Node::start(&[]);
    eventually("a leader", || leader_of(&node));
    node
}

fn listed() -> Vec<String> {
    let mut names: Vec<String> = NODE_SERVICES.iter().map(|s| s.to_string()).collect();
    names.sort();
    names
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}\n{}",
        o.status,
        stderr(&o),
        stdout(&o)
    );
    stdout(&o)
}

#[test]
fn pythons_stock_reflection_client_lists_describes_and_calls_kv_and_admin() {
    let node = node();
    let out = Command::new(test_python())
        .arg(PathBuf::from(WORKSPACE).join("tests/reflection/client.py"))
        .args([&node.grpc, "first/hour", "hello from python"])
        .output()
        .expect("running python");
    let doc: Value = serde_json::from_str(&ok(out, "tests/reflection/client.py")).unwrap();

    let services: Vec<String> = serde_json::from_value(doc["services"].clone()).unwrap();
    assert_eq!(
        services,
        listed(),
        "reflection lists exactly what is served"
    );
    assert!(!services.iter().any(|s| s == "lodge.balancer.v1.Module"));

    let d = &doc["described"];
    assert_eq!(d["service"], "lodge.kv.v1.KV");
    assert_eq!(d["file"], "lodge/kv/v1/kv.proto");
    assert_eq!(d["methods"]["Put"]["input"], "lodge.kv.v1.PutRequest");
    assert_eq!(d["methods"]["Range"]["output"], "lodge.kv.v1.RangeResponse");
    assert_eq!(d["methods"]["Watch"]["server_streaming"], true);
    assert_eq!(
        d["put_request_fields"],
        serde_json::json!(["key", "value", "prev_kv", "lease"])
    );

    assert!(doc["put_revision"].as_i64().unwrap() >= 1, "{doc}");
    assert_eq!(
        doc["range_values"],
        serde_json::json!(["hello from python"])
    );
    // The write is a real one: the project's own CLI reads it back.
    assert_eq!(
        get(&node.grpc, "first/hour", false).as_deref(),
        Some("hello from python")
    );
    let actors: Vec<&str> = doc["actors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for path in ["/node", "/node/admin", "/node/cluster/raft"] {
        assert!(actors.contains(&path), "{path} not in {actors:?}");
    }
}

#[tokio::test]
async fn reflection_health_and_routes_agree_on_what_a_node_serves() {
    let node = Node::start(&[]);
    let channel = connect(&node.grpc, &ClientTls::default()).await.unwrap();

    // Both reflection versions list the same services: exactly those served.
    let v1 = {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("unexpected v1 reflection answer");
        };
        list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
    };
    let v1alpha = {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("unexpected v1alpha reflection answer");
        };
        list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
    };
    let (mut v1, mut v1alpha) = (v1, v1alpha);
    v1.sort();
    v1alpha.sort();
    assert_eq!(v1, listed());
    assert_eq!(v1alpha, listed());

    // Health answers SERVING for every listed service, and knows nothing of the others.
    let mut health = HealthClient::new(channel.clone());
    for service in NODE_SERVICES {
        let r = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("health of {service}: {s}"))
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "lodge.balancer.v1.Module".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // The metrics label every served method: a reflection call over v1alpha is counted under its
    // own name, not as `unknown`.
    let page = node.scrape();
    assert!(
        page.contains("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
        "{page}"
    );
}

/// grpcurl, when there is one: `LODGE_GRPCURL`, else `grpcurl` on PATH.
fn grpcurl() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LODGE_GRPCURL") {
        return Some(PathBuf::from(p));
    }
    let found = Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    found.then(|| PathBuf::from("grpcurl"))
}

/// Debian has no grpcurl package and no registry here ships a build we can verify, so the suite
/// cannot install it: the Python client above is the check that always runs. With a grpcurl at
/// hand: `LODGE_GRPCURL=/path/to/grpcurl cargo test --test reflection -- --ignored`.
#[test]
#[ignore = "needs grpcurl (LODGE_GRPCURL or on PATH)"]
fn grpcurl_lists_describes_and_calls() {
    let grpcurl = grpcurl().expect("grpcurl: set LODGE_GRPCURL or put grpcurl on PATH");
    let node = node();
    let run = |args: &[&str]| {
        let o = Command::new(&grpcurl)
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("running grpcurl");
        ok(o, &format!("grpcurl {args:?}"))
    };
    let list = run(&[&node.grpc, "list"]);
    let mut names: Vec<String> = list.lines().map(str::to_string).collect();
    names.sort();
    assert_eq!(names, listed());

    let described = run(&[&node.grpc, "describe", "lodge.kv.v1.KV"]);
    assert!(
        described
            .contains("rpc Put ( .lodge.kv.v1.PutRequest ) returns ( .lodge.kv.v1.PutResponse );"),
        "{described}"
    );
    // protobuf's JSON mapping carries bytes as base64: "curl/key" and "hello from grpcurl".
    run(&[
        "-d",
        r#"{"key": "Y3VybC9rZXk=", "value": "aGVsbG8gZnJvbSBncnBjdXJs"}"#,
        &node.grpc,
        "lodge.kv.v1.KV/Put",
    ]);
    let range: Value = serde_json::from_str(&run(&[
        "-d",
        r#"{"key": "Y3VybC9rZXk="}"#,
        &node.grpc,
        "lodge.kv.v1.KV/Range",
    ]))
    .unwrap();
    assert_eq!(range["kvs"][0]["value"], "aGVsbG8gZnJvbSBncnBjdXJs");
    assert_eq!(
        get(&node.grpc, "curl/key", false).as_deref(),
        Some("hello from grpcurl")
    );
    let actors: Value = serde_json::from_str(&run(&[
        "-d",
        r#"{"pathGlob": "/node/*"}"#,
        &node.grpc,
        "lodge.admin.v1.Admin/ListActors",
    ]))
    .unwrap();
    let paths: Vec<&str> = actors["actors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"/node/admin"), "{paths:?}");
}
