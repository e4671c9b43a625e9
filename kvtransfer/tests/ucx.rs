//! The UCX backend between two real processes on loopback (libucp from the libucx-cu12 wheel
//! that kvtransfer/setup.sh installs; these tests fail with that hint when it is missing).

mod common;

use std::time::{Duration, Instant};

use common::scenarios::*;
use common::*;
use kvtransfer::{Agent, AgentConfig, Backend, Error};

/// A transfer over UCX between `(base, pieces)` here and `(base, pieces)` on peer `name`.
fn ucx_xfer(
    a: &Agent,
    op: kvtransfer::Op,
    local: (u64, &[(u64, u64)]),
    name: &str,
    remote: (u64, &[(u64, u64)]),
) -> kvtransfer::XferHandle {
    a.prepare(
        op,
        &descs(local.0, local.1),
        name,
        &descs(remote.0, remote.1),
        Some(Backend::Ucx),
    )
    .unwrap()
}

#[test]
fn ucx_random_descriptor_lists() {
    random_lists(&Net::loopback_ucx(), Backend::Ucx, 10_000, 31);
}

#[test]
fn ucx_killed_target() {
    killed_target(&Net::loopback_ucx(), Backend::Ucx);
}

#[test]
fn ucx_killed_initiator() {
    killed_initiator(&Net::loopback_ucx(), "ucx");
}

#[test]
fn ucx_killed_reader() {
    killed_reader(&Net::loopback_ucx(), "ucx");
}

#[test]
fn ucx_restarted_peer_reconnects() {
    restarted_peer(&Net::loopback_ucx(), &[Backend::Ucx]);
}

