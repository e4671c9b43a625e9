//! The active-message data path of the UCX backend, for endpoints without native RMA.
//!
//! Without an RDMA transport (TCP only), UCX emulates put and get with active messages that
//! UCX itself answers on the target. When an initiator dies with such a request in flight, the
//! target's answer fails inside UCX, and UCX 1.22 aborts the *target* process ("unexpected
//! error: Endpoint timeout"): a dead writer would take its reader down with it. On such
//! endpoints kvtransfer moves the data with its own active messages instead, whose failed
//! sends complete a request with an error that is dropped:
//!
//! - WRITE: the initiator sends its data in chunks (`AM_WRITE`, eager). The target checks each
//!   chunk against its registered regions, copies it in, and once every chunk of the transfer
//!   has arrived answers `AM_ACK` (carrying the refusal, if a chunk was refused). The initiator
//!   completes the transfer on the ack, and only then sends its notification, so the data is in
//!   place before the notification arrives.
//! - READ: the initiator sends the remote descriptors (`AM_READ`). The target checks them,
//!   answers the data in chunks (`AM_DATA`) and then `AM_ACK`. The initiator copies each chunk
//!   into its local segment and completes once every byte and the ack have arrived.
//!
//! A transfer whose peer died is failed by the endpoint's error handler or the agent's timeout,
//! as on the RMA path. Every handler runs on the agent's progress thread, inside
//! `ucp_worker_progress`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kvmesh_ucx_sys as sys;

use crate::agent::{Inner, Notif};
use crate::mem::HostBuffer;
use crate::xfer::{Op, Seg, XferShared};

pub(super) const AM_NOTIF: u32 = 7;
const AM_WRITE: u32 = 8;
const AM_READ: u32 = 9;
const AM_DATA: u32 = 10;
const AM_ACK: u32 = 11;

/// The most bytes one data message carries.
pub(super) const CHUNK: u64 = 1 << 20;
/// The most descriptors one READ request may name.
const MAX_READ_DESCS: usize = 1 << 20;

/// An incoming WRITE being assembled: chunks seen so far, the first refusal, when it began.
struct InWrite {
    seen: u64,
    err: Option<String>,
    since: Instant,
}

/// One of our transfers on this path, waiting for its ack (and, for a READ, its data).
pub(super) struct Pending {
    pub x: Arc<XferShared>,
    got: u64,
    ack: Option<Result<(), String>>,
}

/// A transfer of ours that ended on this path: acknowledged, or refused with the target's reason.
pub(super) type Done = (Arc<XferShared>, Result<(), String>);

/// What the handlers share with the worker. Owned by the worker, used on its thread only.
pub(super) struct AmState {
    lib: Arc<sys::Ucp>,
    inner: Weak<Inner>,
    /// Tells this agent's transfers from other initiators' at a target (the agent's instance).
    id: u64,
    writes: RefCell<HashMap<(u64, u64), InWrite>>,
    pub pending: RefCell<HashMap<u64, Pending>>,
    /// Transfers whose ack (and data) arrived, for the worker to finish.
    pub done: RefCell<Vec<Done>>,
}

impl AmState {
    pub fn new(lib: Arc<sys::Ucp>, inner: Weak<Inner>) -> AmState {
        let id = inner.upgrade().map(|i| i.instance).unwrap_or_default();
        AmState {
            lib,
            inner,
            id,
            writes: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            done: RefCell::new(Vec::new()),
        }
    }

    /// Forgets incoming writes that began more than `age` ago (their initiator died).
    pub fn expire(&self, age: Duration) {
        let now = Instant::now();
        self.writes
            .borrow_mut()
            .retain(|_, w| now.duration_since(w.since) < age);
    }

