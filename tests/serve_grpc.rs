//! `kvmesh serve`'s gRPC API as a real process: score by tokens and by vLLM hashes, a streaming
//! batch score, engines listed, added and removed, malformed, unauthenticated and oversized
//! requests refused with the right status; and both APIs over TLS with a bearer token.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, stored, wait_for, Killed};
use kvindex::publish::{EventPublisher, PublisherConfig};
use kvmesh::client::{ClientError, GrpcIndexClient, IndexClient, NewEngine, ScoreRequest};

/// A publisher with blocks 1, 2, 3 (48 tokens: 0..48) stored, and a daemon subscribed to it.
fn setup(extra: &[&str]) -> (EventPublisher, Killed, u16, u16) {
    let ctx = zmq::Context::new();
    let (http, grpc) = (free_port(), free_port());
    let publ = EventPublisher::start(
        &ctx,
        PublisherConfig {
            replay_endpoint: Some("tcp://127.0.0.1:0".into()),
            ..PublisherConfig::new("tcp://127.0.0.1:0")
        },
    )
    .expect("publisher");
    // The publisher binds ports of its own choosing (no race with other tests for them).
    let pub_ep = publ.endpoint().to_string();
    let server = Killed(
        Command::new(env!("CARGO_BIN_EXE_kvmesh"))
            .args(["serve", "--model", "m", "--max-request-bytes", "65536"])
            .args(["--listen", &format!("127.0.0.1:{http}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
            .arg("--engine")
            .arg(format!(
                "e1={pub_ep},replay={}",
                publ.replay_endpoint().expect("replay endpoint")
            ))
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("kvmesh serve starts"),
    );
    std::thread::sleep(Duration::from_millis(300));
    (publ, server, http, grpc)
}

fn connect(url: &str, token: Option<&str>, ca: Option<&[u8]>) -> GrpcIndexClient {
    let t = Instant::now();
    loop {
        match GrpcIndexClient::connect(url, token, ca) {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "no gRPC at {url}: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn serve_grpc_api() {
    let (publ, _server, _http, grpc) = setup(&[]);
    let c = connect(&format!("http://127.0.0.1:{grpc}"), None, None);
    publ.publish(&stored(&[1, 2], None, 0)).unwrap();
    publ.publish(&stored(&[3], Some(2), 32)).unwrap();
    let prompt = ScoreRequest::tokens("m", (0..64).collect());
    wait_for("the events to be ingested", || {
        c.score(&prompt)
            .is_ok_and(|s| s.first().is_some_and(|e| e.matched_blocks == 3))
    });
    let s = c.score(&prompt).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].name, "e1");
    assert_eq!(s[0].matched_tokens, 48);
    assert_eq!(s[0].tiers.gpu, 3);
    // By vLLM (engine) hashes, with an engine filter; another model sees nothing.
    let mut by_hash = ScoreRequest::hashes("m", vec![1, 2]);
    by_hash.engines = Some(vec!["e1".into()]);
    assert_eq!(c.score(&by_hash).unwrap()[0].matched_blocks, 2);
    assert!(c
        .score(&ScoreRequest::tokens("other", (0..64).collect()))
        .unwrap()
        .is_empty());

    // Streaming: 500 prompts of every prefix length, answered in order, each one right.
    let many: Vec<ScoreRequest> = (0..500u32)
        .map(|i| ScoreRequest::tokens("m", (0..(i % 80)).collect()))
        .collect();
    let answers = c.score_many(&many).unwrap();
    assert_eq!(answers.len(), many.len());
    for (i, a) in answers.iter().enumerate() {
        let want = ((i as u32 % 80) / 16).min(3);
        let got = a.first().map_or(0, |e| e.matched_blocks);
        assert_eq!(got, want, "streamed request {i}");
    }
    // The same answers as one-by-one calls and as the HTTP API.
    let http = IndexClient::new(format!("http://127.0.0.1:{}", _http));
    for r in many.iter().step_by(37) {
        assert_eq!(c.score(r).unwrap(), http.score(r).unwrap());
    }

    // Engines: listed with their stream's state; added and removed at run time.
    let list = c.engines().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "e1");
    assert_eq!(list[0].state, "connected");
    assert_eq!(list[0].last_seq, Some(1));
    assert_eq!(list[0].blocks.as_ref().unwrap().gpu, 3);
    let e2 = NewEngine {
        name: "e2".into(),
        endpoint: format!("tcp://127.0.0.1:{}", free_port()),
        replay_endpoint: None,
        model: Some("m".into()),
    };
    assert_eq!(c.add_engine(&e2).unwrap(), "e2");
    fn status<T>(r: Result<T, ClientError>) -> u16 {
        match r {
            Err(ClientError::Refused { status, .. }) => status,
            Err(e) => panic!("not a refusal: {e}"),
            Ok(_) => 200,
        }
    }
    assert_eq!(status(c.add_engine(&e2)), 409);
    assert_eq!(c.engines().unwrap().len(), 2);
    c.remove_engine("e2").unwrap();
    assert_eq!(status(c.remove_engine("e2")), 404);

    // Malformed requests: INVALID_ARGUMENT or NOT_FOUND with a message; the daemon goes on.
    assert_eq!(status(c.score(&ScoreRequest::default())), 400);
    assert_eq!(
        status(c.score(&ScoreRequest {
            model: "m".into(),
            ..Default::default()
        })),
        400
    );
    let mut unknown = prompt.clone();
    unknown.engines = Some(vec!["nope".into()]);
    assert_eq!(status(c.score(&unknown)), 404);
    let bad_engine = NewEngine {
        name: "x".into(),
        endpoint: "http://nope".into(),
        replay_endpoint: None,
        model: None,
    };
    assert_eq!(status(c.add_engine(&bad_engine)), 400);
    // Over the 64 KiB request limit.
    let huge = ScoreRequest::tokens("m", vec![100_000; 40_000]);
    let code = status(c.score(&huge));
    assert!(code == 413 || code == 400, "oversized request: {code}");
    // A malformed request in a stream ends the stream with its error.
    let mut mixed = many[..5].to_vec();
    mixed[3] = ScoreRequest::default();
    assert_eq!(status(c.score_many(&mixed)), 400);
    // And the daemon still answers.
    assert_eq!(c.score(&prompt).unwrap()[0].matched_blocks, 3);

    // Both token encodings of the proto (varints and little-endian bytes) give one answer; a
    // byte string that is not whole u32s is refused.
    use kvmesh::serve::pb;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut raw = pb::kv_index_client::KvIndexClient::new(channel);
        let ask = |blocks| pb::ScoreRequest {
            model: "m".into(),
            blocks: Some(blocks),
            ..Default::default()
        };
        let varints = raw
            .score(ask(pb::score_request::Blocks::TokenIds(pb::TokenIds {
                ids: (0..64).collect(),
            })))
            .await
            .unwrap()
            .into_inner();
        let le32 = raw
            .score(ask(pb::score_request::Blocks::TokenIdsLe32(
                (0..64u32).flat_map(|t| t.to_le_bytes()).collect(),
            )))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(varints, le32);
        assert_eq!(varints.engines[0].matched_blocks, 3);
        let bad = raw
            .score(ask(pb::score_request::Blocks::TokenIdsLe32(vec![0; 5])))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("multiple of 4"), "{}", bad.message());
    });
}

