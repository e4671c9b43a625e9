//! The UCX backend: data by UCP RMA (put/get with remote keys) where an endpoint has a
//! transport with native RMA, by kvtransfer's own active messages elsewhere ([`am`]);
//! notifications by active message; one progress thread per agent that owns the UCP worker.
//!
//! `libucp` (UCX >= 1.22) is opened at run time through `kvmesh-ucx-sys`; an agent created with
//! [`AgentConfig::ucx`](crate::AgentConfig::ucx) fails with a clear message when it is missing.
//! UCX picks the transports (rc/dc with RDMA hardware; tcp otherwise: with peer-failure
//! handling on, which kvtransfer needs, UCX leaves out the same-host shared-memory and cma
//! transports; `UCX_TLS` narrows them).
//!
//! Which data path an endpoint takes is decided once its wire-up completed, from the
//! transports UCX chose for it ([`AgentConfig::ucx_data`](crate::AgentConfig::ucx_data) can
//! force either). Without native RMA, UCX would emulate put/get with messages that UCX itself
//! answers on the target, and UCX 1.22 aborts the target process when such an answer fails
//! because the initiator died; the active-message path has no such answers (see [`am`]).
//!
//! On the RMA path a WRITE posts one put per segment and then flushes the endpoint: when the
//! flush completes, the data is visible at the target, and only then is the notification sent
//! (an eager active message on the same endpoint). A READ posts gets and flushes likewise. On
//! the active-message path the target's ack plays the flush's part. Peer failures reach
//! in-flight transfers through the endpoint's error handler; a transfer that makes no progress
//! for the agent's timeout has its endpoint force-closed, which fails it.
//!
//! Two rules keep UCX from ever resending a request over an endpoint it has already failed
//! (UCX treats that as fatal and aborts the process):
//! - a new endpoint is flushed, and its wire-up thereby completed, before any transfer is
//!   posted on it (transfers wait in the endpoint's own queue meanwhile, never inside UCX's
//!   wire-up queue, and a peer that does not answer fails them after the timeout);
//! - an endpoint to a peer process that failed is never created again: transfers to that
//!   metadata fail at once, and loading the peer's metadata again (a restarted peer) reconnects.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kvmesh_ucx_sys as sys;

use crate::agent::{Inner, Remote, UcxData};
use crate::error::{peer_err, Error, Result};
use crate::xfer::{Op, XferShared};

mod am;
use am::AM_NOTIF;

fn status_str(lib: &sys::Ucp, s: sys::ucs_status_t) -> String {
    match lib.ucs_status_string.as_ref() {
        // SAFETY: ucs_status_string returns a static C string for any status.
        Ok(f) => unsafe { std::ffi::CStr::from_ptr(f(s)) }
            .to_string_lossy()
            .into_owned(),
        Err(_) => format!("status {s}"),
    }
}

macro_rules! f {
    ($lib:expr, $name:ident) => {
        $lib.$name.as_ref().map_err(|e| Error::Unavailable {
            backend: "ucx",
            msg: format!("libucp lacks {}: {e}", stringify!($name)),
        })?
    };
}

enum Cmd {
    Register {
        addr: u64,
        len: u64,
        reply: crossbeam_channel::Sender<Result<(usize, Vec<u8>)>>,
    },
    Deregister(usize),
    Xfer(Arc<XferShared>),
}

/// Handle of the UCX backend, held by the agent.
pub(crate) struct Ucx {
    tx: crossbeam_channel::Sender<Cmd>,
    wake: i32,
    pub worker_addr: Vec<u8>,
    stop: Arc<AtomicBool>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Ucx {
    fn drop(&mut self) {
        self.stop();
        // SAFETY: our eventfd.
        unsafe { libc::close(self.wake) };
    }
}

impl Ucx {
    pub fn start(inner: Weak<Inner>, name: &str, timeout: Duration) -> Result<Ucx> {
        let lib = sys::load(None).map_err(|msg| Error::Unavailable {
            backend: "ucx",
            msg,
        })?;
        let (tx, rx) = crossbeam_channel::unbounded();
        // SAFETY: eventfd with valid flags.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kvtransfer-ucx-{name}"))
            .spawn(move || match Worker::new(lib, inner, wake, timeout) {
                Ok(mut w) => {
                    let _ = ready_tx.send(Ok(w.addr.clone()));
                    w.run(&rx, &stop2);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        let worker_addr = match ready_rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let _ = thread.join();
                // SAFETY: our eventfd.
                unsafe { libc::close(wake) };
                return Err(e);
            }
            Err(_) => {
                return Err(Error::Unavailable {
                    backend: "ucx",
                    msg: "the UCX thread died".into(),
                })
            }
        };
        Ok(Ucx {
            tx,
            wake,
            worker_addr,
            stop,
            thread: parking_lot::Mutex::new(Some(thread)),
        })
    }

    /// Stops the progress thread (transfers still in flight fail).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wakeup();
        let mut g = self.thread.lock();
        if g.as_ref()
            .is_some_and(|t| t.thread().id() == std::thread::current().id())
        {
            return; // dropped on the UCX thread itself: it exits by the flag
        }
        if let Some(t) = g.take() {
            let _ = t.join();
        }
    }