    /// Sends transfer `x` (post `seq`) over `ep`; its completion comes through `done`.
    pub fn post(&self, ep: sys::ucp_ep_h, seq: u64, x: &Arc<XferShared>) -> Result<(), String> {
        self.pending.borrow_mut().insert(
            seq,
            Pending {
                x: x.clone(),
                got: 0,
                ack: None,
            },
        );
        let r = match x.op {
            Op::Write => self.post_write(ep, seq, x),
            Op::Read => self.post_read(ep, seq, x),
        };
        if r.is_err() {
            self.pending.borrow_mut().remove(&seq);
        }
        r
    }

    fn post_write(&self, ep: sys::ucp_ep_h, seq: u64, x: &Arc<XferShared>) -> Result<(), String> {
        let pairs = || {
            x.local
                .iter()
                .zip(&x.remote_segs)
                .filter(|(l, _)| l.len > 0)
        };
        let total: u64 = pairs().map(|(l, _)| l.len.div_ceil(CHUNK)).sum();
        if total == 0 {
            self.done.borrow_mut().push((x.clone(), Ok(())));
        }
        for (l, r) in pairs() {
            let mut off = 0;
            while off < l.len {
                let n = (l.len - off).min(CHUNK);
                let mut h = Vec::with_capacity(32);
                h.extend_from_slice(&self.id.to_le_bytes());
                h.extend_from_slice(&seq.to_le_bytes());
                h.extend_from_slice(&total.to_le_bytes());
                h.extend_from_slice(&(r.addr + off).to_le_bytes());
                let s = send(
                    &self.lib,
                    ep,
                    AM_WRITE,
                    Send::new(h),
                    (l.addr + off) as *const u8,
                    n as usize,
                );
                check(&self.lib, "WRITE", s)?;
                off += n;
            }
        }
        Ok(())
    }

