//! The same-host backend: `process_vm_readv`/`process_vm_writev` copy between the two
//! processes' registered memory in one step, on a worker thread of the initiating agent.
//!
//! The remote process is named by pid, checked against the start time in its metadata (a
//! reused pid is refused) and watched through a pidfd: a transfer during which the peer exited
//! fails, whatever the syscalls returned. Notifications follow the data over the TCP
//! connection, so they arrive after the data is visible.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::agent::{Inner, Remote};
use crate::error::{peer_err, Error, Result};
use crate::xfer::{Op, Seg, XferShared};

const IOV_MAX: usize = 1024;

/// Start time (clock ticks since boot) of a process, field 22 of /proc/PID/stat.
pub(crate) fn pid_start(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    // Fields after the command name start at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Lets processes that are not our ancestors read and write our memory (Yama ptrace scope 1).
pub(crate) fn allow_peers() {
    // SAFETY: prctl with integer arguments only; failure (no Yama) is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0);
    }
}

/// A remote process, held through a pidfd.
pub(crate) struct Peer {
    pid: i32,
    pidfd: i32,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe {
            libc::close(self.pidfd);
        }
    }
}

impl Peer {
    fn open(r: &Remote) -> Result<Peer> {
        let m = &r.meta;
        let pid = m.pid as i32;
        // SAFETY: pidfd_open(pid, 0) takes integers and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if fd < 0 {
            return Err(peer_err(
                &m.name,
                format!("process {pid} is gone: {}", std::io::Error::last_os_error()),
            ));
        }
        let p = Peer { pid, pidfd: fd };
        // Checked after the pidfd exists: if the start time matches now, the pidfd names the
        // process of the metadata.
        if pid_start(m.pid) != Some(m.pid_start) {
            return Err(peer_err(
                &m.name,
                format!("process {pid} is not the one of the loaded metadata (it exited)"),
            ));
        }
        Ok(p)
    }

    pub(crate) fn exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n != 0
    }
}

pub(crate) struct Worker {
    tx: Mutex<Option<crossbeam_channel::Sender<Arc<XferShared>>>>,
    rx: crossbeam_channel::Receiver<Arc<XferShared>>,
}

impl Worker {
    pub fn new() -> Result<Worker> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Ok(Worker {
            tx: Mutex::new(Some(tx)),
            rx,
        })
    }

    pub fn start(&self, inner: Weak<Inner>) -> Result<()> {
        let rx = self.rx.clone();
        std::thread::Builder::new()
            .name("kvtransfer-shm".into())
            .spawn(move || {
                // Spin a little before sleeping: back-to-back posts then find the worker
                // awake and need no wake-up call.
                let next = |rx: &crossbeam_channel::Receiver<Arc<XferShared>>| {
                    let t = std::time::Instant::now();
                    while t.elapsed() < std::time::Duration::from_micros(50) {
                        match rx.try_recv() {
                            Ok(x) => return Ok(x),
                            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                                return Err(crossbeam_channel::RecvError)
                            }
                            Err(crossbeam_channel::TryRecvError::Empty) => std::hint::spin_loop(),
                        }
                    }
                    rx.recv()
                };
                while let Ok(x) = next(&rx) {
                    let Some(i) = inner.upgrade() else {
                        x.complete(Err(Error::Invalid("the agent was dropped".into())));
                        continue;
                    };
                    if x.is_cancelled() {
                        x.complete(Err(Error::Cancelled));
                        continue;
                    }
                    let r = match x.backend {
                        crate::xfer::Backend::CudaIpc => crate::gpu::run_ipc(&i, &x),
                        _ => run(&i, &x),
                    };
                    x.complete(r);
                }
            })?;
        Ok(())
    }

    pub fn submit(&self, x: Arc<XferShared>) -> Result<()> {
        match self.tx.lock().as_ref() {
            Some(tx) => tx
                .send(x)
                .map_err(|_| Error::Invalid("the shm worker stopped".into())),
            None => Err(Error::Invalid("the agent was dropped".into())),
        }
    }

    pub fn stop(&self) {
        self.tx.lock().take();
    }
}

/// The remote's process, opened on first use.
pub(crate) fn peer_of(r: &Remote) -> Result<Arc<Peer>> {
    let mut g = r.shm.lock();
    match g.as_ref() {
        Some(p) => Ok(p.clone()),
        None => {
            let p = Arc::new(Peer::open(r)?);
            *g = Some(p.clone());
            Ok(p)
        }
    }
}

/// Runs a same-host transfer around `move_bytes`: the peer process must be alive before and
/// after it (a transfer during which it exited fails, whatever the copies returned), and the
/// notification follows the data over the TCP connection.
pub(crate) fn same_host(
    inner: &Arc<Inner>,
    x: &XferShared,
    move_bytes: impl FnOnce(&Peer) -> Result<()>,
) -> Result<()> {
    let r = &x.remote;
    let name = &r.meta.name;
    let peer = peer_of(r)?;
    if peer.exited() {
        return Err(peer_err(name, "process exited"));
    }
    let notif = x.take_notif();
    // The control connection carries the notification; open it first so a peer that stopped
    // accepting is noticed before the data moves.
    let conn = if notif.is_some() {
        Some(r.conn(inner)?)
    } else {
        None
    };
    move_bytes(&peer)?;
    if peer.exited() {
        return Err(peer_err(name, "process exited during the transfer"));
    }
    if let (Some(c), Some(m)) = (conn, notif) {
        c.send_notif(m)?;
    }
    Ok(())
}