    fn wakeup(&self) {
        let one = 1u64;
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe { libc::write(self.wake, (&one as *const u64).cast(), 8) };
    }

    fn send(&self, c: Cmd) -> Result<()> {
        self.tx.send(c).map_err(|_| Error::Unavailable {
            backend: "ucx",
            msg: "the UCX thread stopped".into(),
        })?;
        self.wakeup();
        Ok(())
    }

    /// Maps a region for RMA; returns the mapping's token and the packed remote key.
    pub fn register(&self, addr: u64, len: u64) -> Result<(usize, Vec<u8>)> {
        let (reply, r) = crossbeam_channel::bounded(1);
        self.send(Cmd::Register { addr, len, reply })?;
        r.recv().map_err(|_| Error::Unavailable {
            backend: "ucx",
            msg: "the UCX thread stopped".into(),
        })?
    }

    pub fn deregister(&self, token: usize) {
        let _ = self.send(Cmd::Deregister(token));
    }

    pub fn submit(&self, x: Arc<XferShared>) -> Result<()> {
        self.send(Cmd::Xfer(x))
    }
}

/// State of one remote endpoint (progress thread only).
struct Ep {
    ep: sys::ucp_ep_h,
    /// Tells this endpoint from a later one to the same peer.
    id: u64,
    /// When the wire-up flush was posted, while it runs.
    connecting: Option<Instant>,
    /// Transfers posted while the endpoint connects.
    waiting: Vec<Arc<XferShared>>,
    rkeys: HashMap<u32, sys::ucp_rkey_h>,
    /// Transfers go by UCX put/get (else by kvtransfer's active messages, see `am`).
    rma: bool,
    failed: Box<EpFailure>,
    remote: Arc<Remote>,
}

/// Written by the endpoint error handler.
struct EpFailure {
    status: std::sync::atomic::AtomicI8,
}

/// The wire-up flush of a new endpoint: (peer, endpoint id, status) on completion.
struct Connect {
    key: (String, u64),
    id: u64,
    free: unsafe extern "C" fn(*mut c_void),
    done: crossbeam_channel::Sender<((String, u64), u64, sys::ucs_status_t)>,
}

struct Flush {
    x: Arc<XferShared>,
    free: unsafe extern "C" fn(*mut c_void),
    done: crossbeam_channel::Sender<(Arc<XferShared>, sys::ucs_status_t)>,
}

struct Worker {
    lib: Arc<sys::Ucp>,
    ctx: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    efd: i32,
    wake: i32,
    addr: Vec<u8>,
    eps: HashMap<(String, u64), Ep>,
    /// Peers whose endpoint failed, with the metadata it was built from and why.
    dead: HashMap<(String, u64), (Weak<Remote>, String)>,
    inflight: Vec<(Arc<XferShared>, Instant, (String, u64))>,
    done_tx: crossbeam_channel::Sender<(Arc<XferShared>, sys::ucs_status_t)>,
    done_rx: crossbeam_channel::Receiver<(Arc<XferShared>, sys::ucs_status_t)>,
    conn_tx: crossbeam_channel::Sender<((String, u64), u64, sys::ucs_status_t)>,
    conn_rx: crossbeam_channel::Receiver<((String, u64), u64, sys::ucs_status_t)>,
    next_ep: u64,
    timeout: Duration,
    am: *mut am::AmState,
    /// Id of the next post on the active-message path.
    next_seq: u64,
    /// The data path the agent's configuration forces (`Some(true)`: RMA).
    force_rma: Option<bool>,
    name: String,
    mapped: std::collections::HashSet<usize>,
}

extern "C" fn ep_error(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: arg is the EpFailure boxed in Ep, which outlives the endpoint.
    let f = unsafe { &*(arg as *const EpFailure) };
    f.status.store(status, Ordering::Release);
}

extern "C" fn flush_done(req: *mut c_void, status: sys::ucs_status_t, user: *mut c_void) {
    // SAFETY: user is the Box<Flush> leaked when the flush was posted; called once.
    let f = unsafe { Box::from_raw(user as *mut Flush) };
    // SAFETY: the flush request UCX handed back at post; released once, here.
    unsafe { (f.free)(req) };
    let _ = f.done.send((f.x, status));
}

extern "C" fn connect_done(req: *mut c_void, status: sys::ucs_status_t, user: *mut c_void) {
    // SAFETY: user is the Box<Connect> leaked when the flush was posted; called once.
    let c = unsafe { Box::from_raw(user as *mut Connect) };
    // SAFETY: the flush request UCX handed back at post; released once, here.
    unsafe { (c.free)(req) };
    let _ = c.done.send((c.key, c.id, status));
}

impl Worker {
    fn new(lib: sys::Ucp, inner: Weak<Inner>, wake: i32, timeout: Duration) -> Result<Worker> {
        let lib = Arc::new(lib);
        let name = inner.upgrade().map(|i| i.name.clone()).unwrap_or_default();
        let fail = |what: &str, s: sys::ucs_status_t| Error::Unavailable {
            backend: "ucx",
            msg: format!("{what}: {}", status_str(&lib, s)),
        };
        // SAFETY: zeroed C parameter structs are valid with field_mask selecting what is set;
        // every handle passed on is one UCX just returned.
        unsafe {
            let mut cfg: *mut sys::ucp_config_t = std::ptr::null_mut();
            let s = f!(lib, ucp_config_read)(std::ptr::null(), std::ptr::null(), &mut cfg);
            if s != sys::UCS_OK {
                return Err(fail("ucp_config_read", s));
            }
            let mut p: sys::ucp_params_t = std::mem::zeroed();
            p.field_mask =
                (sys::UCP_PARAM_FIELD_FEATURES | sys::UCP_PARAM_FIELD_MT_WORKERS_SHARED) as u64;
            p.features =
                (sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_AM | sys::UCP_FEATURE_WAKEUP) as u64;
            p.mt_workers_shared = 0;
            let mut ctx: sys::ucp_context_h = std::ptr::null_mut();
            let s = f!(lib, ucp_init_version)(
                sys::UCP_API_MAJOR,
                sys::UCP_API_MINOR,
                &p,
                cfg,
                &mut ctx,
            );
            f!(lib, ucp_config_release)(cfg);
            if s != sys::UCS_OK {
                return Err(fail("ucp_init", s));
            }
            let mut wp: sys::ucp_worker_params_t = std::mem::zeroed();
            wp.field_mask = sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
            wp.thread_mode = sys::UCS_THREAD_MODE_SINGLE;
            let mut worker: sys::ucp_worker_h = std::ptr::null_mut();
            let s = f!(lib, ucp_worker_create)(ctx, &wp, &mut worker);
            if s != sys::UCS_OK {
                f!(lib, ucp_cleanup)(ctx);
                return Err(fail("ucp_worker_create", s));
            }
            let mut efd = -1;
            let s = f!(lib, ucp_worker_get_efd)(worker, &mut efd);
            if s != sys::UCS_OK {
                return Err(fail("ucp_worker_get_efd", s));
            }
            let mut attr: sys::ucp_worker_attr_t = std::mem::zeroed();
            attr.field_mask = sys::UCP_WORKER_ATTR_FIELD_ADDRESS as u64;
            let s = f!(lib, ucp_worker_query)(worker, &mut attr);
            if s != sys::UCS_OK {
                return Err(fail("ucp_worker_query", s));
            }
            let addr =
                std::slice::from_raw_parts(attr.address as *const u8, attr.address_length).to_vec();
            f!(lib, ucp_worker_release_address)(worker, attr.address);
            let force_rma = match inner.upgrade().map(|i| i.cfg.ucx_data) {
                Some(UcxData::Rma) => Some(true),
                Some(UcxData::ActiveMessages) => Some(false),
                Some(UcxData::Auto) | None => None,
            };
            let am = Box::into_raw(Box::new(am::AmState::new(lib.clone(), inner)));
            if let Err(msg) = am::set_handlers(&lib, worker, am) {
                f!(lib, ucp_worker_destroy)(worker);
                f!(lib, ucp_cleanup)(ctx);
                drop(Box::from_raw(am));
                return Err(Error::Unavailable {
                    backend: "ucx",
                    msg,
                });
            }
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            let (conn_tx, conn_rx) = crossbeam_channel::unbounded();
            Ok(Worker {
                lib,
                ctx,
                worker,
                efd,
                wake,
                addr,
                eps: HashMap::new(),
                dead: HashMap::new(),
                inflight: Vec::new(),
                done_tx,
                done_rx,
                conn_tx,
                conn_rx,
                next_ep: 0,
                timeout,
                am,
                next_seq: 0,
                force_rma,
                name,
                mapped: std::collections::HashSet::new(),
            })
        }
    }

