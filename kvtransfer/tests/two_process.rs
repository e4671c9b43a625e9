//! Two real processes on loopback: this test process runs one agent, `kvtransfer-peer` the
//! other. Everything is verified by checksums computed on each side.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kvtransfer::{
    Agent, AgentConfig, AgentMetadata, Backend, DescList, Error, HostBuffer, MemKind, Op,
    XferStatus,
};
use rand::{Rng, SeedableRng};

const SIZE: usize = 8 << 20;
const MAX: u64 = 16 << 10;

fn agent(name: &str, timeout: Duration) -> Agent {
    let mut c = AgentConfig::new(name);
    c.timeout = timeout;
    Agent::new(c).expect("agent")
}

/// `lists` random descriptor lists (half WRITE, half READ), each verified by checksum.
fn random_lists(backend: Backend, lists: usize, seed: u64) {
    let a = agent("local", Duration::from_secs(10));
    let buf = HostBuffer::new(SIZE).unwrap();
    a.register(&buf).unwrap();
    let mut p = Peer::start(&[], "remote", SIZE, &[]);
    let name = a.load_remote(&p.meta).unwrap();
    assert_eq!(name, "remote");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; SIZE];
    rng.fill(&mut data[..]);
    buf.write_at(0, &data).unwrap();
    let mut bytes = 0u64;
    let lists = std::env::var("KVTRANSFER_TEST_LISTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(lists);
    let t = Instant::now();
    let mut t_xfer = Duration::ZERO;
    for i in 0..lists {
        if i % 1000 == 999 {
            eprintln!(
                "{backend:?}: {} lists in {:?} ({t_xfer:?} transferring)",
                i + 1,
                t.elapsed()
            );
        }
        let n = if rng.random_bool(0.05) {
            rng.random_range(64..=256)
        } else {
            rng.random_range(1..=16)
        };
        let lens = random_lens(&mut rng, n, MAX);
        let lp = place(&mut rng, SIZE as u64, MAX, &lens);
        let rp = place(&mut rng, SIZE as u64, MAX, &lens);
        let op = if i % 2 == 0 { Op::Write } else { Op::Read };
        if op == Op::Read {
            // Fresh bytes at the destination so a transfer that moved nothing cannot pass.
            for &(o, l) in &lp {
                let mut junk = vec![0u8; l as usize];
                rng.fill(&mut junk[..]);
                buf.write_at(o as usize, &junk).unwrap();
            }
        }
        let h = a
            .prepare(
                op,
                &descs(buf.addr(), &lp),
                &name,
                &descs(p.base, &rp),
                Some(backend),
            )
            .unwrap();
        let t0 = Instant::now();
        h.post(None).unwrap();
        let st = h
            .wait_timeout(WAIT)
            .unwrap_or_else(|e| panic!("list {i}: {e}"));
        t_xfer += t0.elapsed();
        assert_eq!(st.bytes, lens.iter().sum::<u64>());
        assert_eq!(h.status(), XferStatus::Done);
        bytes += st.bytes;
        assert_eq!(
            local_sum(&buf, &lp),
            p.sum(&rp),
            "list {i} ({op:?}, {n} descriptors) differs after the transfer"
        );
    }
    assert!(bytes > 0);
    p.cmd("quit");
}

#[test]
fn random_descriptor_lists_tcp() {
    random_lists(Backend::Tcp, 5_000, 1);
}

#[test]
fn random_descriptor_lists_shm() {
    random_lists(Backend::Shm, 5_000, 2);
}

