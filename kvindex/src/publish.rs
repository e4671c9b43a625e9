//! Publishing KV events exactly as vLLM's `ZmqEventPublisher` does.
//!
//! kvmesh components that own KV blocks (the tiered store, the demo's simulated engines) announce
//! them with this publisher, so kvindex and any other consumer of vLLM's event stream (llm-d's
//! scheduler, Dynamo's router) see them: a PUB socket sending `[topic, seq (8 bytes big-endian),
//! msgpack batch]` with `seq` counting from 0, and an optional ROUTER answering replay requests
//! `[identity, "", start_seq]` with every buffered batch from `start_seq` on, then the end marker
//! `[identity, "", "", ff×8, ""]`.
//!
//! A background thread owns both sockets (ZMQ sockets are not thread-safe); [`EventPublisher`]
//! hands it batches over an in-process socket and may be shared between threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::codec::encode_batch;
use crate::event::EventBatch;
use crate::{IndexError, Result};

/// Settings of a publisher.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// Where the PUB socket binds, e.g. `tcp://127.0.0.1:5557` (`tcp://127.0.0.1:0` picks a port).
    pub endpoint: String,
    /// Where the replay ROUTER binds, if replay is offered.
    pub replay_endpoint: Option<String>,
    /// Topic frame of every message.
    pub topic: String,
    /// Batches kept for replay. Default (vLLM's) 10000.
    pub buffer_steps: usize,
}

impl PublisherConfig {
    /// A publisher on `endpoint` with vLLM's defaults otherwise.
    pub fn new(endpoint: impl Into<String>) -> Self {
        PublisherConfig {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: 10_000,
        }
    }
}

/// A running publisher. Dropping it stops the thread and closes the sockets.
pub struct EventPublisher {
    feed: Mutex<(zmq::Socket, Vec<u8>)>,
    seq: AtomicU64,
    endpoint: String,
    replay_endpoint: Option<String>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn zmq_err(e: zmq::Error) -> IndexError {
    IndexError::Zmq(e.to_string())
}

static FEED_ID: AtomicU64 = AtomicU64::new(0);

impl EventPublisher {
    /// Binds the sockets and starts the publishing thread.
    pub fn start(ctx: &zmq::Context, cfg: PublisherConfig) -> Result<Self> {
        let pub_sock = ctx.socket(zmq::PUB).map_err(zmq_err)?;
        pub_sock.set_linger(0).map_err(zmq_err)?;
        pub_sock.set_sndhwm(100_000).map_err(zmq_err)?;
        pub_sock.bind(&cfg.endpoint).map_err(zmq_err)?;
        let endpoint = last_endpoint(&pub_sock)?;
        let router = match &cfg.replay_endpoint {
            Some(r) => {
                let s = ctx.socket(zmq::ROUTER).map_err(zmq_err)?;
                s.set_linger(0).map_err(zmq_err)?;
                // A replay may be the whole buffer: never drop part of it at the high-water mark.
                s.set_sndhwm(0).map_err(zmq_err)?;
                s.bind(r).map_err(zmq_err)?;
                Some(s)
            }
            None => None,
        };
        let replay_endpoint = match &router {
            Some(r) => Some(last_endpoint(r)?),
            None => None,
        };
        let inproc = format!(
            "inproc://kvmesh-publisher-{}",
            FEED_ID.fetch_add(1, Ordering::Relaxed)
        );
        let pull = ctx.socket(zmq::PULL).map_err(zmq_err)?;
        pull.set_rcvhwm(0).map_err(zmq_err)?;
        pull.bind(&inproc).map_err(zmq_err)?;
        let push = ctx.socket(zmq::PUSH).map_err(zmq_err)?;
        push.set_sndhwm(0).map_err(zmq_err)?;
        push.connect(&inproc).map_err(zmq_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let topic = cfg.topic.clone().into_bytes();
            let cap = cfg.buffer_steps.max(1);
            std::thread::Builder::new()
                .name("kvmesh-publisher".into())
                .spawn(move || run(pub_sock, router, pull, topic, cap, stop))
                .map_err(|e| IndexError::Zmq(format!("spawn: {e}")))?
        };
        Ok(EventPublisher {
            feed: Mutex::new((push, Vec::new())),
            seq: AtomicU64::new(0),
            endpoint,
            replay_endpoint,
            stop,
            thread: Some(thread),
        })
    }