    fn run(&mut self, rx: &crossbeam_channel::Receiver<Cmd>, stop: &AtomicBool) {
        let Ok(progress) = self.lib.ucp_worker_progress.as_ref().copied() else {
            return;
        };
        let Ok(arm) = self.lib.ucp_worker_arm.as_ref().copied() else {
            return;
        };
        let mut last_check = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let mut busy = false;
            while let Ok(c) = rx.try_recv() {
                busy = true;
                self.handle(c);
            }
            // SAFETY: our worker, on its own thread.
            while unsafe { progress(self.worker) } != 0 {
                busy = true;
            }
            while let Ok((x, s)) = self.done_rx.try_recv() {
                busy = true;
                self.finish(&x, s);
            }
            while let Ok((key, id, s)) = self.conn_rx.try_recv() {
                busy = true;
                self.connected(&key, id, s);
            }
            let acked = std::mem::take(&mut *self.am().done.borrow_mut());
            for (x, r) in acked {
                busy = true;
                match r {
                    Ok(()) => self.finish(&x, sys::UCS_OK),
                    Err(why) => {
                        self.forget(&x);
                        x.complete(Err(peer_err(
                            &x.remote.meta.name,
                            format!("the target refused the transfer: {why}"),
                        )));
                    }
                }
            }
            if last_check.elapsed() > Duration::from_millis(20) {
                last_check = Instant::now();
                self.check_eps();
            }
            if busy {
                continue;
            }
            if !self.inflight.is_empty() || self.eps.values().any(|e| e.connecting.is_some()) {
                std::hint::spin_loop();
                continue;
            }
            // Idle: sleep until UCX or a command wakes us.
            // SAFETY: our worker.
            if unsafe { arm(self.worker) } == sys::UCS_OK {
                let mut fds = [
                    libc::pollfd {
                        fd: self.efd,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: self.wake,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: two valid pollfds.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                let mut buf = 0u64;
                // SAFETY: reading 8 bytes from our non-blocking eventfd.
                unsafe { libc::read(self.wake, (&mut buf as *mut u64).cast(), 8) };
            }
        }
        self.shutdown();
    }

    fn handle(&mut self, c: Cmd) {
        match c {
            Cmd::Register { addr, len, reply } => {
                let r = self.map(addr, len);
                if let Ok((t, _)) = &r {
                    self.mapped.insert(*t);
                }
                let _ = reply.send(r);
            }
            Cmd::Deregister(token) => {
                if !self.mapped.remove(&token) {
                    return;
                }
                if let Ok(unmap) = self.lib.ucp_mem_unmap.as_ref() {
                    // SAFETY: token is a memh our map() returned.
                    unsafe { unmap(self.ctx, token as sys::ucp_mem_h) };
                }
            }
            Cmd::Xfer(x) => {
                if x.is_cancelled() {
                    x.complete(Err(Error::Cancelled));
                    return;
                }
                if let Err(e) = self.post(&x) {
                    x.complete(Err(e));
                }
            }
        }
    }

    fn map(&mut self, addr: u64, len: u64) -> Result<(usize, Vec<u8>)> {
        let lib = self.lib.clone();
        // SAFETY: zeroed params with ADDRESS|LENGTH selected map existing memory of ours.
        unsafe {
            let mut p: sys::ucp_mem_map_params_t = std::mem::zeroed();
            p.field_mask =
                (sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH) as u64;
            p.address = addr as *mut c_void;
            p.length = len as usize;
            let mut memh: sys::ucp_mem_h = std::ptr::null_mut();
            let s = f!(lib, ucp_mem_map)(self.ctx, &p, &mut memh);
            if s != sys::UCS_OK {
                return Err(Error::Io(format!("ucp_mem_map: {}", status_str(&lib, s))));
            }
            let mut buf: *mut c_void = std::ptr::null_mut();
            let mut size = 0usize;
            let s = f!(lib, ucp_rkey_pack)(self.ctx, memh, &mut buf, &mut size);
            if s != sys::UCS_OK {
                f!(lib, ucp_mem_unmap)(self.ctx, memh);
                return Err(Error::Io(format!("ucp_rkey_pack: {}", status_str(&lib, s))));
            }
            let rkey = std::slice::from_raw_parts(buf as *const u8, size).to_vec();
            f!(lib, ucp_rkey_buffer_release)(buf);
            Ok((memh as usize, rkey))
        }
    }

    fn key(r: &Remote) -> (String, u64) {
        (r.meta.name.clone(), r.meta.instance)
    }

    /// The endpoint to a remote, created on first use; `None` while it connects (its wire-up
    /// flush runs), when transfers wait in its queue.
    fn ep(&mut self, r: &Arc<Remote>) -> Result<Option<sys::ucp_ep_h>> {
        let key = Self::key(r);
        if let Some(e) = self.eps.get(&key) {
            if e.failed.status.load(Ordering::Acquire) == sys::UCS_OK {
                return Ok(e.connecting.is_none().then_some(e.ep));
            }
            let s = e.failed.status.load(Ordering::Acquire);
            let msg = format!("UCX endpoint failed: {}", status_str(&self.lib, s));
            self.give_up(&key, msg.clone());
            return Err(peer_err(&r.meta.name, msg));
        }
        if let Some((w, why)) = self.dead.get(&key) {
            if std::ptr::eq(w.as_ptr(), Arc::as_ptr(r)) {
                return Err(peer_err(
                    &r.meta.name,
                    format!("{why} (earlier; load the peer's metadata again to reconnect)"),
                ));
            }
        }
        if r.meta.ucx_worker.is_empty() {
            return Err(Error::Unavailable {
                backend: "ucx",
                msg: format!("{:?} did not enable UCX", r.meta.name),
            });
        }
        let failed = Box::new(EpFailure {
            status: std::sync::atomic::AtomicI8::new(sys::UCS_OK),
        });
        let lib = self.lib.clone();
        // SAFETY: the worker address bytes outlive the call; the error handler's argument is
        // the boxed EpFailure that lives as long as the endpoint.
        let ep = unsafe {
            let mut p: sys::ucp_ep_params_t = std::mem::zeroed();
            p.field_mask = (sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64;
            p.address = r.meta.ucx_worker.as_ptr() as *const sys::ucp_address_t;
            p.err_mode = sys::UCP_ERR_HANDLING_MODE_PEER;
            p.err_handler.cb = Some(ep_error);
            p.err_handler.arg = &*failed as *const EpFailure as *mut c_void;
            let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
            let s = f!(lib, ucp_ep_create)(self.worker, &p, &mut ep);
            if s != sys::UCS_OK {
                return Err(peer_err(
                    &r.meta.name,
                    format!("ucp_ep_create: {}", status_str(&lib, s)),
                ));
            }
            ep
        };
        self.next_ep += 1;
        let id = self.next_ep;
        self.eps.insert(
            key.clone(),
            Ep {
                ep,
                id,
                connecting: Some(Instant::now()),
                waiting: Vec::new(),
                rkeys: HashMap::new(),
                rma: false,
                failed,
                remote: r.clone(),
            },
        );
        // Complete the wire-up before anything is posted: a flush of a new endpoint finishes
        // once its lanes are connected (or fails if the peer is gone).
        let connect = Connect {
            key: key.clone(),
            id,
            free: *f!(lib, ucp_request_free),
            done: self.conn_tx.clone(),
        };
        match self.flush(ep, connect, connect_done)? {
            None => Ok(None),
            Some(s) => {
                self.connected(&key, id, s);
                self.ep(r)
            }
        }
    }

    /// Flushes `ep`; `done` later receives `user` once the flush completes. `Some(status)` if it
    /// completed (or failed) at once, when `done` never runs and `user` is dropped here.
    fn flush<T>(
        &self,
        ep: sys::ucp_ep_h,
        user: T,
        done: extern "C" fn(*mut c_void, sys::ucs_status_t, *mut c_void),
    ) -> Result<Option<sys::ucs_status_t>> {
        let flush = *f!(self.lib, ucp_ep_flush_nbx);
        let user = Box::into_raw(Box::new(user));
        // SAFETY: our endpoint; the callback receives `user` once; param fields selected by
        // op_attr_mask.
        let sp = unsafe {
            let mut p: sys::ucp_request_param_t = std::mem::zeroed();
            p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA;
            p.cb.send = Some(done);
            p.user_data = user as *mut c_void;
            flush(ep, &p)
        };
        if sys::ptr_is_ptr(sp) {
            return Ok(None); // the callback releases the request and `user`
        }
        // SAFETY: the callback will not run: reclaim the box it would have taken.
        drop(unsafe { Box::from_raw(user) });
        Ok(Some(sys::ptr_status(sp)))
    }

    /// The wire-up flush of endpoint `id` to `key` ended with `s`: its waiting transfers are
    /// posted, or failed with it.
    fn connected(&mut self, key: &(String, u64), id: u64, s: sys::ucs_status_t) {
        let Some(e) = self.eps.get_mut(key).filter(|e| e.id == id) else {
            return; // closed meanwhile: its waiting transfers were failed then
        };
        e.connecting = None;
        let f = e.failed.status.load(Ordering::Acquire);
        let s = if s == sys::UCS_OK { f } else { s };
        if s != sys::UCS_OK {
            let msg = format!(
                "UCX endpoint failed to connect: {}",
                status_str(&self.lib, s)
            );
            for x in self.give_up(key, msg.clone()) {
                x.complete(Err(peer_err(&key.0, msg.clone())));
            }
            return;
        }
        e.rma = self
            .force_rma
            .unwrap_or_else(|| native_rma(&self.lib, e.ep));
        let waiting = std::mem::take(&mut e.waiting);
        for x in waiting {
            if let Err(err) = self.post(&x) {
                x.complete(Err(err));
            }
        }
    }

    /// Closes the endpoint to `key` for good: no endpoint is built again from the metadata it
    /// was built from (see the module docs). Returns the transfers that waited for it to connect.
    fn give_up(&mut self, key: &(String, u64), why: String) -> Vec<Arc<XferShared>> {
        let Some(e) = self.eps.get_mut(key) else {
            return Vec::new();
        };
        let waiting = std::mem::take(&mut e.waiting);
        let remote = Arc::downgrade(&e.remote);
        self.close_ep(key);
        self.dead.insert(key.clone(), (remote, why));
        waiting
    }

    /// Waits (progressing the worker) for a request UCX returned, at most the agent's
    /// timeout; returns its status (`UCS_INPROGRESS` if it did not finish) and releases it.
    fn wait_request(&mut self, sp: sys::ucs_status_ptr_t) -> sys::ucs_status_t {
        if !sys::ptr_is_ptr(sp) {
            return sys::ptr_status(sp);
        }
        let (Ok(check), Ok(progress), Ok(free)) = (
            self.lib.ucp_request_check_status.as_ref(),
            self.lib.ucp_worker_progress.as_ref(),
            self.lib.ucp_request_free.as_ref(),
        ) else {
            return sys::UCS_ERR_UNSUPPORTED;
        };
        let t = Instant::now();
        // SAFETY: a live request of our worker, released once below.
        unsafe {
            while check(sp) == sys::UCS_INPROGRESS && t.elapsed() < self.timeout {
                progress(self.worker);
            }
            let s = check(sp);
            free(sp);
            s
        }
    }

    fn rkey(&mut self, r: &Arc<Remote>, region: u32) -> Result<sys::ucp_rkey_h> {
        let key = Self::key(r);
        let lib = self.lib.clone();
        let e = self.eps.get_mut(&key).expect("endpoint exists");
        if let Some(k) = e.rkeys.get(&region) {
            return Ok(*k);
        }
        let packed = r
            .meta
            .regions
            .iter()
            .find(|m| m.id == region)
            .map(|m| &m.ucx_rkey)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                peer_err(
                    &r.meta.name,
                    format!("region {region} has no UCX remote key"),
                )
            })?;
        let mut rk: sys::ucp_rkey_h = std::ptr::null_mut();
        // SAFETY: packed bytes came from the peer's ucp_rkey_pack; UCX validates them.
        let s =
            unsafe { f!(lib, ucp_ep_rkey_unpack)(e.ep, packed.as_ptr() as *const c_void, &mut rk) };
        if s != sys::UCS_OK {
            return Err(peer_err(
                &r.meta.name,
                format!("bad UCX remote key: {}", status_str(&lib, s)),
            ));
        }
        e.rkeys.insert(region, rk);
        Ok(rk)
    }

