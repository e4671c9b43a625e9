//! `benches/run daemon`: `kvmesh serve` against Dynamo's standalone indexer, both as servers.
//!
//! Simulated engines (LRU prefix caches of fixed capacity, one ZMQ PUB socket and one replay
//! ROUTER each, exactly as vLLM publishes) serve the Mooncake conversation trace expanded to
//! 16-token blocks and publish genuine vLLM msgpack event batches. Two indexers subscribe to the
//! SAME sockets in the same run:
//!
//! * `kvmesh serve`, a child process of this bench's release build, and
//! * Dynamo's standalone indexer, `python -m dynamo.indexer` from the `ai-dynamo-runtime` wheel
//!   (installed into `.cache/dynamo-venv` by `benches/dynamo-setup.sh`).
//!
//! The first part of the trace is published up front (the "warm" index); the rest is published
//! at a steady rate during every measurement, so both indexers ingest while they answer. Both
//! are asked the same questions (the trace's prompts, as token ids) over HTTP/1.1 with keep-alive
//! by the same client, whose request bytes are built before the clock starts:
//!
//! * `score_rps`: closed loop at saturation (the best of a few client concurrencies);
//! * `score_p50_us`, `score_p99_us`: open loop, paced at half of that system's own saturated
//!   rate; latency is measured from each request's scheduled start, so queueing counts.
//!
//! The same three with a `dynamo_` prefix are Dynamo's. Repeats alternate between the two
//! systems and the figures are medians of the repeats. Before measuring, both indexers must give
//! the same non-empty answers on a sample of prompts, so a broken setup is not compared, and
//! after it both must have applied everything streamed. If Dynamo's indexer cannot be installed,
//! started, fed or asked, the bench fails with the reason.
//!
//! Extra figures, not part of the like-for-like comparison: each server's CPU time per request
//! at saturation (`score_cpu_us`, read from `/proc`, less sensitive to other load on the machine
//! than rates), the cores each needs to ingest the stream alone, kvmesh's latency at Dynamo's
//! pace (the same offered load), and kvmesh's gRPC streaming batch score rate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use kvindex::publish::{EventPublisher, PublisherConfig};
use kvindex::trace::{default_engine_hash, engine_hashes, load_trace, prompt_tokens, LruEngine};
use kvindex::{BlockRemoved, BlockStored, EngineHash, EventBatch, KvEvent, Medium};
use kvmesh::client::{GrpcIndexClient, ScoreRequest};

const BS: usize = 16;
const MODEL: &str = "mooncake";

struct Args {
    quick: bool,
    trace: PathBuf,
    engines: usize,
    capacity: usize,
    requests: Option<usize>,
    /// Distinct prompts asked (cycled).
    prompts: usize,
    /// Seconds of each measurement.
    secs: f64,
    repeats: usize,
    /// Client concurrencies tried for the saturated rate.
    concurrency: Vec<usize>,
    /// Client threads of the paced (open-loop) runs.
    open_threads: usize,
    /// Fraction of the trace published before measuring.
    warm_fraction: f64,
    dynamo_threads: usize,
    /// Event batches per second published during the measurements (all engines together).
    stream_rate: f64,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        trace: PathBuf::from("../shared/data/mooncake/conversation_trace.jsonl"),
        engines: 32,
        capacity: 32_768,
        requests: None,
        prompts: 1000,
        secs: 4.0,
        repeats: 3,
        concurrency: vec![4, 16, 64],
        open_threads: 64,
        warm_fraction: 0.5,
        dynamo_threads: 4,
        stream_rate: 40.0,
    };
    // --quick sets smaller defaults; flags given explicitly still win.
    if std::env::args().any(|x| x == "--quick") {
        a.quick = true;
        a.requests = Some(3000);
        a.prompts = 300;
        a.secs = 2.0;
        a.repeats = 1;
        a.concurrency = vec![16];
        a.open_threads = 32;
    }
    let mut it = std::env::args().skip(1);
    let num = |it: &mut dyn Iterator<Item = String>, what: &str| -> f64 {
        it.next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| fail(&format!("{what} needs a number")))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--trace" => {
                a.trace = it
                    .next()
                    .unwrap_or_else(|| fail("--trace needs a FILE"))
                    .into()
            }
            "--engines" => a.engines = num(&mut it, "--engines") as usize,
            "--capacity" => a.capacity = num(&mut it, "--capacity") as usize,
            "--requests" => a.requests = Some(num(&mut it, "--requests") as usize),
            "--prompts" => a.prompts = num(&mut it, "--prompts") as usize,
            "--secs" => a.secs = num(&mut it, "--secs"),
            "--repeats" => a.repeats = num(&mut it, "--repeats") as usize,
            "--concurrency" => {
                a.concurrency = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|c| c.parse().unwrap_or_else(|_| fail("--concurrency N,N,...")))
                    .collect()
            }
            "--dynamo-threads" => a.dynamo_threads = num(&mut it, "--dynamo-threads") as usize,
            "--stream-rate" => a.stream_rate = num(&mut it, "--stream-rate"),
            "--bench" => {}
            other => fail(&format!(
                "unknown argument {other} (--quick, --trace FILE, --engines N, --capacity BLOCKS, \
                 --requests N, --prompts N, --secs S, --repeats N, --concurrency N,N, \
                 --dynamo-threads N, --stream-rate BATCHES_PER_S)"
            )),
        }
    }
    a.repeats = a.repeats.max(1);
    a
}