/// Notifications arrive after the data and name the sender; the side channel carries metadata.
#[test]
fn notifications_follow_the_data() {
    let a = agent("notifier", Duration::from_secs(10));
    let buf = HostBuffer::new(SIZE).unwrap();
    a.register(&buf).unwrap();
    buf.fill(0x5a);
    let mut p = Peer::start(&[], "target", SIZE, &[]);
    // Metadata over the side channel this time.
    let name = a.connect(p.addr).unwrap();
    assert_eq!(name, "target");
    p.cmd(&format!("load {}", hex(&a.export_metadata())));
    for (k, backend) in [Backend::Tcp, Backend::Shm].into_iter().enumerate() {
        let off = k as u64 * (4 << 20);
        let pieces = [(off, 4 << 20)];
        let h = a
            .prepare(
                Op::Write,
                &descs(buf.addr(), &pieces),
                &name,
                &descs(p.base, &pieces),
                Some(backend),
            )
            .unwrap();
        let msg = format!("done-{}", backend.name());
        h.post(Some(msg.as_bytes())).unwrap();
        h.wait_timeout(WAIT).unwrap();
        // The peer checks its bytes only after it has the notification in hand.
        let deadline = Instant::now() + WAIT;
        let got = loop {
            let n = p.notifs();
            if !n.is_empty() || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        assert_eq!(got, vec![("notifier".to_string(), msg)]);
        assert_eq!(p.sum(&pieces), local_sum(&buf, &pieces));
    }
    // READ with a notification: the peer hears once its bytes were read.
    let pieces = [(8u64 << 20, 1 << 20)];
    let h = a
        .prepare(
            Op::Read,
            &descs(buf.addr(), &pieces),
            &name,
            &descs(p.base, &pieces),
            Some(Backend::Tcp),
        )
        .unwrap();
    h.post(Some(b"read-done")).unwrap();
    h.wait_timeout(WAIT).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let n = p.notifs();
        if !n.is_empty() {
            assert_eq!(n, vec![("notifier".to_string(), "read-done".to_string())]);
            break;
        }
        assert!(Instant::now() < deadline, "no notification for the READ");
        std::thread::sleep(Duration::from_millis(2));
    }
    // A notification of its own, and one from the peer to us.
    a.send_notif(&name, b"hello").unwrap();
    p.cmd(&format!("connect {}", a.listen_addr()));
    p.cmd("quit");
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        // The peer exits after quit; what it already received is not our concern here.
        std::thread::sleep(Duration::from_millis(1));
        break;
    }
}

/// A peer killed while we read from it: every transfer is either complete with the right bytes
/// or failed, and the one in flight at the kill fails within the timeout.
fn killed_target(backend: Backend) {
    let timeout = Duration::from_secs(2);
    let a = agent("reader", timeout);
    let size = 64 << 20;
    let buf = HostBuffer::new(size).unwrap();
    a.register(&buf).unwrap();
    let mut p = Peer::start(&[], "victim", size, &[]);
    let name = a.load_remote(&p.meta).unwrap();
    let want = p.sum(&[(0, size as u64)]);
    // 4096 scattered 16 KiB pieces in one list, read again and again.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let lens = vec![16u64 << 10; 4096];
    let rp = place(&mut rng, size as u64, 16 << 10, &lens);
    let lp = place(&mut rng, size as u64, 16 << 10, &lens);
    let want_pieces = p.sum(&rp);
    assert_ne!(want, 0);
    let h = a
        .prepare(
            Op::Read,
            &descs(buf.addr(), &lp),
            &name,
            &descs(p.base, &rp),
            Some(backend),
        )
        .unwrap();
    let killer = {
        let pid = p.child.id();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            Instant::now()
        })
    };
    let mut done = 0;
    let failed_at = loop {
        buf.fill(0);
        // A post may itself fail once the connection is known dead.
        match h
            .post(None)
            .and_then(|()| h.wait_timeout(timeout + Duration::from_secs(5)))
        {
            Ok(_) => {
                assert_eq!(
                    local_sum(&buf, &lp),
                    want_pieces,
                    "a READ reported complete with wrong bytes"
                );
                done += 1;
            }
            Err(Error::Busy) => panic!("the READ neither finished nor failed within the timeout"),
            Err(e) => {
                assert!(matches!(h.status(), XferStatus::Failed(_)), "{e}");
                assert_ne!(h.status(), XferStatus::Done);
                break Instant::now();
            }
        }
    };
    let killed_at = killer.join().unwrap();
    assert!(done > 0, "no READ completed before the kill");
    assert!(
        failed_at.saturating_duration_since(killed_at) < timeout + Duration::from_secs(1),
        "failure reported {:?} after the kill",
        failed_at - killed_at
    );
    // Every later post fails too.
    let r = h
        .post(None)
        .and_then(|()| h.wait_timeout(timeout * 2).map(|_| ()));
    assert!(r.is_err(), "a transfer to a dead peer succeeded");
}

#[test]
fn killed_target_tcp() {
    killed_target(Backend::Tcp);
}

#[test]
fn killed_target_shm() {
    killed_target(Backend::Shm);
}

/// The peer writes into us slot after slot and is killed mid-way: every notification we got
/// names bytes that are all there, and no notification comes for the write cut short.
fn killed_initiator(backend: &str) {
    let a = agent("sink", Duration::from_secs(2));
    let size = 64usize << 20;
    let buf = HostBuffer::new(size).unwrap();
    a.register(&buf).unwrap();
    let mut p = Peer::start(&[], "writer", size, &[]);
    a.load_remote(&p.meta).unwrap();
    p.cmd(&format!("connect {}", a.listen_addr()));
    let slot = 8usize << 20;
    let slots = size / slot;
    assert_eq!(
        p.cmd(&format!("writeloop sink {backend} {slot} {slots}")),
        "STARTED"
    );
    let mut seen = 0;
    let deadline = Instant::now() + WAIT;
    while seen < 5 {
        let n = a.wait_notif(WAIT).expect("notification from the writer");
        verify(&buf, &n.msg);
        seen += 1;
        assert!(Instant::now() < deadline);
    }
    p.kill();
    // Whatever arrives after the kill must be complete too.
    while let Some(n) = a.wait_notif(Duration::from_millis(500)) {
        verify(&buf, &n.msg);
    }
}