    fn post(&mut self, x: &Arc<XferShared>) -> Result<()> {
        let r = x.remote.clone();
        let Some(ep) = self.ep(&r)? else {
            if let Some(e) = self.eps.get_mut(&Self::key(&r)) {
                e.waiting.push(x.clone());
            }
            return Ok(());
        };
        let rma = self.eps.get(&Self::key(&r)).is_some_and(|e| e.rma);
        if !rma {
            self.next_seq += 1;
            let seq = self.next_seq;
            self.am()
                .post(ep, seq, x)
                .map_err(|why| peer_err(&r.meta.name, why))?;
            self.inflight
                .push((x.clone(), Instant::now(), Self::key(&r)));
            return Ok(());
        }
        let lib = self.lib.clone();
        let put = *f!(lib, ucp_put_nbx);
        let get = *f!(lib, ucp_get_nbx);
        let free = *f!(lib, ucp_request_free);
        let mut last_region = u32::MAX;
        let mut rk: sys::ucp_rkey_h = std::ptr::null_mut();
        for (i, (l, rm)) in x.local.iter().zip(&x.remote_segs).enumerate() {
            let region = x.remote_regions[i];
            if region != last_region {
                rk = self.rkey(&r, region)?;
                last_region = region;
            }
            // SAFETY: local segments lie in our registered (mapped) regions, remote ones in the
            // peer's regions named by the rkey; a zeroed param asks for no callback.
            let sp = unsafe {
                let p: sys::ucp_request_param_t = std::mem::zeroed();
                match x.op {
                    Op::Write => put(ep, l.addr as *const c_void, l.len as usize, rm.addr, rk, &p),
                    Op::Read => get(ep, l.addr as *mut c_void, l.len as usize, rm.addr, rk, &p),
                }
            };
            if sys::ptr_is_err(sp) {
                return Err(peer_err(
                    &r.meta.name,
                    format!("UCX {:?}: {}", x.op, status_str(&lib, sys::ptr_status(sp))),
                ));
            }
            if sys::ptr_is_ptr(sp) {
                // SAFETY: a request UCX returned; it is released when it completes.
                unsafe { free(sp) };
            }
        }
        // The flush completes once every put/get completed (remotely visible for puts).
        let flush = Flush {
            x: x.clone(),
            free,
            done: self.done_tx.clone(),
        };
        match self.flush(ep, flush, flush_done)? {
            None => self
                .inflight
                .push((x.clone(), Instant::now(), Self::key(&r))),
            Some(s) => self.finish(x, s),
        }
        Ok(())
    }

