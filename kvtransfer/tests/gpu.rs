//! kvtransfer with GPU memory (feature `cuda`): GPU regions registered with two agents and moved
//! over TCP through host staging, on the side that posts a transfer and on the side that serves
//! it, in every pairing (GPU to host, host to GPU, GPU to GPU), READ and WRITE, with random block
//! lists. Destinations are poisoned first; every byte is checked, untouched blocks too, and the
//! notification must arrive after the data.
//!
//! Without a GPU each test says so and passes (CI is CPU-only); `KVMESH_REQUIRE_GPU=1` (set by
//! `kvstore/cuda/run-gpu.sh`) makes a missing GPU a failure.

use std::sync::Arc;
use std::time::Duration;

use kvstore_cuda::{Device, DeviceBuffer};
use kvtransfer::{Agent, AgentConfig, Backend, DescList, Error, HostBuffer, MemKind, Op};
use rand::{Rng, RngCore, SeedableRng};

const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 64;
const LEN: usize = BLOCK * BLOCKS;
const POISON: u8 = 0xEE;
const WAIT: Duration = Duration::from_secs(30);

fn gpu() -> Option<Arc<Device>> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("KVMESH_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("KVMESH_REQUIRE_GPU=1 but there is no GPU: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no GPU ({e})");
            None
        }
    }
}

/// An agent with 4 MiB of GPU memory and 4 MiB of host memory registered.
struct Side {
    agent: Agent,
    gpu: DeviceBuffer,
    host: HostBuffer,
}

impl Side {
    fn new(name: &str, dev: &Arc<Device>) -> Side {
        let mut c = AgentConfig::new(name);
        c.listen = "127.0.0.1:0".parse().unwrap();
        let agent = Agent::new(c).expect("agent");
        let gpu = DeviceBuffer::alloc(dev, LEN).expect("device memory");
        let host = HostBuffer::new(LEN).unwrap();
        agent.register(&host).unwrap();
        // SAFETY: `gpu` lives as long as the agent (both fields of this value; the agent is
        // dropped first, being declared first).
        unsafe { agent.register_raw(gpu.ptr(), LEN as u64, MemKind::Vram, 0) }
            .expect("registering GPU memory");
        Side { agent, gpu, host }
    }

    fn base(&self, kind: MemKind) -> u64 {
        match kind {
            MemKind::Vram => self.gpu.ptr(),
            MemKind::Dram => self.host.addr(),
        }
    }

    fn fill(&self, kind: MemKind, data: &[u8]) {
        match kind {
            MemKind::Vram => self.gpu.write(0, data).unwrap(),
            MemKind::Dram => self.host.write_at(0, data).unwrap(),
        }
    }

    fn read(&self, kind: MemKind) -> Vec<u8> {
        let mut v = vec![0u8; LEN];
        match kind {
            MemKind::Vram => self.gpu.read(0, &mut v).unwrap(),
            MemKind::Dram => self.host.read_at(0, &mut v).unwrap(),
        }
        v
    }
}

/// One random list of (source block, destination block, length) moved with `op`, checked.
#[allow(clippy::too_many_arguments)]
fn move_blocks(
    a: &Side,
    b: &Side,
    peer: &str,
    op: Op,
    local: MemKind,
    remote: MemKind,
    rng: &mut rand::rngs::StdRng,
    round: usize,
) {
    let n = rng.random_range(1..=BLOCKS / 2);
    let mut ids: Vec<usize> = (0..BLOCKS).collect();
    for i in (1..BLOCKS).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let (src, dst) = (&ids[..n], &ids[BLOCKS / 2..BLOCKS / 2 + n]);
    let lens: Vec<usize> = (0..n).map(|_| rng.random_range(1..=BLOCK)).collect();
    // Data flows from the source side to the destination side.
    let (src_side, src_kind, dst_side, dst_kind) = match op {
        Op::Write => (a, local, b, remote),
        Op::Read => (b, remote, a, local),
    };
    let mut data = vec![0u8; LEN];
    rng.fill_bytes(&mut data);
    src_side.fill(src_kind, &data);
    dst_side.fill(dst_kind, &vec![POISON; LEN]);
    let mut l = DescList::new(local);
    let mut r = DescList::new(remote);
    let (lb, rb) = (a.base(local), b.base(remote));
    for i in 0..n {
        // Local descriptor i pairs with remote descriptor i.
        let (li, ri) = match op {
            Op::Write => (src[i], dst[i]),
            Op::Read => (dst[i], src[i]),
        };
        l.push(lb + (li * BLOCK) as u64, lens[i] as u64, 0);
        r.push(rb + (ri * BLOCK) as u64, lens[i] as u64, 0);
    }
    let h = a.agent.prepare(op, &l, peer, &r, None).expect("prepare");
    assert_eq!(h.backend(), Backend::Tcp);
    let notif = format!("round-{round}");
    h.post(Some(notif.as_bytes())).unwrap();
    let st = h.wait_timeout(WAIT).expect("transfer");
    assert_eq!(st.bytes, lens.iter().sum::<usize>() as u64);
    let got = b.agent.wait_notif(WAIT).expect("notification");
    assert_eq!(got.msg, notif.as_bytes());
    let out = dst_side.read(dst_kind);
    let mut expect = vec![POISON; LEN];
    for i in 0..n {
        let (s, d) = (src[i] * BLOCK, dst[i] * BLOCK);
        expect[d..d + lens[i]].copy_from_slice(&data[s..s + lens[i]]);
    }
    if out != expect {
        let first = out.iter().zip(&expect).position(|(x, y)| x != y).unwrap();
        panic!(
            "{op:?} {local:?} <-> {remote:?}, round {round}: byte {first} (block {}) differs",
            first / BLOCK
        );
    }
}

