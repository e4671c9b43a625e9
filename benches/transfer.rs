//! `benches/run transfer [--quick]`: kvtransfer between two processes on this machine, against
//! NIXL (nixl-cu12 wheel, UCX backend, host memory) and `ucx_perftest` (libucx-cu12 wheel), all
//! in one run. The initiator (this process) WRITEs into a peer process (this binary run again
//! as the target).
//!
//! Figures: `contig_64mib_gbps` (one 64 MiB descriptor), `scattered_16kib_gbps` (4096 x 16 KiB,
//! nothing contiguous), both with the backend kvtransfer picks for a same-host peer (shared
//! memory); `tcp_1mib_gbps` (64 transfers of 1 MiB in flight over the TCP backend);
//! `desc_build_ns` (building both 4096-descriptor lists and preparing the transfer, per
//! descriptor); `post_us` (the post call of a prepared 4 KiB transfer); `connect_ms` (metadata
//! over the side channel, load, prepare and the first 4 KiB transfer to completion). Each with
//! its `nixl_` figure from the same run, `ucx_perftest_` figures for UCX's own put bandwidth,
//! and `_vs_nixl` ratios (higher is better for kvtransfer). Medians throughout.
//!
//! Needs `kvtransfer/setup.sh` (benches/run calls it); fails with a message otherwise.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvtransfer::{Agent, AgentConfig, Backend, DescList, HostBuffer, MemKind, Op, XferHandle};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 160 * MIB;
const WAIT: Duration = Duration::from_secs(60);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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

/// The target process: an agent with one registered buffer, until stdin closes.
fn peer() {
    let mut c = AgentConfig::new("bench-target");
    c.ucx = true;
    let a = Agent::new(c).expect("agent");
    let buf = HostBuffer::new(SIZE as usize).expect("buffer");
    a.register(&buf).expect("register");
    println!("ADDR {}", a.listen_addr());
    println!("BASE {}", buf.addr());
    std::io::stdout().flush().ok();
    let mut s = String::new();
    while std::io::stdin()
        .read_line(&mut s)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
}

fn run(h: &XferHandle) {
    h.post(None).expect("post");
    h.wait_timeout(WAIT).expect("transfer");
}

fn gbps(h: &XferHandle, reps: usize) -> f64 {
    run(h);
    let v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            run(h);
            h.stats().bytes as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(v)
}

fn list(base: u64, n: u64, len: u64, stride: u64) -> DescList {
    let mut d = DescList::with_capacity(MemKind::Dram, n as usize);
    for i in 0..n {
        d.push(base + i * stride, len, 0);
    }
    d
}