/// Stops the bench with a message: a benchmark that cannot run both systems must fail loudly.
fn fail(msg: &str) -> ! {
    eprintln!("[daemon] FAILED: {msg}");
    kill_children();
    std::process::exit(1);
}

/// The servers this bench started, stopped on every way out (`exit` runs no destructors).
static CHILDREN: parking_lot::Mutex<Vec<u32>> = parking_lot::Mutex::new(Vec::new());

fn kill_children() {
    for pid in CHILDREN.lock().drain(..) {
        let _ = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| fail(&format!("no free port: {e}")))
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one keep-alive connection, prebuilt request bytes, so the client
// spends as little of the machine's CPU as possible and the same on both servers.

struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(64 << 10),
        }
    }

    /// Sends one request and returns (status, body).
    fn call(&mut self, req: &[u8]) -> std::io::Result<(u16, &[u8])> {
        for attempt in 0..2 {
            if self.stream.is_none() {
                let s = TcpStream::connect(self.addr)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                self.stream = Some(s);
            }
            match self.exchange(req) {
                Ok((status, start, end)) => return Ok((status, &self.buf[start..end])),
                Err(e) => {
                    self.stream = None;
                    if attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!()
    }

    fn exchange(&mut self, req: &[u8]) -> std::io::Result<(u16, usize, usize)> {
        let s = self.stream.as_mut().expect("connected");
        s.write_all(req)?;
        self.buf.clear();
        let mut chunk = [0u8; 16 << 10];
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| std::io::Error::other("non-utf8 response head"))?;
        let status: u16 = head
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {head:?}")))?;
        let mut length = None;
        let mut chunked = false;
        for line in head.lines() {
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    length = v.trim().parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
            }
        }
        if let Some(len) = length {
            while self.buf.len() < head_end + len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(std::io::Error::other("connection closed in body"));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            return Ok((status, head_end, head_end + len));
        }
        if !chunked {
            return Err(std::io::Error::other("response without length"));
        }
        // Chunked: read until the terminating chunk, then de-chunk in place.
        while find(&self.buf[head_end..], b"\r\n0\r\n\r\n").is_none()
            && !self.buf[head_end..].starts_with(b"0\r\n\r\n")
        {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed in chunked body"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let mut body = Vec::new();
        let mut p = head_end;
        loop {
            let eol = find(&self.buf[p..], b"\r\n")
                .ok_or_else(|| std::io::Error::other("bad chunk"))?
                + p;
            let size = usize::from_str_radix(
                std::str::from_utf8(&self.buf[p..eol])
                    .unwrap_or("")
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&self.buf[eol + 2..eol + 2 + size]);
            p = eol + 2 + size + 2;
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(&body);
        Ok((status, start, self.buf.len()))
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn get(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").into_bytes()
}

/// One call on a fresh connection, body parsed as JSON (for checks, not for timing).
fn call_json(addr: SocketAddr, req: &[u8]) -> Result<(u16, serde_json::Value), String> {
    let mut c = Conn::new(addr);
    let (status, body) = c.call(req).map_err(|e| e.to_string())?;
    let v = serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()));
    Ok((status, v))
}

// ---------------------------------------------------------------------------------------------
// The two servers.

/// A child process killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            fail(&format!(
                "{} exited ({status}); last lines of {}:\n{tail}",
                self.name,
                self.log.display()
            ));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        CHILDREN.lock().retain(|&p| p != self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log)
        .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", log.display())));
    let f2 = f.try_clone().expect("clone log handle");
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {name} ({cmd:?}): {e}")));
    CHILDREN.lock().push(child.id());
    Proc {
        name,
        child,
        log: log.to_owned(),
    }
}