/// Once a peer's endpoint failed, later transfers to that metadata fail at once without a new
/// endpoint (UCX would otherwise queue them behind the wire-up to a dead process).
#[test]
fn ucx_dead_peer_is_not_reconnected() {
    let net = Net::loopback_ucx();
    let a = net.agent("ucx-reader", Duration::from_secs(2));
    let buf = kvtransfer::HostBuffer::new(SIZE).unwrap();
    a.register(&buf).unwrap();
    let mut p = net.peer("ucx-dying", SIZE, &[]);
    let name = a.load_remote(&p.meta).unwrap();
    let pieces: Vec<(u64, u64)> = (0..256u64).map(|i| (i * 16384, 16384)).collect();
    let h = ucx_xfer(
        &a,
        kvtransfer::Op::Read,
        (buf.addr(), &pieces),
        &name,
        (p.base, &pieces),
    );
    h.post(None).unwrap();
    h.wait_timeout(WAIT).unwrap();
    assert_eq!(local_sum(&buf, &pieces), p.sum(&pieces));
    p.kill();
    let mut errors = Vec::new();
    for _ in 0..30 {
        let r = h.post(None).and_then(|()| h.wait_timeout(WAIT).map(|_| ()));
        match r {
            Ok(()) => panic!("a READ from a killed peer succeeded"),
            Err(Error::Busy) => panic!("a READ from a killed peer neither finished nor failed"),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let last = errors.last().unwrap();
    assert!(
        last.contains("earlier") && last.contains("ucx-dying"),
        "later failures should name the earlier one: {errors:?}"
    );
}

/// A peer that stops answering while its endpoint connects holds up no other peer's transfers:
/// they wait in that endpoint's own queue, not on the agent's progress thread.
#[test]
fn ucx_silent_peer_holds_up_no_one() {
    let net = Net::loopback_ucx();
    let a = net.agent("ucx-both", Duration::from_secs(3));
    let buf = kvtransfer::HostBuffer::new(SIZE).unwrap();
    a.register(&buf).unwrap();
    let mut silent = net.peer("ucx-silent", SIZE, &[]);
    let mut live = net.peer("ucx-live", SIZE, &[]);
    let n_silent = a.load_remote(&silent.meta).unwrap();
    let n_live = a.load_remote(&live.meta).unwrap();
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(silent.child.id() as i32, libc::SIGSTOP) };
    let remote = [(0u64, 1u64 << 20)];
    let local_silent = [(0u64, 1u64 << 20)];
    let local_live = [(2u64 << 20, 1u64 << 20)];
    let read = |local: &[(u64, u64)], name: &str, base: u64| {
        ucx_xfer(
            &a,
            kvtransfer::Op::Read,
            (buf.addr(), local),
            name,
            (base, &remote),
        )
    };
    let h_silent = read(&local_silent, &n_silent, silent.base);
    let h_live = read(&local_live, &n_live, live.base);
    let t = Instant::now();
    h_silent.post(None).unwrap();
    h_live.post(None).unwrap();
    h_live.wait_timeout(WAIT).unwrap();
    let waited = t.elapsed();
    assert_eq!(local_sum(&buf, &local_live), live.sum(&remote));
    assert!(
        waited < Duration::from_secs(2),
        "the live peer's READ waited {waited:?} behind the silent peer"
    );
    // The silent peer's READ ends either way (process_vm_readv works on a stopped process), and
    // never with wrong bytes.
    let r = h_silent.wait_timeout(Duration::from_secs(10));
    // SAFETY: as above.
    unsafe { libc::kill(silent.child.id() as i32, libc::SIGCONT) };
    match r {
        Ok(_) => assert_eq!(local_sum(&buf, &local_silent), silent.sum(&remote)),
        Err(Error::Busy) => panic!("the silent peer's READ neither finished nor failed"),
        Err(_) => {}
    }
}

#[test]
fn ucx_notification_after_data() {
    let net = Net::loopback_ucx();
    let a = net.agent("ucx-notifier", Duration::from_secs(5));
    let buf = kvtransfer::HostBuffer::new(SIZE).unwrap();
    buf.fill(0x33);
    a.register(&buf).unwrap();
    let mut p = net.peer("ucx-target", SIZE, &[]);
    let name = a.load_remote(&p.meta).unwrap();
    let pieces = [(0u64, 4u64 << 20), (5 << 20, 4096)];
    write_notified(&a, &buf, &mut p, &name, &pieces, "ucx-done");
    p.cmd("quit");
}

/// WRITEs `pieces` of `buf` to the same pieces of `p` over UCX with notification `msg`; checks
/// that the notification arrives and that the peer then holds the bytes.
fn write_notified(
    a: &Agent,
    buf: &kvtransfer::HostBuffer,
    p: &mut Peer,
    name: &str,
    pieces: &[(u64, u64)],
    msg: &str,
) {
    let h = ucx_xfer(
        a,
        kvtransfer::Op::Write,
        (buf.addr(), pieces),
        name,
        (p.base, pieces),
    );
    h.post(Some(msg.as_bytes())).unwrap();
    assert_eq!(h.wait_timeout(WAIT).unwrap().backend, Backend::Ucx);
    assert_eq!(
        p.wait_notifs(),
        vec![(a.name().to_string(), msg.to_string())],
        "the notification, once"
    );
    assert_eq!(p.sum(pieces), local_sum(buf, pieces));
}

/// Without libucp an agent asking for UCX fails with a message naming the fix.
#[test]
fn ucx_missing_library_is_named() {
    let out = std::process::Command::new(peer_bin())
        .args(["--name", "x", "--size", "4096", "--ucx"])
        .env("KVTRANSFER_UCX_LIB", "/nonexistent/libucp.so")
        .env("LD_LIBRARY_PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("UCX") && err.contains("setup.sh"), "{err}");
    // And an agent without UCX refuses the backend clearly.
    let a = Agent::new(AgentConfig::new("no-ucx")).unwrap();
    let b = Agent::new(AgentConfig::new("no-ucx-peer")).unwrap();
    let name = a.load_remote(&b.export_metadata()).unwrap();
    let l = descs(0x1000, &[]);
    assert!(matches!(
        a.prepare(kvtransfer::Op::Write, &l, &name, &l, Some(Backend::Ucx)),
        Err(Error::Unavailable { .. })
    ));
}

/// Over TCP alone the UCX backend moves data with kvtransfer's active messages, and the target
/// checks every chunk against its registered regions: metadata that lies about a region is
/// refused there, the transfer fails closed, no notification arrives, and the peer goes on
/// serving honest transfers.
#[test]
fn ucx_lying_metadata_fails_closed() {
    let net = Net::loopback_ucx();
    let a = net.agent("ucx-liar", Duration::from_secs(5));
    let buf = kvtransfer::HostBuffer::new(SIZE).unwrap();
    buf.fill(0x5a);
    a.register(&buf).unwrap();
    let mut p = net.peer("ucx-honest", SIZE, &[]);
    let mut m = kvtransfer::AgentMetadata::decode(&p.meta).unwrap();
    m.regions[0].len += 1 << 20;
    let name = a.load_remote(&m.encode()).unwrap();
    let outside = [(SIZE as u64 + 4096, 4096u64)];
    for op in [kvtransfer::Op::Write, kvtransfer::Op::Read] {
        let l = descs(buf.addr(), &[(0, 4096)]);
        let r = descs(p.base, &outside);
        let h = a.prepare(op, &l, &name, &r, Some(Backend::Ucx)).unwrap();
        h.post(Some(b"must not arrive")).unwrap();
        let e = h.wait_timeout(WAIT).unwrap_err().to_string();
        assert!(
            e.contains("refused") && e.contains("outside every memory region"),
            "{op:?}: {e}"
        );
    }
    write_notified(
        &a,
        &buf,
        &mut p,
        &name,
        &[(0, 3 << 20), (4 << 20, 12345)],
        "honest",
    );
    p.cmd("quit");
}

/// Both data paths carry WRITE and READ intact: UCX put/get (forced: over TCP alone UCX
/// emulates them) and kvtransfer's active messages (forced: the default here anyway).
#[test]
fn ucx_both_data_paths_move_data() {
    let net = Net::loopback_ucx();
    for (mode, arg) in [
        (kvtransfer::UcxData::Rma, "rma"),
        (kvtransfer::UcxData::ActiveMessages, "am"),
    ] {
        let mut c = AgentConfig::new(format!("ucx-{arg}"));
        c.timeout = Duration::from_secs(5);
        c.ucx = true;
        c.ucx_data = mode;
        let a = Agent::new(c).unwrap();
        let buf = kvtransfer::HostBuffer::new(SIZE).unwrap();
        buf.fill(0x11);
        a.register(&buf).unwrap();
        let mut p = net.peer(&format!("ucx-{arg}-peer"), SIZE, &["--ucx-data", arg]);
        let name = a.load_remote(&p.meta).unwrap();
        // Pieces larger than a chunk, unaligned ones, and one of a single byte.
        let pieces = [(0u64, (2u64 << 20) + 17), (3 << 20, 1), (5 << 20, 65_537)];
        for op in [kvtransfer::Op::Read, kvtransfer::Op::Write] {
            if op == kvtransfer::Op::Write {
                buf.fill(0x77); // differs from the peer's bytes again
            }
            let h = ucx_xfer(&a, op, (buf.addr(), &pieces), &name, (p.base, &pieces));
            h.post(None).unwrap();
            h.wait_timeout(WAIT).unwrap();
            assert_eq!(local_sum(&buf, &pieces), p.sum(&pieces), "{arg}: {op:?}");
        }
        p.cmd("quit");
    }
}
