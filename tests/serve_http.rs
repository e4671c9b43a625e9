//! `kvmesh serve` as a real process: static engines from flags, the HTTP API (score by tokens and
//! by vLLM hashes, engines listed, added and removed, metrics, health), malformed and oversized
//! requests refused with 4xx, and `--print-config` merging a file with flags.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, stored, wait_for, Killed};
use kvindex::publish::{EventPublisher, PublisherConfig};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(url: &str, body: &str) -> (u16, String) {
    let mut r = agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .expect("request reaches the server");
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn get(url: &str) -> (u16, String) {
    let mut r = agent().get(url).call().expect("request reaches the server");
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// Waits until the daemon at `base` answers its health check.
fn wait_healthy(base: &str) {
    wait_for("healthz", || {
        agent()
            .get(&format!("{base}/healthz"))
            .call()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    });
}

#[test]
fn serve_http_api() {
    let ctx = zmq::Context::new();
    let http = free_port();
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
    let base = format!("http://127.0.0.1:{http}");
    let _server = Killed(
        Command::new(env!("CARGO_BIN_EXE_kvmesh"))
            .env("KVMESH_GRPC_LISTEN", "off")
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{http}"),
                "--model",
                "m",
            ])
            .args(["--max-request-bytes", "65536"])
            .arg("--engine")
            .arg(format!(
                "e1={pub_ep},replay={}",
                publ.replay_endpoint().expect("replay endpoint")
            ))
            .stdout(Stdio::null())
            .spawn()
            .expect("kvmesh serve starts"),
    );
    wait_healthy(&base);
    assert_eq!(get(&format!("{base}/readyz")).0, 200);
    std::thread::sleep(Duration::from_millis(300));
    publ.publish(&stored(&[1, 2], None, 0)).unwrap();
    publ.publish(&stored(&[3], Some(2), 32)).unwrap();

    // Score by tokens: e1 holds the first 3 blocks of a 4-block prompt.
    let tokens: Vec<u32> = (0..64).collect();
    let body = serde_json::json!({ "model": "m", "token_ids": tokens }).to_string();
    wait_for("the events to be ingested", || {
        let (code, text) = post(&format!("{base}/v1/score"), &body);
        code == 200 && text.contains("\"matched_blocks\":3")
    });
    let (_, text) = post(&format!("{base}/v1/score"), &body);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["engines"][0]["name"], "e1");
    assert_eq!(v["engines"][0]["matched_tokens"], 48);
    assert_eq!(v["engines"][0]["tiers"]["gpu"], 3);
    // By vLLM (engine) hashes, and with an engine filter; another model sees nothing.
    let (code, text) = post(
        &format!("{base}/v1/score"),
        r#"{"model":"m","block_hashes":[1,2],"engines":["e1"]}"#,
    );
    assert_eq!(code, 200);
    assert!(text.contains("\"matched_blocks\":2"), "{text}");
    let (_, text) = post(
        &format!("{base}/v1/score"),
        &body.replace("\"m\"", "\"other\""),
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["engines"],
        serde_json::json!([])
    );

    // Engines: listed with their stream's state; added and removed at run time.
    let (code, text) = get(&format!("{base}/v1/engines"));
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["engines"][0]["name"], "e1");
    assert_eq!(v["engines"][0]["state"], "connected");
    assert_eq!(v["engines"][0]["last_seq"], 1);
    assert_eq!(v["engines"][0]["blocks"]["gpu"], 3);
    let e2 = format!(
        r#"{{"name":"e2","endpoint":"tcp://127.0.0.1:{}","model":"m"}}"#,
        free_port()
    );
    assert_eq!(post(&format!("{base}/v1/engines"), &e2).0, 201);
    assert_eq!(post(&format!("{base}/v1/engines"), &e2).0, 409);
    let del = |name: &str| {
        agent()
            .delete(&format!("{base}/v1/engines/{name}"))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(del("e2"), 204);
    assert_eq!(del("e2"), 404);

    // Bad requests get a 4xx with a message, and the server goes on.
    for (bad, want) in [
        ("{not json", 400),
        (r#"{"model":"m"}"#, 400),
        (r#"{"model":"m","token_ids":[1],"block_hashes":[1]}"#, 400),
        (r#"{"model":"m","token_ids":[-1]}"#, 400),
        (r#"{"model":"m","token_ids":[1],"surprise":1}"#, 400),
        (r#"{"model":"m","token_ids":[1],"engines":["nope"]}"#, 404),
    ] {
        let (code, text) = post(&format!("{base}/v1/score"), bad);
        assert_eq!(code, want, "{bad}: {text}");
        assert!(text.contains("error"), "{bad}: {text}");
    }
    let huge = serde_json::json!({ "model": "m", "token_ids": vec![7u32; 40_000] }).to_string();
    assert_eq!(post(&format!("{base}/v1/score"), &huge).0, 413);
    assert_eq!(
        post(
            &format!("{base}/v1/engines"),
            r#"{"name":"x","endpoint":"http://nope"}"#
        )
        .0,
        400
    );

    // Metrics.
    let (code, text) = get(&format!("{base}/metrics"));
    assert_eq!(code, 200);
    assert!(
        text.contains("kvmesh_index_blocks_stored_total 3"),
        "{text}"
    );
    assert!(
        text.contains("kvmesh_index_query_duration_seconds_count"),
        "{text}"
    );
    // Six bad scores, the oversized one, the bad engine, the duplicate engine, the unknown delete.
    assert!(text.contains("kvmesh_api_bad_requests_total 10"), "{text}");
}

#[test]
fn print_config_merges_file_env_and_flags() {
    let dir = std::env::temp_dir().join(format!("kvmesh-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kvmesh.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9000\"\nmodel = \"from-file\"\nbyte_budget = 1000000\n\n[[engines]]\nname = \"a\"\nendpoint = \"tcp://10.0.0.1:5557\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .env("KVMESH_GRPC_LISTEN", "off")
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .args([
            "--listen",
            "0.0.0.0:8181",
            "--engine",
            "b=tcp://10.0.0.2:5557,replay=tcp://10.0.0.2:5558,dp=1",
        ])
        .env("KVMESH_MODEL", "from-env")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: toml::Value = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(
        cfg["listen"].as_str(),
        Some("0.0.0.0:8181"),
        "flags win over the file"
    );
    assert_eq!(
        cfg["model"].as_str(),
        Some("from-env"),
        "the environment wins over the file"
    );
    assert_eq!(cfg["byte_budget"].as_integer(), Some(1_000_000));
    let engines = cfg["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2);
    assert_eq!(
        engines[1]["replay_endpoint"].as_str(),
        Some("tcp://10.0.0.2:5558")
    );
    assert_eq!(engines[1]["dp_rank"].as_integer(), Some(1));
    // A bad engine flag and an unknown key are clear errors.
    let out = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .env("KVMESH_GRPC_LISTEN", "off")
        .args(["serve", "--print-config", "--engine", "nameonly"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=tcp://"));
    std::fs::write(&file, "listen = \"x\"\nsurprise = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .env("KVMESH_GRPC_LISTEN", "off")
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("surprise"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replicas_share_an_index_on_redis() {
    let redis = common::RedisServer::start();
    let ctx = zmq::Context::new();
    let publ =
        EventPublisher::start(&ctx, PublisherConfig::new("tcp://127.0.0.1:0")).expect("publisher");
    // The publisher binds ports of its own choosing (no race with other tests for them).
    let pub_ep = publ.endpoint().to_string();
    let start = |http: u16, engine: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmesh"));
        cmd.env("KVMESH_GRPC_LISTEN", "off");
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{http}"),
            "--model",
            "m",
        ])
        .args(["--redis", &redis.url(), "--redis-prefix", "shared"])
        .stdout(Stdio::null());
        if engine {
            cmd.arg("--engine").arg(format!("e1={pub_ep}"));
        }
        Killed(cmd.spawn().expect("kvmesh serve starts"))
    };
    // Replica A ingests the engine; replica B only answers.
    let (http_a, http_b) = (free_port(), free_port());
    let _a = start(http_a, true);
    let _b = start(http_b, false);
    for port in [http_a, http_b] {
        wait_healthy(&format!("http://127.0.0.1:{port}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    publ.publish(&stored(&[1, 2], None, 0)).unwrap();
    let body =
        serde_json::json!({ "model": "m", "token_ids": (0..48).collect::<Vec<u32>>() }).to_string();
    let url_b = format!("http://127.0.0.1:{http_b}/v1/score");
    wait_for("replica B to see A's engine", || {
        let (code, text) = post(&url_b, &body);
        code == 200 && text.contains("\"matched_blocks\":2")
    });
    let (_, a) = post(&format!("http://127.0.0.1:{http_a}/v1/score"), &body);
    let (_, b) = post(&url_b, &body);
    assert_eq!(a, b, "both replicas answer from the one index");
    let (_, engines) = get(&format!("http://127.0.0.1:{http_b}/v1/engines"));
    assert!(engines.contains("\"state\":\"elsewhere\""), "{engines}");
    let (code, _) = post(&url_b, r#"{"model":"m","token_ids":[1],"engines":["e1"]}"#);
    assert_eq!(code, 200, "replica B knows e1 by name");
}

#[test]
fn restarted_daemon_answers_from_its_snapshot_then_catches_up() {
    let ctx = zmq::Context::new();
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
    let dir = std::env::temp_dir().join(format!("kvmesh-snap-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = dir.join("index.snap");
    let start = |http: u16| {
        Killed(
            Command::new(env!("CARGO_BIN_EXE_kvmesh"))
                .env("KVMESH_GRPC_LISTEN", "off")
                .args([
                    "serve",
                    "--listen",
                    &format!("127.0.0.1:{http}"),
                    "--model",
                    "m",
                ])
                .args(["--snapshot-interval", "1", "--snapshot"])
                .arg(&snap)
                .arg("--engine")
                .arg(format!(
                    "e1={pub_ep},replay={}",
                    publ.replay_endpoint().expect("replay endpoint")
                ))
                .stdout(Stdio::null())
                .spawn()
                .expect("kvmesh serve starts"),
        )
    };
    let matched = |http: u16| -> u64 {
        let body = serde_json::json!({ "model": "m", "token_ids": (0..80).collect::<Vec<u32>>() })
            .to_string();
        let (code, text) = post(&format!("http://127.0.0.1:{http}/v1/score"), &body);
        assert_eq!(code, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["engines"][0]["matched_blocks"].as_u64().unwrap_or(0)
    };
    let healthy = |http: u16| {
        wait_for("healthz", || {
            agent()
                .get(&format!("http://127.0.0.1:{http}/healthz"))
                .call()
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        })
    };
    let http = free_port();
    let first = start(http);
    healthy(http);
    std::thread::sleep(Duration::from_millis(300));
    publ.publish(&stored(&[1, 2], None, 0)).unwrap();
    wait_for("ingestion", || matched(http) == 2);
    // Let a snapshot be written, then kill the daemon without warning.
    std::thread::sleep(Duration::from_millis(2500));
    drop(first);
    assert!(snap.exists(), "a snapshot was written");
    // The engine goes on while the daemon is down.
    publ.publish(&stored(&[3], Some(2), 32)).unwrap();
    let http = free_port();
    let _second = start(http);
    healthy(http);
    assert_eq!(
        matched(http),
        2,
        "the restarted daemon answers from its snapshot at once"
    );
    // The next batch reveals the gap; the missed batch is replayed from the engine.
    publ.publish(&stored(&[4], Some(3), 48)).unwrap();
    wait_for("catch-up by replay", || matched(http) == 4);
    // A damaged snapshot is refused with a message, and the daemon starts empty.
    drop(_second);
    let mut bytes = std::fs::read(&snap).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&snap, &bytes).unwrap();
    let http = free_port();
    let mut third = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .env("KVMESH_GRPC_LISTEN", "off")
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{http}"),
            "--snapshot",
        ])
        .arg(&snap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    healthy(http);
    let _ = third.kill();
    let out = third.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum mismatch") && err.contains("starting empty"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bearer_token_guards_the_api() {
    let http = free_port();
    let base = format!("http://127.0.0.1:{http}");
    let _server = Killed(
        Command::new(env!("CARGO_BIN_EXE_kvmesh"))
            .env("KVMESH_GRPC_LISTEN", "off")
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{http}"),
                "--model",
                "m",
            ])
            .env("KVMESH_AUTH_TOKEN", "s3cret")
            .stdout(Stdio::null())
            .spawn()
            .expect("kvmesh serve starts"),
    );
    wait_healthy(&base);
    let body = r#"{"model":"m","token_ids":[1,2,3]}"#;
    let score = |auth: Option<&str>| {
        let mut req = agent().post(&format!("{base}/v1/score"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send(body).unwrap().status().as_u16()
    };
    assert_eq!(score(None), 401);
    assert_eq!(score(Some("Bearer wrong!")), 401);
    assert_eq!(score(Some("Bearer s3cre")), 401);
    assert_eq!(score(Some("s3cret")), 401);
    assert_eq!(score(Some("Bearer s3cret")), 200);
    assert_eq!(get(&format!("{base}/metrics")).0, 401);
    assert_eq!(get(&format!("{base}/v1/engines")).0, 401);
    assert_eq!(
        get(&format!("{base}/readyz")).0,
        200,
        "health checks stay open"
    );
    // The token is never printed back.
    let out = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .env("KVMESH_GRPC_LISTEN", "off")
        .args(["serve", "--print-config"])
        .env("KVMESH_AUTH_TOKEN", "s3cret")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("auth_token = \"(set)\"") && !text.contains("s3cret"),
        "{text}"
    );
}

#[test]
fn rust_client_against_the_daemon() {
    use kvmesh::client::{ClientError, IndexClient, NewEngine, ScoreRequest};
    let ctx = zmq::Context::new();
    let publ =
        EventPublisher::start(&ctx, PublisherConfig::new("tcp://127.0.0.1:0")).expect("publisher");
    // The publisher binds ports of its own choosing (no race with other tests for them).
    let pub_ep = publ.endpoint().to_string();
    let http = free_port();
    let _server = Killed(
        Command::new(env!("CARGO_BIN_EXE_kvmesh"))
            .env("KVMESH_GRPC_LISTEN", "off")
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{http}"),
                "--model",
                "m",
            ])
            .env("KVMESH_AUTH_TOKEN", "tok")
            .stdout(Stdio::null())
            .spawn()
            .expect("kvmesh serve starts"),
    );
    let base = format!("http://127.0.0.1:{http}");
    wait_healthy(&base);
    let client = IndexClient::new(base.clone()).with_token("tok");
    client
        .add_engine(&NewEngine {
            name: "e1".into(),
            endpoint: pub_ep.clone(),
            replay_endpoint: None,
            model: None,
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    publ.publish(&stored(&[1, 2], None, 0)).unwrap();
    let req = ScoreRequest::tokens("m", (0..40).collect());
    wait_for("ingestion", || {
        client.score(&req).map(|s| s.len() == 1).unwrap_or(false)
    });
    let s = client.score(&req).unwrap();
    assert_eq!(
        (s[0].name.as_str(), s[0].matched_blocks, s[0].tiers.gpu),
        ("e1", 2, 2)
    );
    assert_eq!(
        client.score(&ScoreRequest::hashes("m", vec![1])).unwrap()[0].matched_tokens,
        16
    );
    let engines = client.engines().unwrap();
    assert_eq!(
        (engines[0].name.as_str(), engines[0].state.as_str()),
        ("e1", "connected")
    );
    // Refusals come back as errors with the daemon's message.
    let bad = client
        .score(&ScoreRequest {
            model: "m".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(&bad, ClientError::Refused { status: 400, message } if message.contains("token_ids")),
        "{bad}"
    );
    let unauth = IndexClient::new(base.clone()).score(&req).unwrap_err();
    assert!(matches!(unauth, ClientError::Refused { status: 401, .. }));
    client.remove_engine("e1").unwrap();
    assert!(client.engines().unwrap().is_empty());
    assert!(matches!(
        client.remove_engine("e1"),
        Err(ClientError::Refused { status: 404, .. })
    ));
    let down = IndexClient::new(format!("http://127.0.0.1:{}", free_port()))
        .engines()
        .unwrap_err();
    assert!(matches!(down, ClientError::Transport(_)));
}
