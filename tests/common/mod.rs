//! Shared helpers of kvmesh's end-to-end tests: real vLLM engines (CPU build) started through
//! `tests/vllm/engine.py`, and HTTP calls to them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test with a clear message unless `tests/vllm/setup.sh` has installed vLLM.
pub fn require_vllm() {
    let cache = std::env::var_os("KVMESH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache"));
    let py = cache.join("vllm-venv/bin/python");
    let model = cache.join("tiny-llama");
    assert!(
        py.exists() && model.exists(),
        "real vLLM is not installed ({} or {} missing): run tests/vllm/setup.sh first (the README's test command does)",
        py.display(),
        model.display()
    );
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One running vLLM OpenAI server with KV events on.
pub struct Engine {
    pub name: String,
    pub url: String,
    pub pub_endpoint: String,
    pub replay_endpoint: String,
    pub port: u16,
    pub pub_port: u16,
    pub replay_port: u16,
    pub num_blocks: Option<usize>,
    pub cpu_bind: Option<String>,
    child: Option<Child>,
}

impl Engine {
    /// Starts an engine and waits until it serves (up to 10 minutes).
    pub fn start(name: &str, num_blocks: Option<usize>, cpu_bind: Option<&str>) -> Engine {
        let mut e = Engine {
            name: name.into(),
            url: String::new(),
            pub_endpoint: String::new(),
            replay_endpoint: String::new(),
            port: free_port(),
            pub_port: free_port(),
            replay_port: free_port(),
            num_blocks,
            cpu_bind: cpu_bind.map(str::to_owned),
            child: None,
        };
        // Ports are picked free but bound later, by vLLM: another process (vLLM's own internal
        // sockets included) may take one in between. A start that fails is retried on new ports.
        for attempt in 1..=3 {
            match e.launch() {
                Ok(()) => return e,
                Err(why) if attempt < 3 => {
                    eprintln!("vLLM engine {name}: {why}; retrying on other ports");
                    (e.port, e.pub_port, e.replay_port) = (free_port(), free_port(), free_port());
                }
                Err(why) => panic!("vLLM engine {name}: {why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn launch(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("python3");
        cmd.arg(root().join("tests/vllm/engine.py"))
            .args(["--name", &self.name])
            .args(["--port", &self.port.to_string()])
            .args(["--pub-port", &self.pub_port.to_string()])
            .args(["--replay-port", &self.replay_port.to_string()])
            .current_dir(root())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(n) = self.num_blocks {
            cmd.args(["--num-blocks", &n.to_string()]);
        }
        if let Some(c) = &self.cpu_bind {
            cmd.args(["--cpu-bind", c]);
        }
        let mut child = cmd.spawn().expect("spawn tests/vllm/engine.py");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with('{') {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("did not become ready within 10 minutes".into());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                return Err("exited during startup (its log is printed above)".into());
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).expect("ready line is JSON");
        self.url = v["url"].as_str().expect("url").to_owned();
        self.pub_endpoint = format!("tcp://127.0.0.1:{}", self.pub_port);
        self.replay_endpoint = format!("tcp://127.0.0.1:{}", self.replay_port);
        self.child = Some(child);
        Ok(())
    }

    /// Stops the engine (SIGTERM, then SIGKILL after 30 s) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            for _ in 0..300 {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts the engine again on the same ports.
    pub fn restart(&mut self) {
        self.stop();
        for attempt in 1..=3 {
            match self.launch() {
                Ok(()) => return,
                Err(why) if attempt < 3 => {
                    eprintln!("vLLM engine {}: {why}; retrying", self.name);
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(why) => panic!("vLLM engine {}: {why}", self.name),
            }
        }
    }

    /// A greedy one-token completion of `prompt` (token ids); returns the response JSON.
    pub fn complete(&self, prompt: &[u32]) -> serde_json::Value {
        let body = serde_json::json!({
            "model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
        });
        let mut resp = ureq::post(&format!("{}/v1/completions", self.url))
            .send_json(&body)
            .unwrap_or_else(|e| panic!("completion on {}: {e}", self.name));
        resp.body_mut().read_json().expect("completion JSON")
    }

    /// `usage.prompt_tokens_details.cached_tokens` of a completion response.
    pub fn cached_tokens(resp: &serde_json::Value) -> u64 {
        resp["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a path exists, for messages.
pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// A real `redis-server` on a free loopback port, without persistence, stopped on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts it and waits until it accepts connections; fails the test clearly if it cannot.
    pub fn start() -> RedisServer {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (tests/run installs it): {e}"));
        let server = RedisServer { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not accept connections on port {port}");
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed and reaped when dropped (a daemon or a DNS server of a test).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 30 s for `f` to hold.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One batch storing GPU blocks `hashes` (16 tokens each, ids counting up from `first`) after
/// `parent`.
pub fn stored(hashes: &[u64], parent: Option<u64>, first: u32) -> kvindex::EventBatch {
    let n = hashes.len() as u32;
    kvindex::EventBatch {
        ts: 1.0,
        events: vec![kvindex::KvEvent::BlockStored(kvindex::BlockStored {
            block_hashes: hashes.iter().map(|&h| kvindex::EngineHash(h)).collect(),
            parent_block_hash: parent.map(kvindex::EngineHash),
            token_ids: (first..first + 16 * n).collect(),
            block_size: 16,
            medium: Some(kvindex::Medium::Gpu),
            ..Default::default()
        })],
        data_parallel_rank: Some(0),
    }
}