    /// The active-message state the receive handlers share (this thread only).
    fn am(&self) -> &am::AmState {
        // SAFETY: the box lives until shutdown; only this thread uses it, and no borrow of
        // its cells is held across UCX calls.
        unsafe { &*self.am }
    }

    /// Drops `x` from the transfers in flight.
    fn forget(&mut self, x: &Arc<XferShared>) {
        self.inflight.retain(|(y, _, _)| !Arc::ptr_eq(x, y));
        self.am()
            .pending
            .borrow_mut()
            .retain(|_, p| !Arc::ptr_eq(&p.x, x));
    }

    fn finish(&mut self, x: &Arc<XferShared>, s: sys::ucs_status_t) {
        self.forget(x);
        if s != sys::UCS_OK {
            let why = status_str(&self.lib, s);
            x.complete(Err(peer_err(
                &x.remote.meta.name,
                format!("UCX transfer failed: {why}"),
            )));
            return;
        }
        if let Some(e) = self.eps.get(&Self::key(&x.remote)) {
            let f = e.failed.status.load(Ordering::Acquire);
            if f != sys::UCS_OK {
                let why = status_str(&self.lib, f);
                x.complete(Err(peer_err(
                    &x.remote.meta.name,
                    format!("UCX endpoint failed: {why}"),
                )));
                return;
            }
        }
        if x.is_cancelled() {
            x.complete(Err(Error::Cancelled));
            return;
        }
        if let Some(m) = x.take_notif() {
            let r = x.remote.clone();
            // The endpoint the transfer went over (still there: its flush just succeeded).
            let ep = self
                .eps
                .get(&Self::key(&r))
                .filter(|e| e.connecting.is_none())
                .map(|e| e.ep)
                .ok_or_else(|| peer_err(&r.meta.name, "UCX endpoint closed".to_string()));
            match ep.and_then(|ep| self.send_notif(ep, &m)) {
                Ok(()) => {}
                Err(e) => {
                    x.complete(Err(e));
                    return;
                }
            }
        }
        x.complete(Ok(()));
    }