/// Waits until `GET path` answers 200.
fn wait_http(p: &mut Proc, addr: SocketAddr, path: &str, within: Duration) {
    let t = Instant::now();
    loop {
        p.check_alive();
        if let Ok((200, _)) = call_json(addr, &get(addr, path)) {
            return;
        }
        if t.elapsed() > within {
            fail(&format!(
                "{} did not answer GET {path} on {addr} within {within:?} (log: {})",
                p.name,
                p.log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Installs (idempotently) and locates Dynamo's Python environment.
fn dynamo_python() -> PathBuf {
    let out = Command::new("bash")
        .arg("benches/dynamo-setup.sh")
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run benches/dynamo-setup.sh: {e}")));
    if !out.status.success() {
        fail(
            "benches/dynamo-setup.sh could not install Dynamo's standalone indexer \
             (ai-dynamo-runtime 1.6.1 from PyPI); the comparison cannot run without it",
        );
    }
    let py = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_owned();
    if py.is_empty() || !Path::new(&py).exists() {
        fail(&format!(
            "benches/dynamo-setup.sh printed no usable python ({py:?})"
        ));
    }
    PathBuf::from(py)
}

/// The two systems behind one interface: how to ask, and how to read the answer as
/// (engine index, matched blocks) pairs.
#[derive(Clone, Copy, PartialEq)]
enum Sys {
    Kvmesh,
    Dynamo,
}

impl Sys {
    fn name(self) -> &'static str {
        match self {
            Sys::Kvmesh => "kvmesh",
            Sys::Dynamo => "dynamo",
        }
    }

    fn request(self, addr: SocketAddr, tokens: &[u32]) -> Vec<u8> {
        let body = match self {
            Sys::Kvmesh => serde_json::json!({ "model": MODEL, "token_ids": tokens }),
            Sys::Dynamo => serde_json::json!({ "model_name": MODEL, "token_ids": tokens }),
        };
        let path = match self {
            Sys::Kvmesh => "/v1/score",
            Sys::Dynamo => "/query",
        };
        post(
            addr,
            path,
            &serde_json::to_vec(&body).expect("serialisable"),
        )
    }

    /// (engine, matched blocks) for every engine with a non-empty match, sorted.
    fn matches(self, v: &serde_json::Value) -> Result<Vec<(usize, u32)>, String> {
        let mut out = Vec::new();
        match self {
            Sys::Kvmesh => {
                let engines = v["engines"]
                    .as_array()
                    .ok_or_else(|| format!("no \"engines\" in {v}"))?;
                for e in engines {
                    let name = e["name"].as_str().unwrap_or("");
                    let idx = name
                        .strip_prefix("engine-")
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| format!("unexpected engine name {name:?}"))?;
                    let m = e["matched_blocks"].as_u64().unwrap_or(0) as u32;
                    if m > 0 {
                        out.push((idx, m));
                    }
                }
            }
            Sys::Dynamo => {
                // {"scores": {"<worker id>": {"<dp rank>": matched tokens}}, ...}
                let scores = v["scores"]
                    .as_object()
                    .ok_or_else(|| format!("no \"scores\" in {v}"))?;
                for (worker, ranks) in scores {
                    let id: usize = worker
                        .parse()
                        .map_err(|_| format!("unexpected worker id {worker:?}"))?;
                    let tokens: u64 = ranks
                        .as_object()
                        .map(|r| r.values().filter_map(|x| x.as_u64()).max().unwrap_or(0))
                        .unwrap_or(0);
                    if tokens > 0 {
                        out.push((id - 1, (tokens / BS as u64) as u32));
                    }
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Load.

struct Load {
    addr: SocketAddr,
    reqs: Arc<Vec<Vec<u8>>>,
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state; utime and stime are
    // the 14th and 15th fields, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Closed loop: `threads` clients each send back to back for `secs`; requests per second.
/// Also returns the server's CPU time per request (µs), ingestion meanwhile included, and this
/// process's (the client's, with the event stream's publishers).
fn closed_loop(
    load: &Load,
    pid: u32,
    threads: usize,
    secs: f64,
    errors: &AtomicU64,
) -> (f64, f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, done, start) = (stop.clone(), done.clone(), start.clone());
            let (addr, reqs) = (load.addr, load.reqs.clone());
            std::thread::spawn(move || {
                let mut c = Conn::new(addr);
                let mut i = t * 7919;
                let mut errs = 0u64;
                // Connect before the clock starts.
                let _ = c.call(&reqs[i % reqs.len()]);
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    match c.call(&reqs[i % reqs.len()]) {
                        Ok((200, _)) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => errs += 1,
                    }
                    i += 1;
                }
                errs
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    let me = std::process::id();
    let (cpu0, mine0, n0) = (cpu_secs(pid), cpu_secs(me), done.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Ordering::Relaxed) - n0;
    let el = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    let mine = cpu_secs(me) - mine0;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        errors.fetch_add(h.join().unwrap_or(1), Ordering::Relaxed);
    }
    let per = |c: f64| c * 1e6 / n.max(1) as f64;
    (n as f64 / el, per(cpu), per(mine))
}

/// Closed loop over kvmesh's gRPC streaming batch score: `threads` clients each stream batches
/// of `batch` prompts back to back for `secs`; prompts answered per second.
fn grpc_loop(
    url: &str,
    prompts: &Arc<Vec<ScoreRequest>>,
    threads: usize,
    batch: usize,
    secs: f64,
    errors: &AtomicU64,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, done, start, prompts) =
                (stop.clone(), done.clone(), start.clone(), prompts.clone());
            let url = url.to_owned();
            std::thread::spawn(move || {
                let client = GrpcIndexClient::connect(&url, None, None);
                start.wait();
                let Ok(client) = client else { return 1 };
                let windows = (prompts.len() / batch).max(1);
                let mut i = t * 13;
                let mut errs = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let w = i % windows;
                    let reqs = &prompts[w * batch..((w + 1) * batch).min(prompts.len())];
                    match client.score_many(reqs) {
                        Ok(answers) if answers.len() == reqs.len() => {
                            done.fetch_add(reqs.len() as u64, Ordering::Relaxed);
                        }
                        _ => errs += 1,
                    }
                    i += 1;
                }
                errs
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    let n0 = done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Ordering::Relaxed) - n0;
    let el = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        errors.fetch_add(h.join().unwrap_or(1), Ordering::Relaxed);
    }
    n as f64 / el
}

/// Open loop: requests scheduled at `rate` per second for `secs`, served by a pool of clients;
/// each latency counts from the request's scheduled time. Returns sorted latencies (µs) and how
/// many requests started late by more than 1 ms (the client could not keep the pace).
fn open_loop(load: &Load, threads: usize, rate: f64, secs: f64, errors: &AtomicU64) -> Vec<f64> {
    let total = (rate * secs).max(1.0) as usize;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(threads + 1));
    let t0 = Arc::new(parking_lot::Mutex::new(None::<Instant>));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (next, start, t0) = (next.clone(), start.clone(), t0.clone());
            let (addr, reqs) = (load.addr, load.reqs.clone());
            std::thread::spawn(move || {
                let mut c = Conn::new(addr);
                let _ = c.call(&reqs[(t * 7919) % reqs.len()]);
                start.wait();
                start.wait();
                let t0 = (*t0.lock()).expect("start time set");
                let mut lat = Vec::new();
                let mut errs = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let at = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    match c.call(&reqs[(i * 31) % reqs.len()]) {
                        Ok((200, _)) => lat.push(at.elapsed().as_secs_f64() * 1e6),
                        _ => errs += 1,
                    }
                }
                (lat, errs)
            })
        })
        .collect();
    start.wait();
    *t0.lock() = Some(Instant::now() + Duration::from_millis(20));
    start.wait();
    let mut all = Vec::with_capacity(total);
    for h in handles {
        match h.join() {
            Ok((l, e)) => {
                all.extend(l);
                errors.fetch_add(e, Ordering::Relaxed);
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    all.sort_by(f64::total_cmp);
    all
}

// ---------------------------------------------------------------------------------------------
// Events.

/// A one-block batch on `engine` with tokens no trace prompt has (trace tokens are < 32000):
/// stored, or removed again.
fn marker(engine: usize, round: u64, remove: bool) -> (Vec<u32>, EventBatch) {
    let tokens: Vec<u32> = (0..BS as u32)
        .map(|t| 40_000 + (engine as u32) * 1000 + (round as u32 % 500) * 2 + (t % 2) + t * 7)
        .collect();
    let h = default_engine_hash(None, &tokens) ^ 0x6d61_726b_6572;
    let event = if remove {
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![EngineHash(h)],
            medium: Some(Medium::Gpu),
            group_idx: Some(0),
            ..Default::default()
        })
    } else {
        KvEvent::BlockStored(BlockStored {
            block_hashes: vec![EngineHash(h)],
            parent_block_hash: None,
            token_ids: tokens.clone(),
            block_size: BS as u32,
            medium: Some(Medium::Gpu),
            extra_keys: Some(vec![None]),
            group_idx: Some(0),
            kv_cache_spec_kind: Some("full_attention".into()),
            ..Default::default()
        })
    };
    (
        tokens,
        EventBatch {
            ts: 0.0,
            events: vec![event],
            data_parallel_rank: Some(0),
        },
    )
}

/// Publishes a marker block on every engine and waits until both indexers report each on its
/// engine (re-publishing meanwhile: a subscriber may still be joining); then removes the
/// markers. Returns the seconds it took. This both proves ingestion works and tells when both
/// indexers have applied everything published before.
fn sync_markers(
    pubs: &[EventPublisher],
    servers: &[(Sys, SocketAddr)],
    procs: &mut [&mut Proc],
    round: u64,
    within: Duration,
) -> f64 {
    let t = Instant::now();
    let mut pending: Vec<(usize, Sys, SocketAddr)> = (0..pubs.len())
        .flat_map(|e| servers.iter().map(move |&(s, a)| (e, s, a)))
        .collect();
    let mut last_pub = None::<Instant>;
    while !pending.is_empty() {
        if last_pub.is_none_or(|p: Instant| p.elapsed() > Duration::from_millis(500)) {
            for (e, p) in pubs.iter().enumerate() {
                if pending.iter().any(|x| x.0 == e) {
                    let (_, b) = marker(e, round, false);
                    p.publish(&b)
                        .unwrap_or_else(|err| fail(&format!("publishing: {err}")));
                }
            }
            last_pub = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
        pending.retain(|&(e, sys, addr)| {
            let (tokens, _) = marker(e, round, false);
            match call_json(addr, &sys.request(addr, &tokens)) {
                Ok((200, v)) => !sys
                    .matches(&v)
                    .map(|m| m.contains(&(e, 1)))
                    .unwrap_or(false),
                _ => true,
            }
        });
        for p in procs.iter_mut() {
            p.check_alive();
        }
        if t.elapsed() > within {
            let who: Vec<String> = pending
                .iter()
                .take(8)
                .map(|(e, s, _)| format!("{} engine-{e}", s.name()))
                .collect();
            fail(&format!(
                "events published over ZMQ did not show up in the indexers within {within:?}: \
                 still missing {} (e.g. {who:?})",
                pending.len()
            ));
        }
    }
    for (e, p) in pubs.iter().enumerate() {
        let (_, b) = marker(e, round, true);
        p.publish(&b)
            .unwrap_or_else(|err| fail(&format!("publishing: {err}")));
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let a = args();
    let t0 = Instant::now();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_children();
        default_hook(info);
    }));
    std::fs::create_dir_all("target/bench").ok();

    // 0. Dynamo's environment first: without it there is nothing to compare.
    let python = dynamo_python();

    // 1. The workload.
    let reqs = load_trace(&a.trace, a.requests).unwrap_or_else(|e| fail(&e.to_string()));
    eprintln!(
        "[daemon] {} requests from {}",
        reqs.len(),
        a.trace.display()
    );
    let mut engines: Vec<LruEngine> = (0..a.engines)
        .map(|_| LruEngine::new(a.capacity, BS))
        .collect();
    let mut batches: Vec<(usize, EventBatch, usize, usize)> = Vec::new();
    let mut prompts: Vec<Vec<u32>> = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let toks = prompt_tokens(r, BS);
        let hashes = engine_hashes(&toks, BS, &default_engine_hash);
        let e = i % a.engines;
        let out = engines[e].serve(&toks, &hashes, r.timestamp as f64 / 1000.0);
        if !out.batch.events.is_empty() {
            let ops: usize = out
                .batch
                .events
                .iter()
                .map(|ev| match ev {
                    KvEvent::BlockStored(s) => s.block_hashes.len(),
                    KvEvent::BlockRemoved(r) => r.block_hashes.len(),
                    KvEvent::AllBlocksCleared => 0,
                })
                .sum();
            batches.push((e, out.batch, ops, i));
        }
        prompts.push(toks);
    }
    let warm = ((batches.len() as f64) * a.warm_fraction) as usize;
    let mean_tokens = prompts.iter().map(|p| p.len()).sum::<usize>() as f64 / prompts.len() as f64;
    eprintln!(
        "[daemon] {} batches ({} published before measuring, the rest streamed), prompts of {:.0} tokens on average",
        batches.len(),
        warm,
        mean_tokens
    );

    // 2. The engines' sockets.
    let ctx = zmq::Context::new();
    let pubs: Vec<EventPublisher> = (0..a.engines)
        .map(|_| {
            let mut cfg = PublisherConfig::new("tcp://127.0.0.1:0");
            cfg.replay_endpoint = Some("tcp://127.0.0.1:0".into());
            EventPublisher::start(&ctx, cfg)
                .unwrap_or_else(|e| fail(&format!("starting a publisher: {e}")))
        })
        .collect();

    // 3. The two indexers, subscribed to the same sockets.
    let kv_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let kv_grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut kv_cmd = Command::new(env!("CARGO_BIN_EXE_kvmesh"));
    kv_cmd
        .arg("serve")
        .args(["--listen", &kv_addr.to_string()])
        .args(["--grpc-listen", &kv_grpc.to_string()])
        .args(["--model", MODEL])
        .args(["--byte-budget", &(4u64 << 30).to_string()]);
    for (e, p) in pubs.iter().enumerate() {
        kv_cmd.arg("--engine").arg(format!(
            "engine-{e}={},replay={}",
            p.endpoint(),
            p.replay_endpoint().expect("replay endpoint")
        ));
    }
    let mut kv = spawn(
        "kvmesh serve",
        kv_cmd,
        Path::new("target/bench/daemon-kvmesh.log"),
    );

    let dy_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let workers: Vec<String> = pubs
        .iter()
        .enumerate()
        .map(|(e, p)| format!("{}={}", e + 1, p.endpoint()))
        .collect();
    let mut dy_cmd = Command::new(&python);
    dy_cmd
        .args(["-m", "dynamo.indexer"])
        .args(["--block-size", &BS.to_string()])
        .args(["--port", &dy_addr.port().to_string()])
        .args(["--model-name", MODEL])
        .args(["--threads", &a.dynamo_threads.to_string()])
        .args(["--workers", &workers.join(",")])
        .env("DYN_LOG", "warn");
    let mut dy = spawn(
        "dynamo indexer",
        dy_cmd,
        Path::new("target/bench/daemon-dynamo.log"),
    );
    wait_http(&mut kv, kv_addr, "/healthz", Duration::from_secs(30));
    wait_http(&mut dy, dy_addr, "/workers", Duration::from_secs(60));
    let servers = [(Sys::Kvmesh, kv_addr), (Sys::Dynamo, dy_addr)];
    let s = sync_markers(
        &pubs,
        &servers,
        &mut [&mut kv, &mut dy],
        0,
        Duration::from_secs(60),
    );
    eprintln!(
        "[daemon] both indexers subscribed to {} engines ({s:.1}s)",
        a.engines
    );

    // 4. The warm part of the trace, then wait until both have applied all of it.
    let t = Instant::now();
    let mut warm_ops = 0usize;
    for (e, b, ops, _) in &batches[..warm] {
        pubs[*e]
            .publish(b)
            .unwrap_or_else(|err| fail(&format!("publishing: {err}")));
        warm_ops += ops;
    }
    sync_markers(
        &pubs,
        &servers,
        &mut [&mut kv, &mut dy],
        1,
        Duration::from_secs(300),
    );
    eprintln!(
        "[daemon] {} batches ({} block ops) published and applied by both in {:.1}s",
        warm,
        warm_ops,
        t.elapsed().as_secs_f64()
    );

    // 5. Both must give the same, non-empty answers before anything is timed.
    let (mut nonzero_kv, mut nonzero_dy, mut agree, mut checked) = (0, 0, 0, 0);
    let mut first_diff = None;
    // The prompts of the requests whose batches were published.
    let warm_requests = batches[..warm].last().map(|b| b.3 + 1).unwrap_or(0);
    for p in prompts[..warm_requests]
        .iter()
        .step_by((warm_requests / 200).max(1))
        .take(200)
    {
        let mut got = Vec::new();
        for &(sys, addr) in &servers {
            let (status, v) = call_json(addr, &sys.request(addr, p))
                .unwrap_or_else(|e| fail(&format!("{}: {e}", sys.name())));
            if status != 200 {
                fail(&format!("{} answered {status}: {v}", sys.name()));
            }
            got.push(sys.matches(&v).unwrap_or_else(|e| fail(&e)));
        }
        checked += 1;
        nonzero_kv += usize::from(!got[0].is_empty());
        nonzero_dy += usize::from(!got[1].is_empty());
        if got[0] == got[1] {
            agree += 1;
        } else if first_diff.is_none() {
            first_diff = Some(format!("kvmesh {:?} vs dynamo {:?}", got[0], got[1]));
        }
    }
    eprintln!(
        "[daemon] answers on {checked} published prompts: kvmesh {nonzero_kv} with a match, dynamo {nonzero_dy}, identical {agree}{}",
        first_diff.as_ref().map(|d| format!(" (first difference: {d})")).unwrap_or_default()
    );
    if nonzero_kv * 2 < checked || nonzero_dy * 2 < checked {
        fail("an indexer found no cached prefix for most prompts the engines served: broken setup");
    }
    if agree * 10 < checked * 9 {
        fail("kvmesh and dynamo disagree on more than 10% of prompts: broken setup");
    }

    // 6. The questions: spread over the whole trace, request bytes built up front.
    let qstep = (prompts.len() / a.prompts.max(1)).max(1);
    let sample: Vec<&Vec<u32>> = prompts.iter().step_by(qstep).take(a.prompts).collect();
    let loads: Vec<Load> = servers
        .iter()
        .map(|&(sys, addr)| Load {
            addr,
            reqs: Arc::new(sample.iter().map(|p| sys.request(addr, p)).collect()),
        })
        .collect();

    // 7. The steady event stream: the rest of the trace, paced over the measurements.
    let rest: Vec<(usize, EventBatch, usize, usize)> = batches[warm..].to_vec();
    let stream_rate = a.stream_rate.max(0.001);
    let stop_stream = Arc::new(AtomicBool::new(false));
    let streamed = Arc::new(AtomicU64::new(0));
    let streamed_ops = Arc::new(AtomicU64::new(0));
    let pubs = Arc::new(pubs);
    let stream = {
        let (stop, n, ops, pubs) = (
            stop_stream.clone(),
            streamed.clone(),
            streamed_ops.clone(),
            pubs.clone(),
        );
        std::thread::spawn(move || {
            let t = Instant::now();
            for (i, (e, b, o, _)) in rest.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let at = Duration::from_secs_f64(i as f64 / stream_rate);
                let el = t.elapsed();
                if at > el {
                    std::thread::sleep(at - el);
                }
                if pubs[*e].publish(b).is_err() {
                    break;
                }
                n.fetch_add(1, Ordering::Relaxed);
                ops.fetch_add(*o as u64, Ordering::Relaxed);
            }
            t.elapsed().as_secs_f64()
        })
    };
    let measure_start = Instant::now();
    // What ingesting the stream costs each server with no queries: CPU cores busy.
    let (c0, t) = (
        [cpu_secs(kv.child.id()), cpu_secs(dy.child.id())],
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs_f64(a.secs.min(2.0)));
    let idle_cores = [
        (cpu_secs(kv.child.id()) - c0[0]) / t.elapsed().as_secs_f64(),
        (cpu_secs(dy.child.id()) - c0[1]) / t.elapsed().as_secs_f64(),
    ];
    eprintln!(
        "[daemon] ingesting the stream alone keeps kvmesh {:.2} and dynamo {:.2} cores busy",
        idle_cores[0], idle_cores[1]
    );

    // 8. Saturation, alternating systems; then paced at half of each one's own rate.
    let errors = [AtomicU64::new(0), AtomicU64::new(0)];
    let mut rps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let pids = [kv.child.id(), dy.child.id()];
    for r in 0..a.repeats {
        for (s, (sys, _)) in servers.iter().enumerate() {
            let mut best = (0f64, 0f64, 0f64);
            for &c in &a.concurrency {
                let x = closed_loop(&loads[s], pids[s], c, a.secs, &errors[s]);
                eprintln!(
                    "[daemon] run {} {:<7} closed loop, {:>3} clients: {:>8.0} requests/s, CPU per request: server {:>4.0} us, client {:>4.0} us",
                    r + 1,
                    sys.name(),
                    c,
                    x.0,
                    x.1,
                    x.2
                );
                if x.0 > best.0 {
                    best = x;
                }
            }
            rps[s].push(best.0);
            cpu[s].push(best.1);
        }
        kv.check_alive();
        dy.check_alive();
    }
    let sat = [median(rps[0].clone()), median(rps[1].clone())];
    let mut p50: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p99: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut same_pace: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for r in 0..a.repeats {
        for (s, (sys, _)) in servers.iter().enumerate() {
            let rate = sat[s] / 2.0;
            let lat = open_loop(&loads[s], a.open_threads, rate, a.secs, &errors[s]);
            eprintln!(
                "[daemon] run {} {:<7} paced at {:>7.0}/s: p50 {:>8.0} us, p99 {:>8.0} us ({} requests)",
                r + 1,
                sys.name(),
                rate,
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                lat.len()
            );
            p50[s].push(pct(&lat, 0.5));
            p99[s].push(pct(&lat, 0.99));
        }
        // Extra: kvmesh at Dynamo's pace (half of Dynamo's saturated rate), the same offered load.
        let rate = sat[1] / 2.0;
        let lat = open_loop(&loads[0], a.open_threads, rate, a.secs, &errors[0]);
        eprintln!(
            "[daemon] run {} kvmesh  paced at {:>7.0}/s (dynamo's pace): p50 {:>8.0} us, p99 {:>8.0} us",
            r + 1,
            rate,
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
        same_pace[0].push(pct(&lat, 0.5));
        same_pace[1].push(pct(&lat, 0.99));
        kv.check_alive();
        dy.check_alive();
    }
    // An extra figure, not the like-for-like comparison: kvmesh's gRPC streaming batch score
    // (protobuf, 32 prompts per stream), same prompts, while the stream goes on.
    let grpc_prompts: Arc<Vec<ScoreRequest>> = Arc::new(
        sample
            .iter()
            .map(|p| ScoreRequest::tokens(MODEL, p.to_vec()))
            .collect(),
    );
    let grpc_url = format!("http://{kv_grpc}");
    let grpc_threads = a.concurrency.iter().copied().max().unwrap_or(16).min(16);
    let mut grpc_rps = Vec::new();
    for r in 0..a.repeats {
        let x = grpc_loop(
            &grpc_url,
            &grpc_prompts,
            grpc_threads,
            32,
            a.secs,
            &errors[0],
        );
        eprintln!(
            "[daemon] run {} kvmesh  gRPC streams of 32, {grpc_threads} clients: {x:>8.0} requests/s",
            r + 1
        );
        grpc_rps.push(x);
    }
    kv.check_alive();
    let measured = measure_start.elapsed().as_secs_f64();
    stop_stream.store(true, Ordering::Relaxed);
    let _ = stream.join();
    let streamed_batches = streamed.load(Ordering::Relaxed);
    let streamed_ops = streamed_ops.load(Ordering::Relaxed);
    // Both must still keep up with the stream: everything streamed is applied by both.
    let s = sync_markers(
        &pubs,
        &servers,
        &mut [&mut kv, &mut dy],
        2,
        Duration::from_secs(120),
    );
    eprintln!("[daemon] both indexers caught up with the stream {s:.1}s after it ended");
    for (s, (sys, _)) in servers.iter().enumerate() {
        let e = errors[s].load(Ordering::Relaxed);
        if e > 0 {
            fail(&format!(
                "{e} {} requests failed during the measurement",
                sys.name()
            ));
        }
    }

    // 9. Report.
    let ours = [sat[0], median(p50[0].clone()), median(p99[0].clone())];
    let theirs = [sat[1], median(p50[1].clone()), median(p99[1].clone())];
    let names = ["score_rps", "score_p50_us", "score_p99_us"];
    println!();
    println!(
        "{:<16} {:>12} {:>12} {:>9}",
        "figure", "kvmesh", "dynamo", "ratio"
    );
    for i in 0..3 {
        let ratio = if i == 0 {
            ours[i] / theirs[i]
        } else {
            theirs[i] / ours[i]
        };
        println!(
            "{:<16} {:>12.0} {:>12.0} {:>8.2}x",
            names[i], ours[i], theirs[i], ratio
        );
    }
    let (sp50, sp99) = (median(same_pace[0].clone()), median(same_pace[1].clone()));
    println!(
        "{:<16} {:>12.0} {:>12.0} {:>8.2}x   (both at dynamo's pace; extra)",
        "p50_same_pace",
        sp50,
        theirs[1],
        theirs[1] / sp50
    );
    println!(
        "{:<16} {:>12.0} {:>12.0} {:>8.2}x   (both at dynamo's pace; extra)",
        "p99_same_pace",
        sp99,
        theirs[2],
        theirs[2] / sp99
    );
    println!(
        "{:<16} {:>12.0} {:>12} {:>9}   (kvmesh gRPC streaming batch score, protobuf; extra)",
        "grpc_stream_rps",
        median(grpc_rps.clone()),
        "-",
        "-"
    );
    let (cpu_ours, cpu_theirs) = (median(cpu[0].clone()), median(cpu[1].clone()));
    println!(
        "{:<16} {:>12.0} {:>12.0} {:>8.2}x   (server CPU per request at saturation, ingestion included)",
        "score_cpu_us",
        cpu_ours,
        cpu_theirs,
        cpu_theirs / cpu_ours
    );
    println!(
        "{:<16} {:>12.2} {:>12.2} {:>8.2}x   (cores busy ingesting the stream, no queries)",
        "ingest_cpu_cores",
        idle_cores[0],
        idle_cores[1],
        idle_cores[1] / idle_cores[0]
    );
    println!(
        "\nHTTP/JSON token-id queries ({} distinct prompts of {:.0} tokens on average from {} requests), {} engines; \
         saturation: best of {:?} closed-loop clients; latency: open loop at half each system's own saturated rate, {} clients; \
         medians of {} runs of {:.0}s; event stream during the measurements: {:.0} batches/s, {:.0} block ops/s; \
         dynamo indexer threads: {}",
        sample.len(),
        sample.iter().map(|p| p.len()).sum::<usize>() as f64 / sample.len().max(1) as f64,
        reqs.len(),
        a.engines,
        a.concurrency,
        a.open_threads,
        a.repeats,
        a.secs,
        streamed_batches as f64 / measured,
        streamed_ops as f64 / measured,
        a.dynamo_threads
    );
    let mut json = serde_json::Map::new();
    for i in 0..3 {
        json.insert(names[i].into(), ours[i].into());
        json.insert(format!("dynamo_{}", names[i]), theirs[i].into());
    }
    json.insert(
        "grpc_stream_score_rps".into(),
        median(grpc_rps.clone()).into(),
    );
    json.insert("score_cpu_us".into(), median(cpu[0].clone()).into());
    json.insert("dynamo_score_cpu_us".into(), median(cpu[1].clone()).into());
    json.insert("ingest_cpu_cores".into(), idle_cores[0].into());
    json.insert("dynamo_ingest_cpu_cores".into(), idle_cores[1].into());
    json.insert("score_rps_ratio".into(), (ours[0] / theirs[0]).into());
    json.insert("score_p99_ratio".into(), (theirs[2] / ours[2]).into());
    json.insert("requests".into(), reqs.len().into());
    json.insert("engines".into(), a.engines.into());
    json.insert("prompts".into(), sample.len().into());
    json.insert(
        "stream_batches_per_s".into(),
        (streamed_batches as f64 / measured).into(),
    );
    json.insert(
        "stream_block_ops_per_s".into(),
        (streamed_ops as f64 / measured).into(),
    );
    json.insert("answers_checked".into(), checked.into());
    json.insert("answers_identical".into(), agree.into());
    json.insert(
        "command".into(),
        std::env::var("KVMESH_BENCH_COMMAND")
            .unwrap_or_else(|_| "cargo bench --bench daemon".into())
            .into(),
    );
    json.insert("machine".into(), machine().into());
    std::fs::write(
        "target/bench/daemon.json",
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .unwrap_or_else(|e| fail(&format!("writing target/bench/daemon.json: {e}")));
    eprintln!(
        "[daemon] wrote target/bench/daemon.json in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