    fn post_read(&self, ep: sys::ucp_ep_h, seq: u64, x: &Arc<XferShared>) -> Result<(), String> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&self.id.to_le_bytes());
        h.extend_from_slice(&seq.to_le_bytes());
        h.extend_from_slice(&(x.remote_segs.len() as u64).to_le_bytes());
        let mut body = Vec::with_capacity(x.remote_segs.len() * 16);
        for r in &x.remote_segs {
            body.extend_from_slice(&r.addr.to_le_bytes());
            body.extend_from_slice(&r.len.to_le_bytes());
        }
        let mut m = Send::new(h);
        let (p, n) = (body.as_ptr(), body.len());
        m.body = body;
        check(&self.lib, "READ", send(&self.lib, ep, AM_READ, m, p, n))
    }

    /// A READ's data chunk arrived: copied into its local segment.
    fn on_data(&self, seq: u64, seg: usize, off: u64, d: &[u8]) {
        let mut p = self.pending.borrow_mut();
        let Some(e) = p.get_mut(&seq) else {
            return; // failed or finished meanwhile
        };
        let x = &e.x;
        let fits = x.op == Op::Read
            && x.local.get(seg).is_some_and(|l| {
                off.checked_add(d.len() as u64)
                    .is_some_and(|end| end <= l.len)
            });
        if !fits {
            let why = format!("the target sent data outside descriptor {seg}");
            let e = p.remove(&seq).expect("present");
            self.done.borrow_mut().push((e.x, Err(why)));
            return;
        }
        let l = &x.local[seg];
        // SAFETY: the local segment lies in memory registered with this agent (checked at
        // prepare) and [off, off + len) lies inside it (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(d.as_ptr(), (l.addr + off) as *mut u8, d.len());
        }
        e.got += d.len() as u64;
        self.maybe_done(&mut p, seq);
    }

    fn on_ack(&self, seq: u64, r: Result<(), String>) {
        let mut p = self.pending.borrow_mut();
        if let Some(e) = p.get_mut(&seq) {
            e.ack = Some(r);
            self.maybe_done(&mut p, seq);
        }
    }

    fn maybe_done(&self, p: &mut HashMap<u64, Pending>, seq: u64) {
        let e = &p[&seq];
        let ready = match &e.ack {
            None => false,
            Some(Err(_)) => true,
            Some(Ok(())) => e.x.op == Op::Write || e.got >= e.x.total,
        };
        if ready {
            let e = p.remove(&seq).expect("present");
            self.done.borrow_mut().push((e.x, e.ack.expect("acked")));
        }
    }

    /// A WRITE chunk arrived from initiator `from`: checked, copied in, acked with the
    /// transfer's last chunk.
    fn on_write(&self, reply: sys::ucp_ep_h, from: u64, seq: u64, total: u64, addr: u64, d: &[u8]) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut w = self.writes.borrow_mut();
        let e = w.entry((from, seq)).or_insert_with(|| InWrite {
            seen: 0,
            err: None,
            since: Instant::now(),
        });
        if e.err.is_none() {
            let seg = Seg {
                addr,
                len: d.len() as u64,
            };
            match inner.check_incoming(&[seg]) {
                Ok(inc) if inc.staging.is_none() => {
                    // SAFETY: [addr, addr + len) lies in a live registered host region (just
                    // checked, its owner kept alive by `inc` during the copy).
                    unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), addr as *mut u8, d.len()) };
                }
                Ok(_) => {
                    e.err = Some(
                        "GPU memory is not reachable over UCX without an RDMA transport".into(),
                    )
                }
                Err(why) => e.err = Some(why),
            }
        }
        e.seen += 1;
        if e.seen >= total {
            let e = w.remove(&(from, seq)).expect("present");
            drop(w);
            ack(&self.lib, reply, seq, e.err.as_deref());
        }
    }

    /// A READ request arrived: its data is sent back in chunks, then the ack.
    fn on_read(&self, reply: sys::ucp_ep_h, seq: u64, segs: Vec<Seg>) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let keep = match inner.check_incoming(&segs) {
            Ok(inc) if inc.staging.is_none() => inc.keep,
            Ok(_) => {
                let why = "GPU memory is not reachable over UCX without an RDMA transport";
                return ack(&self.lib, reply, seq, Some(why));
            }
            Err(why) => return ack(&self.lib, reply, seq, Some(&why)),
        };
        for (i, s) in segs.iter().enumerate() {
            let mut off = 0;
            while off < s.len {
                let n = (s.len - off).min(CHUNK);
                let mut h = Vec::with_capacity(24);
                h.extend_from_slice(&seq.to_le_bytes());
                h.extend_from_slice(&(i as u64).to_le_bytes());
                h.extend_from_slice(&off.to_le_bytes());
                let mut m = Send::new(h);
                m.keep = keep.clone();
                let st = send(
                    &self.lib,
                    reply,
                    AM_DATA,
                    m,
                    (s.addr + off) as *const u8,
                    n as usize,
                );
                if st != sys::UCS_OK {
                    return; // the initiator is gone: nothing more to answer
                }
                off += n;
            }
        }
        ack(&self.lib, reply, seq, None);
    }
}

/// What one send keeps alive until UCX is done with it: its header, an owned body, and the
/// owners of the registered memory its data points into.
struct Send {
    hdr: Vec<u8>,
    body: Vec<u8>,
    keep: Vec<HostBuffer>,
    free: Option<unsafe extern "C" fn(*mut c_void)>,
}

impl Send {
    fn new(hdr: Vec<u8>) -> Send {
        Send {
            hdr,
            body: Vec::new(),
            keep: Vec::new(),
            free: None,
        }
    }
}

extern "C" fn send_done(req: *mut c_void, _status: sys::ucs_status_t, user: *mut c_void) {
    // SAFETY: user is the Box<Send> leaked when the send was posted; called once.
    let m = unsafe { Box::from_raw(user as *mut Send) };
    if let Some(free) = m.free {
        // SAFETY: the request UCX handed back at post; released once, here.
        unsafe { free(req) };
    }
}