    fn send_notif(&mut self, ep: sys::ucp_ep_h, m: &[u8]) -> Result<()> {
        let lib = self.lib.clone();
        let send = *f!(lib, ucp_am_send_nbx);
        let name = self.name.as_bytes().to_vec();
        // UCX may keep using the buffers until the send completes: leak-free by blocking on
        // progress until it does (notifications are small and eager).
        let data = m.to_vec();
        // SAFETY: header/data live until the request completes below; eager flag set.
        let sp = unsafe {
            let mut p: sys::ucp_request_param_t = std::mem::zeroed();
            p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
            p.flags = sys::UCP_AM_SEND_FLAG_EAGER;
            send(
                ep,
                AM_NOTIF,
                name.as_ptr() as *const c_void,
                name.len(),
                data.as_ptr() as *const c_void,
                data.len(),
                &p,
            )
        };
        match self.wait_request(sp) {
            sys::UCS_OK => Ok(()),
            sys::UCS_INPROGRESS => {
                // Released unfinished: UCX may still read the buffers, so they are leaked.
                std::mem::forget(name);
                std::mem::forget(data);
                Err(Error::Io(format!(
                    "UCX notification not sent within {:?}",
                    self.timeout
                )))
            }
            s => Err(Error::Io(format!(
                "UCX notification: {}",
                status_str(&lib, s)
            ))),
        }
    }

