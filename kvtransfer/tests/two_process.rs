//! Two real processes on loopback: this test process runs one agent, `kvtransfer-peer` the
//! other. Everything is verified by checksums computed on each side.

mod common;

use common::scenarios::*;

use std::time::{Duration, Instant};

use common::*;
use kvtransfer::{
    Agent, AgentConfig, AgentMetadata, Backend, DescList, Error, HostBuffer, MemKind, Op,
    XferStatus,
};

fn agent(name: &str, timeout: Duration) -> Agent {
    let mut c = AgentConfig::new(name);
    c.timeout = timeout;
    Agent::new(c).expect("agent")
}

#[test]
fn random_descriptor_lists_tcp() {
    random_lists(&Net::loopback(), Backend::Tcp, 10_000, 1);
}

#[test]
fn random_descriptor_lists_shm() {
    random_lists(&Net::loopback(), Backend::Shm, 10_000, 2);
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
        assert_eq!(p.wait_notifs(), vec![("notifier".to_string(), msg)]);
        assert_eq!(p.sum(&pieces), local_sum(&buf, &pieces));
    }
    // READ with a notification: the peer hears once its bytes were read.
    let pieces = [(6u64 << 20, 1 << 20)];
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
    // A notification of its own, without a transfer.
    a.send_notif(&name, b"hello").unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let n = p.notifs();
        if !n.is_empty() {
            assert_eq!(n, vec![("notifier".to_string(), "hello".to_string())]);
            break;
        }
        assert!(Instant::now() < deadline, "no plain notification");
        std::thread::sleep(Duration::from_millis(2));
    }
    p.cmd("quit");
}

#[test]
fn killed_target_tcp() {
    killed_target(&Net::loopback(), Backend::Tcp);
}

#[test]
fn killed_target_shm() {
    killed_target(&Net::loopback(), Backend::Shm);
}

#[test]
fn killed_initiator_tcp() {
    killed_initiator(&Net::loopback(), "tcp");
}

#[test]
fn killed_initiator_shm() {
    killed_initiator(&Net::loopback(), "shm");
}

#[test]
fn killed_reader_tcp() {
    killed_reader(&Net::loopback(), "tcp");
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

#[test]
fn restarted_peer_reconnects() {
    restarted_peer(&Net::loopback(), &[Backend::Tcp, Backend::Shm]);
}

/// Large transfers (copied by two threads on the shared-memory backend) arrive whole.
#[test]
fn large_transfers_verified() {
    let size = 48usize << 20;
    let a = agent("large", Duration::from_secs(10));
    let buf = HostBuffer::new(size).unwrap();
    a.register(&buf).unwrap();
    let mut p = Peer::start(&[], "large-peer", size, &[]);
    let name = a.load_remote(&p.meta).unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
    let mut data = vec![0u8; size];
    rand::Rng::fill(&mut rng, &mut data[..]);
    buf.write_at(0, &data).unwrap();
    // One 40 MiB piece split off-centre by smaller ones, at different offsets on each side.
    let lp = [(0u64, 3 << 20), (4 << 20, 40 << 20), (45 << 20, 12345)];
    let rp = [(44 << 20, 3 << 20), (1 << 20, 40 << 20), (47 << 20, 12345)];
    for backend in [Backend::Shm, Backend::Tcp] {
        for op in [Op::Write, Op::Read] {
            if op == Op::Read {
                buf.fill(0);
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
            h.post(None).unwrap();
            h.wait_timeout(WAIT).unwrap();
            assert_eq!(local_sum(&buf, &lp), p.sum(&rp), "{backend:?} {op:?}");
        }
        p.cmd("fill 9");
    }
    p.cmd("quit");
}