fn tool_env() -> BTreeMap<String, String> {
    let out = Command::new("kvtransfer/setup.sh")
        .arg("--env")
        .output()
        .expect("run kvtransfer/setup.sh --env");
    assert!(
        out.status.success(),
        "NIXL and UCX are not installed: run kvtransfer/setup.sh ({})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// NIXL's figures from its own two processes (Python API).
fn nixl(env: &BTreeMap<String, String>, quick: bool) -> BTreeMap<String, f64> {
    let mut c = Command::new(&env["KVTRANSFER_PYTHON"]);
    // cargo's LD_LIBRARY_PATH for benches must not reach NIXL's own libraries.
    c.arg("kvtransfer/bench/nixl_bench.py")
        .env_remove("LD_LIBRARY_PATH");
    if quick {
        c.arg("--quick");
    }
    let mut out = c.output().expect("run the NIXL benchmark");
    if !out.status.success() {
        // One retry: NIXL's UCX wire-up on a loaded machine occasionally fails.
        eprintln!("[transfer] the NIXL benchmark failed once, retrying");
        out = c.output().expect("run the NIXL benchmark");
    }
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        panic!(
            "the NIXL benchmark failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // NIXL logs on stdout too: the figures are the last line, one JSON object.
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("the NIXL benchmark printed no figures: {text}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("NIXL benchmark output is JSON");
    v.as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().expect("number")))
        .collect()
}

/// `ucx_perftest` put bandwidth in GB/s between two processes.
fn ucx_perftest(env: &BTreeMap<String, String>, tls: Option<&str>, size: u64, iters: u32) -> f64 {
    let bin = &env["KVTRANSFER_UCX_PERFTEST"];
    // The wheel's ucx_perftest finds its libraries next to libucp.
    let libdir = std::path::Path::new(&env["KVTRANSFER_UCX_LIB"])
        .parent()
        .expect("lib dir")
        .to_path_buf();
    let port = 20000 + (std::process::id() % 20000) as u16 + tls.is_some() as u16;
    let args = |c: &mut Command| {
        c.env("LD_LIBRARY_PATH", &libdir)
            .args(["-p", &port.to_string(), "-t", "ucp_put_bw"])
            .args(["-s", &size.to_string(), "-n", &iters.to_string()]);
        if let Some(t) = tls {
            c.env("UCX_TLS", t);
        }
    };
    let mut s = Command::new(bin);
    args(&mut s);
    let mut server = s
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ucx_perftest");
    // The client retries until the server listens (slow to start on a loaded machine).
    let mut fin = None;
    let mut last = String::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let mut c = Command::new(bin);
        c.arg("127.0.0.1");
        args(&mut c);
        let out = c.output().expect("run ucx_perftest");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(l) = text.lines().find(|l| l.starts_with("Final:")) {
            fin = Some(l.to_string());
            break;
        }
        last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = server.kill();
    let _ = server.wait();
    let fin = fin.unwrap_or_else(|| panic!("ucx_perftest printed no result: {last}"));
    let mbs: f64 = fin
        .split_whitespace()
        .nth(6)
        .and_then(|v| v.parse().ok())
        .expect("bandwidth column");
    mbs * 1048576.0 / 1e9
}

fn main() {
    if std::env::var_os("KVTRANSFER_BENCH_PEER").is_some() {
        peer();
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 7 } else { 21 };
    let t0 = Instant::now();
    let env = tool_env();
    for (k, v) in &env {
        std::env::set_var(k, v);
    }

    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .env("KVTRANSFER_BENCH_PEER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the target process");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut addr, mut base) = (None, None);
    while base.is_none() {
        let mut l = String::new();
        assert!(out.read_line(&mut l).expect("read") > 0, "target exited");
        if let Some(a) = l.trim().strip_prefix("ADDR ") {
            addr = Some(a.parse::<std::net::SocketAddr>().expect("addr"));
        } else if let Some(b) = l.trim().strip_prefix("BASE ") {
            base = Some(b.parse::<u64>().expect("base"));
        }
    }
    let (addr, rbase) = (addr.expect("ADDR"), base.expect("BASE"));

    let mut c = AgentConfig::new("bench-initiator");
    c.ucx = true;
    let a = Agent::new(c).expect("agent");
    let buf = HostBuffer::new(SIZE as usize).expect("buffer");
    buf.fill(7);
    a.register(&buf).expect("register");
    let lbase = buf.addr();
    let mut ours: BTreeMap<&str, f64> = BTreeMap::new();

    // connect_ms: side channel, load, prepare, first transfer.
    let t = Instant::now();
    let name = a.connect(addr).expect("connect");
    let h = a
        .prepare(
            Op::Write,
            &list(lbase, 1, 4096, 0),
            &name,
            &list(rbase, 1, 4096, 0),
            None,
        )
        .expect("prepare");
    run(&h);
    ours.insert("connect_ms", t.elapsed().as_secs_f64() * 1e3);
    let backend = a.default_backend(&name).expect("backend");

    // post_us on the prepared 4 KiB transfer.
    let mut v = Vec::new();
    for _ in 0..(if quick { 300 } else { 2000 }) {
        let t = Instant::now();
        h.post(None).expect("post");
        v.push(t.elapsed().as_secs_f64() * 1e6);
        h.wait_timeout(WAIT).expect("transfer");
    }
    ours.insert("post_us", median(v));

    let contig = a
        .prepare(
            Op::Write,
            &list(lbase, 1, 64 * MIB, 0),
            &name,
            &list(rbase, 1, 64 * MIB, 0),
            None,
        )
        .expect("prepare");
    ours.insert("contig_64mib_gbps", gbps(&contig, reps));

    // desc_build_ns: both lists and the prepared transfer, per descriptor.
    let n = 4096u64;
    let mut v = Vec::new();
    let mut scattered = None;
    for _ in 0..reps {
        let t = Instant::now();
        let l = list(lbase, n, 16 << 10, 32 << 10);
        let r = list(rbase, n, 16 << 10, 32 << 10);
        let h = a.prepare(Op::Write, &l, &name, &r, None).expect("prepare");
        v.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
        scattered = Some(h);
    }
    ours.insert("desc_build_ns", median(v));
    let scattered = scattered.expect("prepared");
    ours.insert("scattered_16kib_gbps", gbps(&scattered, reps));

    // TCP: 64 transfers of 1 MiB in flight.
    let hs: Vec<XferHandle> = (0..64)
        .map(|i| {
            a.prepare(
                Op::Write,
                &list(lbase + i * MIB, 1, MIB, 0),
                &name,
                &list(rbase + i * MIB, 1, MIB, 0),
                Some(Backend::Tcp),
            )
            .expect("prepare")
        })
        .collect();
    let mut v = Vec::new();
    for i in 0..reps + 1 {
        let t = Instant::now();
        for h in &hs {
            h.post(None).expect("post");
        }
        for h in &hs {
            h.wait_timeout(WAIT).expect("transfer");
        }
        if i > 0 {
            v.push(64.0 * MIB as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    ours.insert("tcp_1mib_gbps", median(v));
    let tcp_contig = a
        .prepare(
            Op::Write,
            &list(lbase, 1, 64 * MIB, 0),
            &name,
            &list(rbase, 1, 64 * MIB, 0),
            Some(Backend::Tcp),
        )
        .expect("prepare");
    let tcp_contig_gbps = gbps(&tcp_contig, reps);
    // The UCX backend on the same transfers (TCP here: kvtransfer's active-message data path).
    let ucx_contig = a
        .prepare(
            Op::Write,
            &list(lbase, 1, 64 * MIB, 0),
            &name,
            &list(rbase, 1, 64 * MIB, 0),
            Some(Backend::Ucx),
        )
        .expect("prepare");
    let ucx_contig_gbps = gbps(&ucx_contig, reps);
    let ucx_scattered = a
        .prepare(
            Op::Write,
            &list(lbase, n, 16 << 10, 32 << 10),
            &name,
            &list(rbase, n, 16 << 10, 32 << 10),
            Some(Backend::Ucx),
        )
        .expect("prepare");
    let ucx_scattered_gbps = gbps(&ucx_scattered, reps);
    drop(child.stdin.take());
    let _ = child.wait();
    drop(a);

    let nx = nixl(&env, quick);
    let perf_contig = ucx_perftest(&env, None, 64 * MIB, if quick { 10 } else { 40 });
    let perf_tcp = ucx_perftest(&env, Some("tcp"), MIB, if quick { 200 } else { 1000 });

    let names = [
        ("contig_64mib_gbps", true),
        ("scattered_16kib_gbps", true),
        ("tcp_1mib_gbps", true),
        ("desc_build_ns", false),
        ("post_us", false),
        ("connect_ms", false),
    ];
    let mut json = serde_json::Map::new();
    println!(
        "kvtransfer ({} backend for the same-host figures) against NIXL, two processes\n",
        backend.name()
    );
    println!(
        "{:<24} {:>12} {:>12} {:>10}",
        "figure", "kvtransfer", "nixl", "vs nixl"
    );
    for (k, higher) in names {
        let o = ours[k];
        let x = nx.get(k).copied().unwrap_or(f64::NAN);
        let ratio = if higher { o / x } else { x / o };
        println!("{k:<24} {o:>12.3} {x:>12.3} {ratio:>9.2}x");
        json.insert(k.into(), o.into());
        json.insert(format!("nixl_{k}"), x.into());
        json.insert(format!("{k}_vs_nixl"), ratio.into());
    }
    println!("\ntcp_contig_64mib_gbps    {tcp_contig_gbps:>12.3}");
    println!("ucx_contig_64mib_gbps    {ucx_contig_gbps:>12.3}");
    println!("ucx_scattered_16kib_gbps {ucx_scattered_gbps:>12.3}");
    json.insert("ucx_contig_64mib_gbps".into(), ucx_contig_gbps.into());
    json.insert("ucx_scattered_16kib_gbps".into(), ucx_scattered_gbps.into());
    println!("ucx_perftest put 64 MiB (all transports): {perf_contig:.3} GB/s");
    println!("ucx_perftest put 1 MiB (UCX_TLS=tcp):     {perf_tcp:.3} GB/s");
    json.insert("tcp_contig_64mib_gbps".into(), tcp_contig_gbps.into());
    json.insert("ucx_perftest_contig_64mib_gbps".into(), perf_contig.into());
    json.insert("ucx_perftest_tcp_1mib_gbps".into(), perf_tcp.into());
    json.insert(
        "command".into(),
        std::env::var("KVMESH_BENCH_COMMAND")
            .unwrap_or_else(|_| "cargo bench --bench transfer".into())
            .into(),
    );
    json.insert("machine".into(), machine().into());
    std::fs::create_dir_all("target/bench").ok();
    std::fs::write(
        "target/bench/transfer.json",
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write target/bench/transfer.json");
    eprintln!(
        "[transfer] wrote target/bench/transfer.json in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