fn verify(buf: &HostBuffer, msg: &[u8]) {
    let s = String::from_utf8_lossy(msg);
    let w: Vec<&str> = s.split(' ').collect();
    let (off, len): (u64, u64) = (w[1].parse().unwrap(), w[2].parse().unwrap());
    let want = u64::from_str_radix(w[3], 16).unwrap();
    assert_eq!(
        local_sum(buf, &[(off, len)]),
        want,
        "notification {s:?} before its data"
    );
}

#[test]
fn killed_initiator_tcp() {
    killed_initiator("tcp");
}

#[test]
fn killed_initiator_shm() {
    killed_initiator("shm");
}

/// A peer that restarts (same name, new process, new metadata) is reached again once its new
/// metadata is loaded; the old metadata is refused with a clear error.
#[test]
fn restarted_peer_reconnects() {
    let a = agent("client", Duration::from_secs(2));
    let buf = HostBuffer::new(SIZE).unwrap();
    a.register(&buf).unwrap();
    for backend in [Backend::Tcp, Backend::Shm] {
        let mut p = Peer::start(&[], "server", SIZE, &["--seed", "11"]);
        let name = a.load_remote(&p.meta).unwrap();
        let pieces = [(0u64, 1u64 << 20)];
        let h = a
            .prepare(
                Op::Read,
                &descs(buf.addr(), &pieces),
                &name,
                &descs(p.base, &pieces),
                Some(backend),
            )
            .unwrap();
        h.post(None).unwrap();
        h.wait_timeout(WAIT).unwrap();
        assert_eq!(local_sum(&buf, &pieces), p.sum(&pieces));
        let old_addr = p.addr;
        p.kill();
        h.post(None).ok();
        let e = h.wait_timeout(WAIT).unwrap_err();
        assert!(!matches!(e, Error::Busy), "{e}");

        let mut q = Peer::start(
            &[],
            "server",
            SIZE,
            &["--seed", "12", "--listen", &old_addr.to_string()],
        );
        // The old handle still names the old process: refused, never sent to the new one.
        h.post(None).ok();
        let e = h.wait_timeout(WAIT).unwrap_err().to_string();
        assert!(
            e.contains("restarted")
                || e.contains("exited")
                || e.contains("gone")
                || e.contains("not the one"),
            "{backend:?}: {e}"
        );
        // New metadata over the side channel: the new process is reached.
        assert_eq!(a.connect(q.addr).unwrap(), "server");
        let h = a
            .prepare(
                Op::Read,
                &descs(buf.addr(), &pieces),
                &name,
                &descs(q.base, &pieces),
                Some(backend),
            )
            .unwrap();
        h.post(None).unwrap();
        h.wait_timeout(WAIT).unwrap();
        assert_eq!(local_sum(&buf, &pieces), q.sum(&pieces));
        q.cmd("quit");
    }
}