/// Posts an eager active message (replies allowed); `UCS_OK` once posted or done.
fn send(
    lib: &sys::Ucp,
    ep: sys::ucp_ep_h,
    id: u32,
    mut m: Send,
    data: *const u8,
    len: usize,
) -> sys::ucs_status_t {
    let (Ok(am_send), Ok(free)) = (lib.ucp_am_send_nbx.as_ref(), lib.ucp_request_free.as_ref())
    else {
        return sys::UCS_ERR_UNSUPPORTED;
    };
    m.free = Some(*free);
    let m = Box::into_raw(Box::new(m));
    // SAFETY: the header (and body) live in the boxed Send until the callback frees it; `data`
    // points into registered memory kept alive by the caller or by `keep`.
    let sp = unsafe {
        let mut p: sys::ucp_request_param_t = std::mem::zeroed();
        p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK
            | sys::UCP_OP_ATTR_FIELD_USER_DATA
            | sys::UCP_OP_ATTR_FIELD_FLAGS;
        p.flags = sys::UCP_AM_SEND_FLAG_EAGER | sys::UCP_AM_SEND_FLAG_REPLY;
        p.cb.send = Some(send_done);
        p.user_data = m as *mut c_void;
        am_send(
            ep,
            id,
            (*m).hdr.as_ptr() as *const c_void,
            (*m).hdr.len(),
            data as *const c_void,
            len,
            &p,
        )
    };
    if sys::ptr_is_ptr(sp) {
        return sys::UCS_OK; // the callback releases the request and the Send
    }
    // SAFETY: the callback will not run: reclaim the box it would have taken.
    drop(unsafe { Box::from_raw(m) });
    sys::ptr_status(sp)
}

fn check(lib: &sys::Ucp, what: &str, s: sys::ucs_status_t) -> Result<(), String> {
    if s == sys::UCS_OK {
        Ok(())
    } else {
        Err(format!("UCX {what}: {}", super::status_str(lib, s)))
    }
}

/// Answers post `seq` of the initiator at `ep`: done, or refused with `err`.
fn ack(lib: &sys::Ucp, ep: sys::ucp_ep_h, seq: u64, err: Option<&str>) {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&seq.to_le_bytes());
    h.extend_from_slice(&u64::from(err.is_some()).to_le_bytes());
    let mut m = Send::new(h);
    m.body = err.unwrap_or_default().as_bytes().to_vec();
    let (p, n) = (m.body.as_ptr(), m.body.len());
    // A failed ack (the initiator died) is dropped: its transfer is failed on its side.
    let _ = send(lib, ep, AM_ACK, m, p, n);
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    b.get(i * 8..i * 8 + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

/// The header and data of an incoming message, `None` for a rendezvous one (never sent by
/// kvtransfer: every send is eager).
///
/// # Safety
/// The arguments are those UCX passed to a receive handler, used during the call only.
unsafe fn incoming<'a>(
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> Option<(&'a [u8], &'a [u8], sys::ucp_ep_h)> {
    // SAFETY: as the caller promises, UCX's arguments, valid during the handler's call.
    unsafe {
        let p = &*param;
        if p.recv_attr & (sys::UCP_AM_RECV_ATTR_FLAG_RNDV as u64) != 0 {
            return None;
        }
        let h = if header_length == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(header as *const u8, header_length)
        };
        let d = if length == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(data as *const u8, length)
        };
        Some((h, d, p.reply_ep))
    }
}

macro_rules! handler {
    ($name:ident, |$st:ident, $h:ident, $d:ident, $reply:ident| $body:block) => {
        extern "C" fn $name(
            arg: *mut c_void,
            header: *const c_void,
            header_length: usize,
            data: *mut c_void,
            length: usize,
            param: *const sys::ucp_am_recv_param_t,
        ) -> sys::ucs_status_t {
            // SAFETY: arg is the worker's AmState, alive while its handlers are set; the
            // buffers are valid during the call.
            let $st = unsafe { &*(arg as *const AmState) };
            if let Some(($h, $d, $reply)) =
                // SAFETY: UCX's own arguments to this handler, used during the call only.
                unsafe { incoming(header, header_length, data, length, param) }
            {
                $body
            }
            sys::UCS_OK
        }
    };
}

