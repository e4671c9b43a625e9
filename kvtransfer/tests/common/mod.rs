//! Helpers of kvtransfer's multi-process tests: a `kvtransfer-peer` child process driven over
//! its stdin/stdout.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use kvtransfer::{Agent, AgentConfig, DescList, HostBuffer};

pub mod scenarios;

/// Where the two agents live: this process and a `kvtransfer-peer`, on loopback or in
/// network namespaces.
pub struct Net {
    /// Command that runs the peer elsewhere (e.g. `ip netns exec NS`).
    pub prefix: Vec<String>,
    /// Address this process's agents listen on (and, with `netns`, the namespace it enters).
    pub local_ip: std::net::IpAddr,
    pub peer_ip: std::net::IpAddr,
    /// Both agents enable UCX.
    pub ucx: bool,
}

impl Net {
    pub fn loopback() -> Net {
        Net {
            prefix: Vec::new(),
            local_ip: "127.0.0.1".parse().unwrap(),
            peer_ip: "127.0.0.1".parse().unwrap(),
            ucx: false,
        }
    }

    /// Loopback with UCX on both sides.
    pub fn loopback_ucx() -> Net {
        ucx_env();
        Net {
            ucx: true,
            ..Net::loopback()
        }
    }

    pub fn agent(&self, name: &str, timeout: Duration) -> Agent {
        let mut c = AgentConfig::new(name);
        c.timeout = timeout;
        c.listen = SocketAddr::new(self.local_ip, 0);
        c.ucx = self.ucx;
        Agent::new(c).expect("agent")
    }

    pub fn peer(&self, name: &str, size: usize, extra: &[&str]) -> Peer {
        let listen = SocketAddr::new(self.peer_ip, 0).to_string();
        let mut args = vec!["--listen", listen.as_str()];
        if self.ucx {
            args.push("--ucx");
        }
        args.extend_from_slice(extra);
        let prefix: Vec<&str> = self.prefix.iter().map(|s| s.as_str()).collect();
        Peer::start(&prefix, name, size, &args)
    }
}

pub struct Peer {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub addr: SocketAddr,
    pub base: u64,
    pub meta: Vec<u8>,
    pub name: String,
}

pub fn peer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kvtransfer-peer")
}

impl Peer {
    /// Starts a peer; `prefix` runs it under another command (e.g. `ip netns exec NS`).
    pub fn start(prefix: &[&str], name: &str, size: usize, extra: &[&str]) -> Peer {
        let mut cmd = if prefix.is_empty() {
            Command::new(peer_bin())
        } else {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg(peer_bin());
            c
        };
        cmd.args(["--name", name, "--size", &size.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start kvtransfer-peer");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let (mut addr, mut base, mut meta) = (None, None, None);
        while meta.is_none() {
            line.clear();
            let n = stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "kvtransfer-peer exited before printing its metadata");
            let l = line.trim();
            if let Some(a) = l.strip_prefix("ADDR ") {
                addr = Some(a.parse().unwrap());
            } else if let Some(b) = l.strip_prefix("BASE ") {
                base = Some(b.parse().unwrap());
            } else if let Some(m) = l.strip_prefix("META ") {
                meta = Some(unhex(m));
            }
        }
        Peer {
            child,
            stdin,
            stdout,
            addr: addr.unwrap(),
            base: base.unwrap(),
            meta: meta.unwrap(),
            name: name.to_string(),
        }
    }

    /// Sends a command and returns the first reply line; panics on `ERR`.
    pub fn cmd(&mut self, c: &str) -> String {
        let r = self.try_cmd(c);
        assert!(!r.starts_with("ERR"), "peer command {c:?}: {r}");
        r
    }

    pub fn try_cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        self.line()
    }

    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// xxh3 of the peer's bytes at these (offset, length) pieces.
    pub fn sum(&mut self, pieces: &[(u64, u64)]) -> u64 {
        let r = self.cmd(&format!("sumdescs {}", pieces_arg(pieces)));
        u64::from_str_radix(r.strip_prefix("SUM ").expect("SUM"), 16).unwrap()
    }

    /// The notifications the peer received, once it has any (at most `WAIT`; empty if none
    /// came by then).
    pub fn wait_notifs(&mut self) -> Vec<(String, String)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self.notifs();
            if !n.is_empty() || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Notifications the peer received: (from, message).
    pub fn notifs(&mut self) -> Vec<(String, String)> {
        let r = self.cmd("notifs");
        let n: usize = r.strip_prefix("NOTIFS ").unwrap().parse().unwrap();
        (0..n)
            .map(|_| {
                let l = self.line();
                let mut it = l.splitn(3, ' ');
                it.next();
                (
                    it.next().unwrap_or("").to_string(),
                    it.next().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (offset, length) pieces as the peer's commands take them: `off:len,off:len,...`.
pub fn pieces_arg(pieces: &[(u64, u64)]) -> String {
    let list: Vec<String> = pieces.iter().map(|(o, l)| format!("{o}:{l}")).collect();
    list.join(",")
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// xxh3 of the local buffer's bytes at these pieces.
pub fn local_sum(buf: &HostBuffer, pieces: &[(u64, u64)]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for &(o, l) in pieces {
        let mut v = vec![0u8; l as usize];
        buf.read_at(o as usize, &mut v).unwrap();
        h.update(&v);
    }
    h.digest()
}

/// Random lengths (1..=max) placed at non-overlapping random positions inside `size` bytes
/// (slots of `max` bytes), in random order: (offset, length).
pub fn place(rng: &mut impl rand::Rng, size: u64, max: u64, lens: &[u64]) -> Vec<(u64, u64)> {
    let slots = size / max;
    let idx = rand::seq::index::sample(rng, slots as usize, lens.len());
    let mut slots: Vec<u64> = idx.into_iter().map(|i| i as u64).collect();
    // Sometimes in address order, so neighbours can merge.
    if rng.random_bool(0.3) {
        slots.sort_unstable();
    }
    slots
        .into_iter()
        .zip(lens)
        .map(|(s, &len)| {
            let off = if rng.random_bool(0.3) {
                0
            } else {
                rng.random_range(0..=max - len)
            };
            (s * max + off, len)
        })
        .collect()
}

pub fn random_lens(rng: &mut impl rand::Rng, n: usize, max: u64) -> Vec<u64> {
    (0..n)
        .map(|_| {
            if rng.random_bool(0.2) {
                max
            } else {
                rng.random_range(1..=max)
            }
        })
        .collect()
}

pub fn descs(base: u64, pieces: &[(u64, u64)]) -> DescList {
    let mut d = DescList::with_capacity(kvtransfer::MemKind::Dram, pieces.len());
    for &(o, l) in pieces {
        d.push(base + o, l, 0);
    }
    d
}

pub const WAIT: Duration = Duration::from_secs(20);

/// Points `KVTRANSFER_UCX_LIB` at the UCX that `kvtransfer/setup.sh` installed (for this
/// process and the peers it starts); fails clearly when it is not installed.
pub fn ucx_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("KVTRANSFER_UCX_LIB").is_some() {
            return;
        }
        let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/setup.sh");
        let out = std::process::Command::new(setup)
            .arg("--env")
            .output()
            .expect("run kvtransfer/setup.sh --env");
        assert!(
            out.status.success(),
            "UCX is not installed: run kvtransfer/setup.sh first ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = l.split_once('=') {
                // Set once, before any agent of this process reads it.
                std::env::set_var(k, v);
            }
        }
    });
}