/// Descriptors outside registered memory are refused at prepare; a peer whose metadata lies
/// about its regions is refused by the target, and the transfer fails closed.
#[test]
fn bad_descriptors_and_lying_metadata_fail_closed() {
    let a = agent("checker", Duration::from_secs(2));
    let buf = HostBuffer::new(1 << 20).unwrap();
    a.register(&buf).unwrap();
    let mut p = Peer::start(&[], "honest", 1 << 20, &[]);
    let name = a.load_remote(&p.meta).unwrap();
    let mut l = DescList::new(MemKind::Dram);
    let mut r = DescList::new(MemKind::Dram);
    l.push(buf.addr(), 4096, 0);
    r.push(p.base + (1 << 20) - 100, 4096, 0);
    assert!(matches!(
        a.prepare(Op::Write, &l, &name, &r, Some(Backend::Tcp)),
        Err(Error::OutOfRegion { .. })
    ));
    let mut l2 = DescList::new(MemKind::Dram);
    l2.push(buf.addr() + (1 << 20) - 1, 2, 0);
    let mut r2 = DescList::new(MemKind::Dram);
    r2.push(p.base, 2, 0);
    assert!(matches!(
        a.prepare(Op::Write, &l2, &name, &r2, Some(Backend::Tcp)),
        Err(Error::OutOfRegion { .. })
    ));
    r2.push(p.base + 10, 5, 0);
    assert!(matches!(
        a.prepare(Op::Write, &l, &name, &r2, None),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        a.prepare(Op::Write, &l, "nobody", &r, None),
        Err(Error::UnknownAgent(_))
    ));
    assert!(matches!(a.load_remote(b"garbage"), Err(Error::Metadata(_))));
    assert!(matches!(
        a.load_remote(&p.meta[..p.meta.len() - 3]),
        Err(Error::Metadata(_))
    ));

    // Metadata claiming a larger region than the peer registered.
    let mut m = AgentMetadata::decode(&p.meta).unwrap();
    m.regions[0].len += 1 << 20;
    a.load_remote(&m.encode()).unwrap();
    let mut r3 = DescList::new(MemKind::Dram);
    r3.push(p.base + (1 << 20) + 4096, 4096, 0);
    for op in [Op::Write, Op::Read] {
        let h = a.prepare(op, &l, &name, &r3, Some(Backend::Tcp)).unwrap();
        h.post(Some(b"must not arrive")).unwrap();
        let e = h.wait_timeout(WAIT).unwrap_err().to_string();
        assert!(e.contains("outside every memory region"), "{e}");
    }
    assert!(p.notifs().is_empty());
    // The connection survives a refused transfer.
    let mut r4 = DescList::new(MemKind::Dram);
    r4.push(p.base, 4096, 0);
    let h = a
        .prepare(Op::Write, &l, &name, &r4, Some(Backend::Tcp))
        .unwrap();
    h.post(Some(b"ok")).unwrap();
    h.wait_timeout(WAIT).unwrap();
    p.cmd("quit");
}

/// A peer that stops answering (SIGSTOP) fails transfers within the timeout; cancel and
/// double posts behave.
#[test]
fn silent_peer_times_out_and_cancel_works() {
    let timeout = Duration::from_millis(800);
    let a = agent("impatient", timeout);
    let size = 64usize << 20;
    let buf = HostBuffer::new(size).unwrap();
    a.register(&buf).unwrap();
    let mut p = Peer::start(&[], "sleepy", size, &[]);
    let name = a.load_remote(&p.meta).unwrap();
    let pieces = [(0u64, size as u64)];
    let h = a
        .prepare(
            Op::Write,
            &descs(buf.addr(), &pieces),
            &name,
            &descs(p.base, &pieces),
            Some(Backend::Tcp),
        )
        .unwrap();
    // Cancel right after posting: ends Cancelled (or Done if it raced to the end).
    h.post(None).unwrap();
    assert!(matches!(h.post(None), Err(Error::Busy)));
    h.cancel();
    match h.wait_timeout(WAIT) {
        Ok(_) | Err(Error::Cancelled) => {}
        Err(e) => panic!("cancel: {e}"),
    }
    assert!(matches!(
        h.status(),
        XferStatus::Done | XferStatus::Cancelled
    ));
    // The connection is still good after a cancelled write.
    h.post(None).unwrap();
    h.wait_timeout(WAIT).unwrap();

    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(p.child.id() as i32, libc::SIGSTOP) };
    let t = Instant::now();
    h.post(None).unwrap();
    let e = h.wait_timeout(WAIT).unwrap_err();
    let took = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(p.child.id() as i32, libc::SIGCONT) };
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert!(took < timeout * 3, "timed out after {took:?}");
    p.kill();
}

/// The async API: post, await completion and await a notification.
#[test]
fn async_wait() {
    let a = agent("async", Duration::from_secs(5));
    let b = agent("async-peer", Duration::from_secs(5));
    let ba = HostBuffer::new(1 << 20).unwrap();
    let bb = HostBuffer::new(1 << 20).unwrap();
    a.register(&ba).unwrap();
    b.register(&bb).unwrap();
    ba.fill(7);
    a.load_remote(&b.export_metadata()).unwrap();
    b.load_remote(&a.export_metadata()).unwrap();
    let pieces = [(0u64, 1u64 << 20)];
    let h = a
        .prepare(
            Op::Write,
            &descs(ba.addr(), &pieces),
            "async-peer",
            &descs(bb.addr(), &pieces),
            Some(Backend::Tcp),
        )
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        h.post(Some(b"n")).unwrap();
        let st = h.wait().await.unwrap();
        assert_eq!(st.bytes, 1 << 20);
        let n = tokio::time::timeout(WAIT, b.recv_notif()).await.unwrap();
        assert_eq!(n.from, "async");
    });
    assert_eq!(local_sum(&bb, &pieces), local_sum(&ba, &pieces));
}