    /// The PUB socket's resolved endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay ROUTER's resolved endpoint.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// Publishes one batch; returns its sequence number.
    pub fn publish(&self, batch: &EventBatch) -> Result<u64> {
        self.send(batch, true)
    }

    /// Puts a batch in the replay buffer *without* sending it, as if the network had lost it.
    /// For fault-injection tests of consumers.
    #[doc(hidden)]
    pub fn publish_lost(&self, batch: &EventBatch) -> Result<u64> {
        self.send(batch, false)
    }

    fn send(&self, batch: &EventBatch, live: bool) -> Result<u64> {
        let mut feed = self.feed.lock();
        let (sock, buf) = &mut *feed;
        buf.clear();
        encode_batch(batch, buf);
        // The sequence is taken under the lock so the buffer and the wire see one order.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let flag: &[u8] = if live { b"1" } else { b"0" };
        sock.send_multipart([&seq.to_be_bytes()[..], flag, &buf[..]], 0)
            .map_err(zmq_err)?;
        Ok(seq)
    }
}

impl Drop for EventPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn last_endpoint(s: &zmq::Socket) -> Result<String> {
    s.get_last_endpoint()
        .map_err(zmq_err)?
        .map_err(|_| IndexError::Zmq("endpoint is not utf-8".into()))
}

fn run(
    pub_sock: zmq::Socket,
    router: Option<zmq::Socket>,
    pull: zmq::Socket,
    topic: Vec<u8>,
    cap: usize,
    stop: Arc<AtomicBool>,
) {
    let mut buffer: VecDeque<(u64, Vec<u8>)> = VecDeque::with_capacity(cap.min(1 << 16));
    while !stop.load(Ordering::Relaxed) {
        let mut items = vec![pull.as_poll_item(zmq::POLLIN)];
        if let Some(r) = &router {
            items.push(r.as_poll_item(zmq::POLLIN));
        }
        if zmq::poll(&mut items, 50).is_err() {
            continue;
        }
        let feed_ready = items[0].is_readable();
        let replay_ready = items.get(1).is_some_and(|i| i.is_readable());
        drop(items);
        if feed_ready {
            while let Ok(frames) = pull.recv_multipart(zmq::DONTWAIT) {
                if frames.len() != 3 || frames[0].len() != 8 {
                    continue;
                }
                let seq = frames[0].iter().fold(0u64, |a, &b| (a << 8) | u64::from(b));
                if frames[1] == b"1" {
                    let _ =
                        pub_sock.send_multipart([&topic[..], &frames[0][..], &frames[2][..]], 0);
                }
                if buffer.len() == cap {
                    buffer.pop_front();
                }
                buffer.push_back((seq, frames.into_iter().nth(2).unwrap_or_default()));
            }
        }
        if replay_ready {
            if let Some(r) = &router {
                while let Ok(frames) = r.recv_multipart(zmq::DONTWAIT) {
                    // [identity, "", start_seq]; anything else is ignored, as vLLM does.
                    if frames.len() != 3
                        || !frames[1].is_empty()
                        || frames[2].is_empty()
                        || frames[2].len() > 8
                    {
                        continue;
                    }
                    let start = frames[2].iter().fold(0u64, |a, &b| (a << 8) | u64::from(b));
                    let id = &frames[0];
                    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
                        let _ = r.send_multipart(
                            [
                                &id[..],
                                b"",
                                &topic[..],
                                &seq.to_be_bytes()[..],
                                &payload[..],
                            ],
                            0,
                        );
                    }
                    let _ =
                        r.send_multipart([&id[..], b"", b"", &u64::MAX.to_be_bytes()[..], b""], 0);
                }
            }
        }
    }
}
