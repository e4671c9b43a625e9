//! Scenarios run both on loopback and across network namespaces.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use kvtransfer::{Backend, Error, HostBuffer, Op, XferStatus};
use rand::{Rng, SeedableRng};

use super::*;

pub const SIZE: usize = 8 << 20;
pub const MAX: u64 = 16 << 10;

/// `lists` random descriptor lists (half WRITE, half READ), each verified by checksum.
pub fn random_lists(net: &Net, backend: Backend, lists: usize, seed: u64) {
    let a = net.agent("local", Duration::from_secs(10));
    let buf = HostBuffer::new(SIZE).unwrap();
    a.register(&buf).unwrap();
    let mut p = net.peer("remote", SIZE, &[]);
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

/// A peer killed while we read from it: every transfer is either complete with the right bytes
/// or failed, and the one in flight at the kill fails within the timeout.
pub fn killed_target(net: &Net, backend: Backend) {
    let timeout = Duration::from_secs(2);
    let a = net.agent("reader", timeout);
    let size = 64 << 20;
    let buf = HostBuffer::new(size).unwrap();
    a.register(&buf).unwrap();
    let mut p = net.peer("victim", size, &[]);
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
    // The kill lands a few milliseconds after the first READ completed, while others run.
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    let killer = {
        let pid = p.child.id();
        std::thread::spawn(move || {
            let _ = wait_go.recv();
            std::thread::sleep(Duration::from_millis(15));
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
                if done == 0 {
                    go.send(()).unwrap();
                }
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
    // Without a first completed READ the killer is never released: unblock it.
    drop(go);
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

/// The peer writes into us slot after slot and is killed mid-way: every notification we got
/// names bytes that are all there, and no notification comes for the write cut short.
pub fn killed_initiator(net: &Net, backend: &str) {
    let a = net.agent("sink", Duration::from_secs(2));
    let size = 64usize << 20;
    let buf = HostBuffer::new(size).unwrap();
    a.register(&buf).unwrap();
    let mut p = net.peer("writer", size, &[]);
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

/// A peer killed while it reads from the agent in a loop (the agent answering, on backends
/// where the target takes part) leaves the agent serving: a new peer then reads from it
/// intact.
pub fn killed_reader(net: &Net, backend: &str) {
    let a = net.agent("source", Duration::from_secs(2));
    let size = 64usize << 20;
    let buf = HostBuffer::new(size).unwrap();
    buf.fill(0x6b);
    a.register(&buf).unwrap();
    let mut p = net.peer("reader", size, &[]);
    a.load_remote(&p.meta).unwrap();
    p.cmd(&format!("connect {}", a.listen_addr()));
    let slot = 8usize << 20;
    assert_eq!(
        p.cmd(&format!("readloop source {backend} {slot} {}", size / slot)),
        "STARTED"
    );
    // Let it read a while, then kill it with reads in flight.
    std::thread::sleep(Duration::from_millis(700));
    p.kill();
    std::thread::sleep(Duration::from_millis(300));
    let mut q = net.peer("second-reader", size, &[]);
    let md = a.export_metadata();
    assert!(q.cmd(&format!("load {}", hex(&md))).starts_with("OK"));
    let pieces = [(0u64, 3u64 << 20), (40 << 20, 4097)];
    assert_eq!(
        q.cmd(&format!("readsum source {backend} {}", pieces_arg(&pieces))),
        format!("SUM {:016x}", local_sum(&buf, &pieces))
    );
    q.cmd("quit");
}

pub fn verify(buf: &HostBuffer, msg: &[u8]) {
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

/// A peer that restarts (same name, new process, new metadata) is reached again once its new
/// metadata is loaded; the old metadata is refused with a clear error.
pub fn restarted_peer(net: &Net, backends: &[Backend]) {
    let a = net.agent("client", Duration::from_secs(2));
    let buf = HostBuffer::new(SIZE).unwrap();
    a.register(&buf).unwrap();
    for &backend in backends {
        let mut p = net.peer("server", SIZE, &["--seed", "11"]);
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

        let mut q = net.peer(
            "server",
            SIZE,
            &["--seed", "12", "--listen", &old_addr.to_string()],
        );
        // The old handle still names the old process: refused, never sent to the new one.
        h.post(None).ok();
        let e = h.wait_timeout(WAIT).unwrap_err().to_string();
        assert!(
            backend == Backend::Ucx
                || e.contains("restarted")
                || e.contains("connection closed")
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