handler!(recv_notif, |st, h, d, _reply| {
    if let Some(i) = st.inner.upgrade() {
        i.push_notif(Notif {
            from: String::from_utf8_lossy(h).into_owned(),
            msg: d.to_vec(),
        });
    }
});

handler!(recv_write, |st, h, d, reply| {
    if let (Some(from), Some(seq), Some(total), Some(addr), false) = (
        u64_at(h, 0),
        u64_at(h, 1),
        u64_at(h, 2),
        u64_at(h, 3),
        reply.is_null(),
    ) {
        st.on_write(reply, from, seq, total, addr, d);
    }
});

handler!(recv_read, |st, h, d, reply| {
    if let (Some(_from), Some(seq), Some(n), false) =
        (u64_at(h, 0), u64_at(h, 1), u64_at(h, 2), reply.is_null())
    {
        let n = n as usize;
        if n <= MAX_READ_DESCS && d.len() == n * 16 {
            let segs = (0..n)
                .map(|i| Seg {
                    addr: u64_at(d, 2 * i).expect("in bounds"),
                    len: u64_at(d, 2 * i + 1).expect("in bounds"),
                })
                .collect();
            st.on_read(reply, seq, segs);
        } else {
            ack(&st.lib, reply, seq, Some("malformed READ request"));
        }
    }
});

handler!(recv_data, |st, h, d, _reply| {
    if let (Some(seq), Some(seg), Some(off)) = (u64_at(h, 0), u64_at(h, 1), u64_at(h, 2)) {
        st.on_data(seq, seg as usize, off, d);
    }
});

handler!(recv_ack, |st, h, d, _reply| {
    if let (Some(seq), Some(err)) = (u64_at(h, 0), u64_at(h, 1)) {
        let r = if err == 0 {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(d).into_owned())
        };
        st.on_ack(seq, r);
    }
});

/// Sets this path's receive handlers (and the notification handler) on `worker`.
///
/// # Safety
/// `worker` is a live worker; `st` outlives it (or the handlers).
pub(super) unsafe fn set_handlers(
    lib: &sys::Ucp,
    worker: sys::ucp_worker_h,
    st: *const AmState,
) -> Result<(), String> {
    let set = lib
        .ucp_worker_set_am_recv_handler
        .as_ref()
        .map_err(|e| format!("libucp lacks ucp_worker_set_am_recv_handler: {e}"))?;
    type Cb = extern "C" fn(
        *mut c_void,
        *const c_void,
        usize,
        *mut c_void,
        usize,
        *const sys::ucp_am_recv_param_t,
    ) -> sys::ucs_status_t;
    let handlers: [(u32, Cb); 5] = [
        (AM_NOTIF, recv_notif),
        (AM_WRITE, recv_write),
        (AM_READ, recv_read),
        (AM_DATA, recv_data),
        (AM_ACK, recv_ack),
    ];
    for (id, cb) in handlers {
        // SAFETY: a zeroed parameter struct with the fields set below selected; `worker` is
        // live and `st` outlives it (the caller's promise).
        let mut hp: sys::ucp_am_handler_param_t = unsafe { std::mem::zeroed() };
        hp.field_mask = (sys::UCP_AM_HANDLER_PARAM_FIELD_ID
            | sys::UCP_AM_HANDLER_PARAM_FIELD_CB
            | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG) as u64;
        hp.id = id;
        hp.cb = Some(cb);
        hp.arg = st as *mut c_void;
        // SAFETY: see above.
        let s = unsafe { set(worker, &hp) };
        if s != sys::UCS_OK {
            return Err(format!(
                "ucp_worker_set_am_recv_handler: {}",
                super::status_str(lib, s)
            ));
        }
    }
    Ok(())
}