#[test]
fn both_apis_over_tls_with_a_token() {
    let dir = std::env::temp_dir().join(format!("kvmesh-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("a self-signed certificate");
    let cert_pem = cert.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (publ, _server, http, grpc) = setup(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
        "--auth-token",
        "s3cret",
    ]);
    publ.publish(&stored(&[1, 2], None, 0)).unwrap();
    let prompt = ScoreRequest::tokens("m", (0..64).collect());

    // gRPC over TLS: the token is required and checked.
    let url = format!("https://localhost:{grpc}");
    let c = connect(&url, Some("s3cret"), Some(cert_pem.as_bytes()));
    wait_for("the events over gRPC+TLS", || {
        c.score(&prompt)
            .is_ok_and(|s| s.first().is_some_and(|e| e.matched_blocks == 2))
    });
    let wrong = connect(&url, Some("guess"), Some(cert_pem.as_bytes()));
    match wrong.score(&prompt) {
        Err(ClientError::Refused { status: 401, .. }) => {}
        other => panic!("a wrong token must be refused: {other:?}"),
    }
    let none = connect(&url, None, Some(cert_pem.as_bytes()));
    assert!(matches!(
        none.engines(),
        Err(ClientError::Refused { status: 401, .. })
    ));
    // Plain gRPC to a TLS port fails to talk, it never answers in the clear.
    let plain = GrpcIndexClient::connect(&format!("http://127.0.0.1:{grpc}"), Some("s3cret"), None);
    assert!(plain.and_then(|p| p.score(&prompt)).is_err());

    // HTTPS: same token rules; plain HTTP is refused at the TLS layer.
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
            ureq::tls::Certificate::from_pem(cert_pem.as_bytes())
                .unwrap()
                .to_owned(),
        ])))
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .build()
        .into();
    let base = format!("https://localhost:{http}");
    let body = r#"{"model":"m","token_ids":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31]}"#;
    let mut r = agent
        .post(&format!("{base}/v1/score"))
        .header("authorization", "Bearer s3cret")
        .send(body)
        .expect("HTTPS request");
    assert_eq!(r.status(), 200);
    let text = r.body_mut().read_to_string().unwrap();
    assert!(text.contains("\"matched_blocks\":2"), "{text}");
    let r = agent
        .post(&format!("{base}/v1/score"))
        .send(body)
        .expect("HTTPS request");
    assert_eq!(r.status(), 401);
    assert_eq!(
        agent
            .get(&format!("{base}/healthz"))
            .call()
            .unwrap()
            .status(),
        200
    );
    assert!(
        ureq::get(&format!("http://127.0.0.1:{http}/healthz"))
            .call()
            .is_err(),
        "plain HTTP must not be served on the TLS port"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_needs_both_files_and_says_what_is_wrong() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .args(["serve", "--tls-cert", "/nonexistent/cert.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
    let dir = std::env::temp_dir().join(format!("kvmesh-badtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), "not a certificate").unwrap();
    std::fs::write(dir.join("k.pem"), "not a key").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--grpc-listen", "off"])
        .arg("--tls-cert")
        .arg(dir.join("c.pem"))
        .arg("--tls-key")
        .arg(dir.join("k.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no PEM certificate"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