fn run(inner: &Arc<Inner>, x: &XferShared) -> Result<()> {
    let name = &x.remote.meta.name;
    same_host(inner, x, |peer| {
        if x.total >= SPLIT && x.local.len() < IOV_MAX {
            // Large copies run as two halves on two threads (the kernel copies page by page).
            let (l1, r1, l2, r2) = halves(&x.local, &x.remote_segs, x.total / 2);
            let (a, b) = std::thread::scope(|s| {
                let h = s.spawn(|| copy(peer, name, x.op, &x.cancel, &l2, &r2));
                let a = copy(peer, name, x.op, &x.cancel, &l1, &r1);
                (
                    a,
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Io("copy thread panicked".into()))),
                )
            });
            a?;
            b
        } else {
            copy(peer, name, x.op, &x.cancel, &x.local, &x.remote_segs)
        }
    })
}

/// Transfers of at least this many bytes are copied by two threads.
const SPLIT: u64 = 16 << 20;

/// Splits paired segment lists at `at` bytes.
fn halves(local: &[Seg], remote: &[Seg], at: u64) -> (Vec<Seg>, Vec<Seg>, Vec<Seg>, Vec<Seg>) {
    let (mut l1, mut r1, mut l2, mut r2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut done = 0u64;
    for (l, r) in local.iter().zip(remote) {
        if done >= at {
            l2.push(*l);
            r2.push(*r);
        } else if done + l.len <= at {
            l1.push(*l);
            r1.push(*r);
        } else {
            let k = at - done;
            l1.push(Seg {
                addr: l.addr,
                len: k,
            });
            r1.push(Seg {
                addr: r.addr,
                len: k,
            });
            l2.push(Seg {
                addr: l.addr + k,
                len: l.len - k,
            });
            r2.push(Seg {
                addr: r.addr + k,
                len: r.len - k,
            });
        }
        done += l.len;
    }
    (l1, r1, l2, r2)
}

/// Copies paired segments between this process and the peer.
fn copy(
    peer: &Peer,
    name: &str,
    op: Op,
    cancel: &std::sync::atomic::AtomicBool,
    local: &[Seg],
    remote: &[Seg],
) -> Result<()> {
    let mut i = 0;
    let n = local.len();
    let mut liov: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX.min(n));
    let mut riov: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX.min(n));
    // Progress inside the current batch after a partial copy.
    let mut skip = 0u64;
    while i < n {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        liov.clear();
        riov.clear();
        let mut want = 0u64;
        let end = (i + IOV_MAX).min(n);
        for k in i..end {
            let (l, rm) = (local[k], remote[k]);
            let off = if k == i { skip } else { 0 };
            liov.push(libc::iovec {
                iov_base: (l.addr + off) as *mut libc::c_void,
                iov_len: (l.len - off) as usize,
            });
            riov.push(libc::iovec {
                iov_base: (rm.addr + off) as *mut libc::c_void,
                iov_len: (rm.len - off) as usize,
            });
            want += l.len - off;
        }
        // SAFETY: local iovecs point into this process's registered regions (checked at
        // prepare); remote iovecs into the peer's registered regions as its metadata lists them.
        // The kernel checks the remote side and fails with EFAULT outside its mappings.
        let got = unsafe {
            match op {
                Op::Write => libc::process_vm_writev(
                    peer.pid,
                    liov.as_ptr(),
                    liov.len() as libc::c_ulong,
                    riov.as_ptr(),
                    riov.len() as libc::c_ulong,
                    0,
                ),
                Op::Read => libc::process_vm_readv(
                    peer.pid,
                    liov.as_ptr(),
                    liov.len() as libc::c_ulong,
                    riov.as_ptr(),
                    riov.len() as libc::c_ulong,
                    0,
                ),
            }
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            let why = match e.raw_os_error() {
                Some(libc::ESRCH) => "process exited".to_string(),
                Some(libc::EPERM) => format!(
                    "not permitted to access process {} (ptrace restrictions): {e}",
                    peer.pid
                ),
                Some(libc::EFAULT) => {
                    "remote memory is not mapped (deregistered or stale metadata)".to_string()
                }
                _ => format!("process_vm: {e}"),
            };
            return Err(peer_err(name, why));
        }
        let mut got = got as u64;
        if got == want {
            i = end;
            skip = 0;
            continue;
        }
        if got == 0 {
            return Err(peer_err(name, "remote memory is not accessible"));
        }
        // Partial copy: advance inside the batch and go on (a fault repeats as an error).
        let mut k = i;
        let mut off = skip;
        while got > 0 {
            let left = local[k].len - off;
            if got >= left {
                got -= left;
                k += 1;
                off = 0;
            } else {
                off += got;
                got = 0;
            }
        }
        i = k;
        skip = off;
    }
    Ok(())
}