    /// Fails transfers whose endpoint failed or that made no progress for the timeout: their
    /// endpoint is force-closed, which completes their flush with an error.
    fn check_eps(&mut self) {
        let now = Instant::now();
        // Incoming writes whose initiator never finished them.
        self.am().expire(self.timeout * 10);
        // Endpoints still connecting after the timeout.
        let stalled: Vec<_> = self
            .eps
            .iter()
            .filter(|(_, e)| {
                e.connecting
                    .is_some_and(|t| now.duration_since(t) > self.timeout)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in stalled {
            let why = format!("UCX endpoint not connected within {:?}", self.timeout);
            for x in self.give_up(&key, why) {
                x.complete(Err(Error::Timeout {
                    peer: key.0.clone(),
                    after: self.timeout,
                }));
            }
        }
        let mut close = Vec::new();
        for (_, t, key) in &self.inflight {
            // An endpoint closed meanwhile counts as failed.
            let failed = match self.eps.get(key) {
                None => Some(sys::UCS_ERR_CANCELED),
                Some(e) => Some(e.failed.status.load(Ordering::Acquire)),
            }
            .filter(|&s| s != sys::UCS_OK);
            if let Some(s) = failed {
                close.push((
                    key.clone(),
                    format!("UCX endpoint failed: {}", status_str(&self.lib, s)),
                ));
            } else if now.duration_since(*t) > self.timeout {
                let why = format!("UCX transfer made no progress for {:?}", self.timeout);
                close.push((key.clone(), why));
            }
        }
        for (key, why) in close {
            let mut stuck = self.give_up(&key, why);
            // Whatever is still in flight on it has failed.
            stuck.extend(
                self.inflight
                    .iter()
                    .filter(|(_, _, k)| *k == key)
                    .map(|(x, _, _)| x.clone()),
            );
            self.inflight.retain(|(_, _, k)| *k != key);
            for x in &stuck {
                self.forget(x);
            }
            for x in stuck {
                x.complete(Err(Error::Timeout {
                    peer: key.0.clone(),
                    after: self.timeout,
                }));
            }
        }
    }

    fn close_ep(&mut self, key: &(String, u64)) {
        let Some(e) = self.eps.remove(key) else {
            return;
        };
        for x in &e.waiting {
            x.complete(Err(peer_err(&key.0, "UCX endpoint closed".to_string())));
        }
        let lib = self.lib.clone();
        // SAFETY: rkeys and the endpoint are ours; force close cancels outstanding operations
        // (their callbacks run with an error during the progress below).
        unsafe {
            if let Ok(d) = lib.ucp_rkey_destroy.as_ref() {
                for (_, k) in e.rkeys {
                    d(k);
                }
            }
            if let (Ok(close), Ok(progress), Ok(check), Ok(free)) = (
                lib.ucp_ep_close_nbx.as_ref(),
                lib.ucp_worker_progress.as_ref(),
                lib.ucp_request_check_status.as_ref(),
                lib.ucp_request_free.as_ref(),
            ) {
                let mut p: sys::ucp_request_param_t = std::mem::zeroed();
                p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_FLAGS;
                p.flags = sys::UCP_EP_CLOSE_FLAG_FORCE;
                let sp = close(e.ep, &p);
                if sys::ptr_is_ptr(sp) {
                    let t = Instant::now();
                    while check(sp) == sys::UCS_INPROGRESS && t.elapsed() < Duration::from_secs(2) {
                        progress(self.worker);
                    }
                    free(sp);
                }
            }
        }
        // The error handler's argument must outlive the endpoint: leak it if the close did not
        // finish, drop it otherwise (it is no longer referenced after a completed close).
        drop(e.failed);
        let _ = e.remote;
    }

    fn shutdown(&mut self) {
        let keys: Vec<_> = self.eps.keys().cloned().collect();
        for k in keys {
            self.close_ep(&k);
        }
        for (x, _, _) in std::mem::take(&mut self.inflight) {
            x.complete(Err(Error::Invalid("the agent was dropped".into())));
        }
        let lib = self.lib.clone();
        // SAFETY: our mappings, worker and context; nothing uses them after this.
        unsafe {
            if let Ok(unmap) = lib.ucp_mem_unmap.as_ref() {
                for t in self.mapped.drain() {
                    unmap(self.ctx, t as sys::ucp_mem_h);
                }
            }
            if let Ok(d) = lib.ucp_worker_destroy.as_ref() {
                d(self.worker);
            }
            if let Ok(c) = lib.ucp_cleanup.as_ref() {
                c(self.ctx);
            }
            drop(Box::from_raw(self.am));
        }
    }
}

/// Whether endpoint `ep` has a transport with native RMA for host memory (RDMA, or a
/// same-host one), so that UCX put/get never fall back to its software emulation.
fn native_rma(lib: &sys::Ucp, ep: sys::ucp_ep_h) -> bool {
    let Ok(query) = lib.ucp_ep_query.as_ref() else {
        return false;
    };
    let mut entries: [sys::ucp_transport_entry_t; 16] = [sys::ucp_transport_entry_t {
        transport_name: std::ptr::null(),
        device_name: std::ptr::null(),
    }; 16];
    // SAFETY: zeroed attributes with TRANSPORTS selected and a 16-entry array of our own;
    // the names UCX returns stay valid while the endpoint lives (we only read them here).
    unsafe {
        let mut a: sys::ucp_ep_attr_t = std::mem::zeroed();
        a.field_mask = sys::UCP_EP_ATTR_FIELD_TRANSPORTS as u64;
        a.transports.entries = entries.as_mut_ptr();
        a.transports.num_entries = entries.len() as u32;
        a.transports.entry_size = std::mem::size_of::<sys::ucp_transport_entry_t>();
        if query(ep, &mut a) != sys::UCS_OK {
            return false;
        }
        let n = (a.transports.num_entries as usize).min(entries.len());
        entries[..n].iter().any(|e| {
            !e.transport_name.is_null() && {
                let t = std::ffi::CStr::from_ptr(e.transport_name).to_string_lossy();
                t.starts_with("rc")
                    || t.starts_with("dc")
                    || ["cma", "knem", "xpmem", "srd"].contains(&t.as_ref())
            }
        })
    }
}