#[test]
fn gpu_memory_moves_through_host_staging() {
    let Some(dev) = gpu() else { return };
    let a = Side::new("gpu-a", &dev);
    let b = Side::new("gpu-b", &dev);
    let peer = a.agent.connect(b.agent.listen_addr()).unwrap();
    let seed = rand::rng().next_u64();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let kinds = [
        (MemKind::Vram, MemKind::Dram),
        (MemKind::Dram, MemKind::Vram),
        (MemKind::Vram, MemKind::Vram),
    ];
    let mut round = 0;
    for op in [Op::Write, Op::Read] {
        for (local, remote) in kinds {
            for _ in 0..25 {
                move_blocks(&a, &b, &peer, op, local, remote, &mut rng, round);
                round += 1;
            }
        }
    }
    eprintln!("{round} random lists moved bit-exact");
}

#[test]
fn gpu_memory_errors() {
    let Some(dev) = gpu() else { return };
    let a = Side::new("gpu-err-a", &dev);
    let b = Side::new("gpu-err-b", &dev);
    let peer = a.agent.connect(b.agent.listen_addr()).unwrap();
    // Host memory is not GPU memory.
    let host = vec![0u8; 4096];
    // SAFETY: refused before anything could use it.
    let r = unsafe {
        a.agent
            .register_raw(host.as_ptr() as u64, 4096, MemKind::Vram, 0)
    };
    assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    // A range running past its allocation.
    let small = DeviceBuffer::alloc(&dev, 1 << 20).unwrap();
    // SAFETY: refused before anything could use it.
    let r = unsafe { a.agent.register_raw(small.ptr(), 2 << 20, MemKind::Vram, 0) };
    assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    // GPU memory does not move over shared memory or UCX.
    let mut l = DescList::new(MemKind::Vram);
    l.push(a.gpu.ptr(), 4096, 0);
    let mut r = DescList::new(MemKind::Dram);
    r.push(b.host.addr(), 4096, 0);
    for backend in [Backend::Shm, Backend::Ucx] {
        let e = a.agent.prepare(Op::Write, &l, &peer, &r, Some(backend));
        assert!(matches!(e, Err(Error::Unavailable { .. })), "{backend:?}");
    }
    // A descriptor outside the registered GPU memory.
    let mut bad = DescList::new(MemKind::Vram);
    bad.push(a.gpu.ptr() + LEN as u64 - 100, 4096, 0);
    assert!(matches!(
        a.agent.prepare(Op::Write, &bad, &peer, &r, None),
        Err(Error::OutOfRegion { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// GPU to GPU between two processes (CUDA IPC). The test binary starts itself again as the peer
// (the `ipc_peer_process` entry below, which does nothing unless started that way).

const IPC_LEN: usize = 64 << 20;
const IPC_SEED: u64 = 0x5eed_1bc0;

fn ipc_pattern() -> Vec<u8> {
    let mut v = vec![0u8; IPC_LEN];
    rand::rngs::StdRng::seed_from_u64(IPC_SEED).fill_bytes(&mut v);
    v
}

/// The peer: 64 MiB of GPU memory (GPU `KVT_IPC_PEER`) holding [`ipc_pattern`], registered
/// with an agent; prints `READY <addr> <gpu base>` and then every notification it receives, one
/// per line.
#[test]
fn ipc_peer_process() {
    let Some(ordinal) = std::env::var("KVT_IPC_PEER")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    else {
        return;
    };
    let dev = Device::open(ordinal as usize).expect("GPU");
    let mut c = AgentConfig::new("ipc-peer");
    c.listen = "127.0.0.1:0".parse().unwrap();
    let agent = Agent::new(c).expect("agent");
    let gpu = DeviceBuffer::alloc(&dev, IPC_LEN).expect("device memory");
    gpu.write(0, &ipc_pattern()).unwrap();
    // SAFETY: `gpu` outlives the agent's use of it (this process ends in the loop below).
    unsafe { agent.register_raw(gpu.ptr(), IPC_LEN as u64, MemKind::Vram, ordinal) }.unwrap();
    println!("READY {} {}", agent.listen_addr(), gpu.ptr());
    loop {
        if let Some(n) = agent.wait_notif(Duration::from_secs(60)) {
            println!("NOTIF {}", String::from_utf8_lossy(&n.msg));
        }
    }
}

struct IpcPeer {
    /// The peer's GPU: 1 when there are two, else 0.
    gpu: u32,
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    addr: std::net::SocketAddr,
    base: u64,
}

impl IpcPeer {
    // The child is killed and waited for when the returned value is dropped; a panic here
    // (no READY line) leaves it to the test harness's exit.
    #[allow(clippy::zombie_processes)]
    fn start() -> IpcPeer {
        use std::io::BufRead;
        let gpu = u32::from(Device::open(1).is_ok());
        eprintln!("peer process on GPU {gpu}");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ipc_peer_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KVT_IPC_PEER", gpu.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting the peer process");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        loop {
            let l = lines
                .recv_timeout(Duration::from_secs(120))
                .expect("the peer said READY");
            // The test harness may print its own "test ... " before the line's end.
            if let Some(rest) = l.find("READY ").map(|i| &l[i + 6..]) {
                let mut it = rest.split_whitespace();
                let addr = it.next().unwrap().parse().unwrap();
                let base = it.next().unwrap().parse().unwrap();
                return IpcPeer {
                    gpu,
                    child,
                    lines,
                    addr,
                    base,
                };
            }
        }
    }

    fn notif(&self) -> String {
        loop {
            let l = self.lines.recv_timeout(WAIT).expect("a notification line");
            if let Some(m) = l.find("NOTIF ").map(|i| &l[i + 6..]) {
                return m.to_string();
            }
        }
    }
}

impl Drop for IpcPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn gpu_to_gpu_between_processes_over_cuda_ipc() {
    let Some(dev) = gpu() else { return };
    let peer = IpcPeer::start();
    let mut c = AgentConfig::new("ipc-local");
    c.listen = "127.0.0.1:0".parse().unwrap();
    let agent = Agent::new(c).expect("agent");
    let mine = DeviceBuffer::alloc(&dev, IPC_LEN).expect("device memory");
    // SAFETY: `mine` outlives the agent (dropped at the end of this test, after it).
    unsafe { agent.register_raw(mine.ptr(), IPC_LEN as u64, MemKind::Vram, 0) }.unwrap();
    let name = agent.connect(peer.addr).unwrap();
    let pattern = ipc_pattern();
    let seed = rand::rng().next_u64();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // READ random lists of the peer's blocks into random local blocks, then WRITE random data
    // into the peer's second half and READ it back: every byte checked, destinations poisoned.
    // Blocks of 64 KiB, and of 1 MiB in half the rounds, READs and WRITEs (the copy kernel
    // cuts fragments longer than 128 KiB into pieces).
    for round in 0..40 {
        let big = round % 4 >= 2;
        let (bsz, max_n) = if big {
            (1usize << 20, 24)
        } else {
            (64 << 10, 256)
        };
        let nblocks = IPC_LEN / bsz;
        let n = rng.random_range(1..=max_n);
        let op = if round % 2 == 0 { Op::Read } else { Op::Write };
        // READs take the peer's first half (its pattern), WRITEs go to its second half.
        let half = nblocks / 2;
        let mut mine_ids: Vec<usize> = (0..nblocks).collect();
        let mut their_ids: Vec<usize> = (0..half)
            .map(|i| if op == Op::Read { i } else { half + i })
            .collect();
        for v in [&mut mine_ids, &mut their_ids] {
            for i in (1..v.len()).rev() {
                v.swap(i, rng.random_range(0..=i));
            }
        }
        let (theirs, ours) = (&their_ids[..n], &mine_ids[..n]);
        let lens: Vec<usize> = (0..n).map(|_| rng.random_range(1..=bsz)).collect();
        let mut l = DescList::new(MemKind::Vram);
        let mut r = DescList::new(MemKind::Vram);
        for i in 0..n {
            l.push(mine.ptr() + (ours[i] * bsz) as u64, lens[i] as u64, 0);
            r.push(
                peer.base + (theirs[i] * bsz) as u64,
                lens[i] as u64,
                peer.gpu,
            );
        }
        let mut local = vec![POISON; IPC_LEN];
        let mut data = vec![0u8; IPC_LEN];
        if op == Op::Write {
            rng.fill_bytes(&mut data);
            mine.write(0, &data).unwrap();
        } else {
            mine.write(0, &local).unwrap();
        }
        let h = agent.prepare(op, &l, &name, &r, None).expect("prepare");
        assert_eq!(h.backend(), Backend::CudaIpc);
        let msg = format!("round-{round}");
        h.post(Some(msg.as_bytes())).unwrap();
        let st = h.wait_timeout(WAIT).expect("transfer");
        assert_eq!(st.bytes, lens.iter().sum::<usize>() as u64);
        assert_eq!(peer.notif(), msg);
        if op == Op::Write {
            // Read the written blocks back into poisoned memory.
            mine.write(0, &local).unwrap();
            let h = agent.prepare(Op::Read, &l, &name, &r, None).unwrap();
            h.post(None).unwrap();
            h.wait_timeout(WAIT).expect("read back");
        }
        mine.read(0, &mut local).unwrap();
        let mut expect = vec![POISON; IPC_LEN];
        for i in 0..n {
            let (o, t) = (ours[i] * bsz, theirs[i] * bsz);
            let src = if op == Op::Write {
                &data[o..o + lens[i]]
            } else {
                &pattern[t..t + lens[i]]
            };
            expect[o..o + lens[i]].copy_from_slice(src);
        }
        assert!(local == expect, "{op:?} round {round}: bytes differ");
    }
    eprintln!("40 random lists moved GPU to GPU between two processes, bit-exact");
    // Throughput on this GPU (both processes on one device): 16 KiB fragments and one piece.
    for frag in [16usize << 10, IPC_LEN / 2] {
        let mut l = DescList::new(MemKind::Vram);
        let mut r = DescList::new(MemKind::Vram);
        for i in 0..(IPC_LEN / 2) / frag {
            l.push(mine.ptr() + (i * frag) as u64, frag as u64, 0);
            r.push(
                peer.base + ((i * 2 % ((IPC_LEN / 2) / frag)) * frag) as u64,
                frag as u64,
                peer.gpu,
            );
        }
        let h = agent.prepare(Op::Read, &l, &name, &r, None).unwrap();
        h.post(None).unwrap();
        let st = h.wait_timeout(WAIT).unwrap();
        eprintln!(
            "READ of {} MiB in {} KiB fragments: {:.1} GB/s",
            (IPC_LEN / 2) >> 20,
            frag >> 10,
            st.gbps()
        );
    }
    // A peer killed while a transfer runs: the transfer fails, or completed with every byte.
    let mut peer = peer;
    let mut l = DescList::new(MemKind::Vram);
    let mut r = DescList::new(MemKind::Vram);
    // From the peer's first half, which still holds its pattern.
    let pages = IPC_LEN / 2 / 4096;
    for i in 0..pages {
        l.push(mine.ptr() + (i * 4096) as u64, 4096, 0);
        r.push(
            peer.base + (((i * 7919) % pages) * 4096) as u64,
            4096,
            peer.gpu,
        );
    }
    mine.write(0, &vec![POISON; IPC_LEN]).unwrap();
    let h = agent.prepare(Op::Read, &l, &name, &r, None).unwrap();
    h.post(None).unwrap();
    peer.child.kill().unwrap();
    peer.child.wait().unwrap();
    match h.wait_timeout(WAIT) {
        Err(e) => eprintln!("killed peer: the transfer failed ({e})"),
        Ok(_) => {
            let mut got = vec![0u8; IPC_LEN];
            mine.read(0, &mut got).unwrap();
            for i in 0..pages {
                let t = ((i * 7919) % pages) * 4096;
                assert!(
                    got[i * 4096..(i + 1) * 4096] == pattern[t..t + 4096],
                    "a transfer reported complete with block {i} wrong"
                );
            }
            eprintln!("killed peer: the transfer had completed, every byte right");
        }
    }
    // Once the peer is gone, transfers to it fail: refused at post (the peer is checked before
    // the copies are launched), or failing when waited for.
    let h = agent.prepare(Op::Read, &l, &name, &r, None).unwrap();
    let failed = match h.post(None) {
        Err(e) => {
            eprintln!("dead peer: post refused ({e})");
            true
        }
        Ok(()) => h.wait_timeout(WAIT).is_err(),
    };
    assert!(failed, "a transfer to a dead peer succeeded");
}
