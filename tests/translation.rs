//! End-to-end: the translation gateway of a real `lodge` node against a local OpenAI-compatible
//! HTTP server (real HTTP, real JSON) that "translates" by upper-casing.

mod common;

use std::process::{Command, Output};

use common::fake_llm::FakeLlm;
use common::{eventually, json_of, stderr, Node, LODGE};
use lodge_grpc::pb::registry as pb;
use serde_json::Value;

fn node_for(llm: &FakeLlm, extra: &[(&str, &str)]) -> Node {
    let url = llm.url();
    let mut env = vec![
        ("LODGE_TRANSLATION__BACKEND_URL", url.as_str()),
        ("LODGE_TRANSLATION__MODEL", "fake"),
        ("LODGE_TRANSLATION__PROBE_INTERVAL_MS", "100"),
    ];
    env.extend_from_slice(extra);
    Node::start_env(&[], &env)
}

fn translate(endpoint: &str, args: &[&str]) -> Output {
    Command::new(LODGE)
        .arg("translate")
        .args(args)
        .args(["--endpoint", endpoint, "--json"])
        .env_remove("LODGE_ENDPOINT")
        .output()
        .expect("running lodge translate")
}

fn ready(endpoint: &str) -> Option<bool> {
    let out = translate(endpoint, &["--check", "--title", "Hello", "--to", "fr-CA"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["ready"].as_bool()
}

#[test]
fn translation_of_titles_documents_and_streams() {
    let llm = FakeLlm::start();
    let node = node_for(&llm, &[]);
    let ep = node.grpc.as_str();
    eventually("backend probed and ready", || ready(ep).filter(|r| *r));

    let t = json_of(translate(
        ep,
        &["--title", "hello world", "--from", "en", "--to", "fr-CA"],
    ))
    .expect("title translated");
    assert_eq!(t["translated_title"], "HELLO WORLD");
    assert_eq!(t["tokens_used"], 4, "tokens come from the backend's usage");
    assert!(t["job_id"].as_str().unwrap().starts_with("j-"));

    let dir = tempfile::tempdir().unwrap();
    let doc = "# A title\n\nSome text with a [link](http://example.com/Path) and `code`.\n\n```rust\nfn main() { println!(\"hi\"); }\n```\n\n- item one\n- item two\n";
    let file = dir.path().join("doc.md");
    std::fs::write(&file, doc).unwrap();
    let f = file.to_str().unwrap();
    let d = json_of(translate(ep, &["--file", f, "--to", "fr-CA"])).expect("document translated");
    let md = d["translated_markdown"].as_str().unwrap();
    assert!(md.starts_with("# A TITLE\n\n"), "{md}");
    assert!(
        md.contains("SOME TEXT WITH A [LINK](http://example.com/Path) AND `code`."),
        "{md}"
    );
    assert!(
        md.contains("```rust\nfn main() { println!(\"hi\"); }\n```"),
        "code kept: {md}"
    );
    assert!(md.contains("- ITEM ONE\n- ITEM TWO"), "{md}");
    assert!(d["tokens_used"].as_i64().unwrap() > 0);

    // Streaming: three pieces of about 2000 characters, answered in order, then a final chunk.
    let para = "word ".repeat(420);
    let long = format!("{para}\n\n{para}\n\n{para}\n");
    std::fs::write(&file, &long).unwrap();
    let out = translate(ep, &["--file", f, "--to", "fr-CA", "--stream"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let chunks: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let indexes: Vec<i64> = chunks
        .iter()
        .map(|c| c["chunk_index"].as_i64().unwrap())
        .collect();
    assert_eq!(indexes, vec![0, 1, 2, 3], "in order, then the final chunk");
    assert!(chunks[..3].iter().all(|c| c["is_final"] == false));
    assert_eq!(chunks[3]["is_final"], true);
    let text: String = chunks[..3]
        .iter()
        .map(|c| c["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, long.to_uppercase());
    let total: i64 = chunks[..3]
        .iter()
        .map(|c| c["tokens_used"].as_i64().unwrap())
        .sum();
    assert_eq!(chunks[3]["tokens_used"], total);
    let metrics = node.scrape();
    assert!(
        metrics.contains("lodge_translation_jobs_total{outcome=\"ok\"}"),
        "jobs counted"
    );
}

#[test]
fn translation_reports_a_down_or_slow_backend() {
    let llm = FakeLlm::start();
    let node = node_for(&llm, &[("LODGE_TRANSLATION__REQUEST_TIMEOUT_MS", "500")]);
    let ep = node.grpc.as_str();
    eventually("ready", || ready(ep).filter(|r| *r));

    llm.set_down(true);
    eventually("not ready while the backend is down", || {
        ready(ep).filter(|r| !*r)
    });
    let out = translate(ep, &["--title", "x", "--to", "fr"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Unavailable: job j-") && err.contains("HTTP 503"),
        "{err}"
    );

    llm.set_down(false);
    llm.set_hold(true);
    let out = translate(ep, &["--title", "x", "--to", "fr"]);
    let err = stderr(&out);
    assert!(err.contains("DeadlineExceeded: job j-"), "{err}");
    llm.set_hold(false);

    // No backend configured at all: never "ready", and translations say why.
    let bare = Node::start(&[]);
    let out = translate(&bare.grpc, &["--check", "--title", "x", "--to", "fr"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ready"], false);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("translation.backend_url"));
}

fn register(endpoint: &str) -> String {
    let out = Command::new(LODGE)
        .args([
            "client",
            "register",
            "--name",
            "limits",
            "--endpoint",
            endpoint,
            "--json",
        ])
        .env_remove("LODGE_ENDPOINT")
        .output()
        .unwrap();
    json_of(out).unwrap()["client_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn title_request(client_id: &str) -> pb::TranslateRequest {
    pb::TranslateRequest {
        client_id: client_id.to_string(),
        target_language: "fr".into(),
        source: Some(pb::translate_request::Source::Title("held".into())),
        ..Default::default()
    }
}

#[test]
fn translation_limits_concurrency_queue_and_rate_per_client() {
    let llm = FakeLlm::start();
    let node = node_for(
        &llm,
        &[
            ("LODGE_TRANSLATION__MAX_JOBS_PER_CLIENT", "2"),
            ("LODGE_TRANSLATION__QUEUE_PER_CLIENT", "1"),
            ("LODGE_REGISTRY__HEARTBEAT_INTERVAL_MS", "600000"),
        ],
    );
    let id = register(&node.grpc);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://{}", node.grpc);
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let grpc = pb::translation_client::TranslationClient::new(channel);
        llm.set_hold(true);
        let mut running = Vec::new();
        for _ in 0..2 {
            let mut c = grpc.clone();
            let req = title_request(&id);
            running.push(tokio::spawn(async move { c.translate(req).await }));
        }
        eventually("two jobs at the backend", || {
            (llm.in_flight() == 2).then_some(())
        });
        // A caller that gives up while queued frees its place in the queue.
        let mut impatient = tonic::Request::new(title_request(&id));
        impatient.set_timeout(std::time::Duration::from_millis(300));
        let gave_up = grpc.clone().translate(impatient).await.unwrap_err();
        assert_ne!(gave_up.code(), tonic::Code::Ok);
        // So the next one is queued, not refused.
        {
            let mut c = grpc.clone();
            let req = title_request(&id);
            running.push(tokio::spawn(async move { c.translate(req).await }));
        }
        let node_view = eventually("the third job queued", || {
            let v = node.ctl(&["actor", &format!("/node/registry/clients/{id}"), "--json"]);
            json_of(v).filter(|v| v["state_dump"]["jobs_queued"] == 1)
        });
        assert_eq!(node_view["state_dump"]["jobs_in_flight"], 2);
        // Queue full: refused at once.
        let refused = grpc
            .clone()
            .translate(title_request(&id))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("queued"),
            "{}",
            refused.message()
        );
        llm.set_hold(false);
        for r in running {
            let answer = r.await.unwrap().expect("held jobs complete");
            assert_eq!(answer.into_inner().translated_title, "HELD");
        }
        assert_eq!(
            llm.max_in_flight(),
            2,
            "never more than the client's slots at the backend"
        );
    });
    let m = node.scrape();
    assert!(
        m.contains("lodge_limit_rejections_total{limit=\"client_concurrency\"} 1"),
        "{m}"
    );
}

#[test]
fn translation_rate_limit_refuses_a_burst_past_its_size() {
    let llm = FakeLlm::start();
    let node = node_for(
        &llm,
        &[
            ("LODGE_TRANSLATION__REQUESTS_PER_SECOND", "1"),
            ("LODGE_TRANSLATION__BURST", "3"),
        ],
    );
    let id = register(&node.grpc);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("http://{}", node.grpc);
    let codes: Vec<tonic::Code> = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = pb::translation_client::TranslationClient::new(channel);
        let mut codes = Vec::new();
        for _ in 0..10 {
            codes.push(match grpc.translate(title_request(&id)).await {
                Ok(_) => tonic::Code::Ok,
                Err(s) => s.code(),
            });
        }
        codes
    });
    // A burst of 3 passes at once; then at 1 per second most of the rest are refused.
    let ok = codes.iter().filter(|c| **c == tonic::Code::Ok).count();
    assert!(
        ok >= 3 && codes[..3].iter().all(|c| *c == tonic::Code::Ok),
        "{codes:?}"
    );
    assert!(codes.contains(&tonic::Code::ResourceExhausted), "{codes:?}");
    assert!(node
        .scrape()
        .contains("lodge_limit_rejections_total{limit=\"client_rate\"}"));
}
