//! Secure by default, the metrics endpoint's TLS and token, and certificate rotation, end to end
//! with real nodes (docs/security.md).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use lodge_grpc::tls::rustls;
use lodge_grpc::tls::rustls::pki_types::pem::PemObject;
use lodge_grpc::tls::rustls::pki_types::{CertificateDer, ServerName};

fn config_file(dir: &Path, toml: &str) -> String {
    let p = dir.join("node.toml");
    std::fs::write(&p, toml).unwrap();
    p.display().to_string()
}

/// A TLS client trusting `ca` (a PEM file) for `localhost`, or an error saying why not.
fn tls_connect(
    addr: &str,
    ca: &Path,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(s)
}

/// The certificate a new TLS connection to `addr` is served (DER), trusting `ca`.
fn served_cert(addr: &str, ca: &Path) -> Result<Vec<u8>, String> {
    let s = tls_connect(addr, ca)?;
    let certs = s.conn.peer_certificates().ok_or("no certificate")?;
    Ok(certs[0].to_vec())
}

fn der_of(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

/// `GET /metrics` over `io`, with `auth` as the Authorization header; the whole answer.
fn scrape_over(mut io: impl Read + Write, addr: &str, auth: Option<&str>) -> String {
    let header = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        io,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{header}\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    // A TLS peer closing without close_notify is an error here; what was read counts.
    let _ = io.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_non_loopback_listen_without_tls_and_auth_exits_2_unless_insecure() {
    let f = match Node::try_start_at("0.0.0.0:0", &[]) {
        Ok(_) => panic!("a node listening on 0.0.0.0 without TLS or auth started"),
        Err(f) => f,
    };
    assert_eq!(f.status.code(), Some(2), "{f:?}");
    for named in [
        "server.listen",
        "server.tls.enabled = false",
        "auth.enabled = false",
        "--insecure",
    ] {
        assert!(f.stderr.contains(named), "{named} not named: {}", f.stderr);
    }

    let node = Node::try_start_at("0.0.0.0:0", &["--insecure"]).unwrap_or_else(|f| panic!("{f:?}"));
    let port = node.grpc.rsplit_once(':').unwrap().1;
    let ok = ctl(&format!("127.0.0.1:{port}"), &["info"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let warned = eventually("the --insecure warning", || {
        let e = node.stderr();
        e.contains("starting insecure").then_some(e)
    });
    assert!(
        warned.contains("server.listen = 0.0.0.0:") && warned.contains("auth.enabled = false"),
        "{warned}"
    );

    // The same for the metrics endpoint.
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("stderr");
    let child = std::process::Command::new(LODGE)
        .args([
            "node",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "0.0.0.0:0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = wait_child(child, Duration::from_secs(30));
    let err = std::fs::read_to_string(&err).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(
        err.contains("metrics.listen = 0.0.0.0:0")
            && err.contains("metrics.tls.enabled = false")
            && err.contains("metrics.token_file unset"),
        "{err}"
    );
}

#[test]
fn metrics_need_the_token_and_speak_tls_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let token = "scrape-token-0123456789";
    let token_file = dir.path().join("metrics.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let cfg = format!(
        "[metrics]\ntoken_file = \"{}\"\n[metrics.tls]\nenabled = true\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        token_file.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let node = Node::start(&["--config", &config_file(dir.path(), &cfg)]);
    let addr = node.metrics.as_str();

    let no_token = scrape_over(tls_connect(addr, &pki.ca).unwrap(), addr, None);
    assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    assert!(
        no_token.contains("Authorization: Bearer <token>"),
        "{no_token}"
    );
    let wrong = scrape_over(
        tls_connect(addr, &pki.ca).unwrap(),
        addr,
        Some("Bearer scrape-token-012345678X"),
    );
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let page = scrape_over(
        tls_connect(addr, &pki.ca).unwrap(),
        addr,
        Some(&format!("Bearer {token}")),
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("lodge_raft_term"), "{page}");

    // Plaintext to the TLS port gets no page.
    let plain = scrape_over(
        TcpStream::connect(addr).unwrap(),
        addr,
        Some(&format!("Bearer {token}")),
    );
    assert!(!plain.contains("lodge_raft_term"), "{plain}");
    assert!(
        !node.stderr().contains(token),
        "the log holds the metrics token"
    );
}

#[test]
fn plaintext_metrics_with_a_token_answer_401_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("metrics.token");
    std::fs::write(&token_file, "t0k3n-of-the-scraper").unwrap();
    let path = token_file.display().to_string();
    let node = Node::start_env(&[], &[("LODGE_METRICS__TOKEN_FILE", &path)]);
    let addr = node.metrics.as_str();
    let refused = scrape_over(TcpStream::connect(addr).unwrap(), addr, None);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(refused.contains("metrics.token_file"), "{refused}");
    let page = scrape_over(
        TcpStream::connect(addr).unwrap(),
        addr,
        Some("Bearer t0k3n-of-the-scraper"),
    );
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
}

#[test]
fn a_new_certificate_is_served_after_sighup_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let old = make_pki(dir.path());
    let tls = format!(
        "[server.tls]\nenabled = true\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        old.server_cert.display(),
        old.server_key.display()
    );
    let mut node = Node::start(&["--config", &config_file(dir.path(), &tls)]);
    let grpc = node.grpc.clone();
    let old_der = der_of(&old.server_cert);
    assert_eq!(served_cert(&grpc, &old.ca).unwrap(), old_der);
    // An open connection keeps its certificate across the swap.
    let mut open = tls_connect(&grpc, &old.ca).unwrap();

    let new_dir = tempfile::tempdir().unwrap();
    let new = make_pki(new_dir.path());
    std::fs::copy(&new.server_cert, &old.server_cert).unwrap();
    std::fs::copy(&new.server_key, &old.server_key).unwrap();
    signal(node.pid(), "HUP");
    let served = eventually("the new certificate", || served_cert(&grpc, &new.ca).ok());
    assert_eq!(served, der_of(&new.server_cert));
    let ca = new.ca.display().to_string();
    let info = node.ctl(&["info", "--tls-ca", &ca]);
    assert!(info.status.success(), "{}", stderr(&info));
    assert!(
        served_cert(&grpc, &old.ca).is_err(),
        "the old certificate is still served"
    );
    assert_eq!(open.conn.peer_certificates().unwrap()[0].to_vec(), old_der);
    // The open connection still works (an HTTP/2 preface gets an answer, not a reset).
    open.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut frame = [0u8; 9];
    open.read_exact(&mut frame).unwrap();
    assert_eq!(frame[3], 4, "a SETTINGS frame");

    // A broken certificate: refused, counted once, the last good one kept.
    std::fs::write(
        &old.server_cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    )
    .unwrap();
    signal(node.pid(), "HUP");
    let rejected = r#"lodge_tls_reloads_total{tls="server.tls",outcome="rejected"} 1"#;
    eventually("the rejected reload counted", || {
        node.scrape().contains(rejected).then_some(())
    });
    assert_eq!(
        served_cert(&grpc, &new.ca).unwrap(),
        der_of(&new.server_cert)
    );
    let logged = eventually("the refusal logged", || {
        let e = node.stderr();
        e.contains("TLS files refused").then_some(e)
    });
    assert!(
        logged.contains(&old.server_cert.display().to_string()),
        "the error names the file: {logged}"
    );
    // A key that is not the certificate's is refused too.
    std::fs::copy(&new.server_cert, &old.server_cert).unwrap();
    std::fs::copy(&new.client_key, &old.server_key).unwrap();
    signal(node.pid(), "HUP");
    let twice = r#"lodge_tls_reloads_total{tls="server.tls",outcome="rejected"} 2"#;
    eventually("the mismatched key refused", || {
        node.scrape().contains(twice).then_some(())
    });
    assert_eq!(
        served_cert(&grpc, &new.ca).unwrap(),
        der_of(&new.server_cert)
    );
    let page = node.scrape();
    assert!(
        page.contains(r#"lodge_tls_reloads_total{tls="server.tls",outcome="ok"} 1"#),
        "{page}"
    );
    // SIGHUP never ends the node.
    assert!(node
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
}
