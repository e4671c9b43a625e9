//! The msgpack wire form of vLLM KV-event batches: the third frame of a `ZmqEventPublisher`
//! message (see `shared/docs/vllm-interfaces.md`, section 1).
//!
//! A batch is a positional msgpack array `[ts, [event...], data_parallel_rank]`. Since vLLM PR
//! #42892 every event is a tagged map (`{"type": "BlockStored", "block_hashes": [...], ...}`);
//! older publishers sent positional arrays (`["BlockStored", block_hashes, parent, ...]`).
//! [`decode_batch`] accepts both, in any mix, and everything vLLM may legitimately vary:
//!
//! * the batch array may have 2 elements (no rank) or more than 3 (extras are ignored);
//! * `ts` may be any msgpack float or integer;
//! * map keys may come in any order, including `"type"` after the fields; unknown keys are
//!   skipped whatever their value; optional keys may be absent or nil;
//! * positional events may stop after their required fields (older vLLM versions had fewer
//!   trailing fields) or carry more fields than this crate knows (they are skipped);
//! * integers may use any msgpack width; block hashes may be integers or `bin` digests (reduced
//!   with [`EngineHash::from_digest`]); negative integer hashes are taken as their two's
//!   complement bits;
//! * events of a type this crate does not know are skipped, so a batch that mixes them with
//!   known events still applies.
//!
//! The decoder is a zero-copy cursor over the input (map keys and tags are compared as bytes;
//! only string values the event types own are copied). It never panics, and its memory use is
//! linear in the input size whatever the input claims: every declared container length is
//! checked against the bytes that remain before anything is reserved. Values that are skipped
//! may nest at most [`MAX_SKIP_DEPTH`] containers deep (they are skipped iteratively, without
//! recursion). Every failure is an [`IndexError::Decode`] carrying the byte offset where decoding
//! stopped.
//!
//! [`encode_batch`] writes exactly what vLLM 0.32 (msgspec) writes: tagged maps with `"type"`
//! first and the fields in declaration order, optional fields omitted when `None`, integers in
//! their smallest encoding, `ts` as float64 and hashes as unsigned integers. The golden payloads
//! of the interface document are reproduced byte for byte. [`encode_batch_with`] can also write
//! the legacy positional form, for tests of consumers that still have to accept it.

use crate::error::IndexError;
use crate::event::{BlockRemoved, BlockStored, EngineHash, EventBatch, ExtraKey, KvEvent, Medium};

/// The deepest nesting of containers accepted inside a value that the decoder skips (an unknown
/// map key's value, an extra field of a positional event, an unrecognised extra key).
pub const MAX_SKIP_DEPTH: usize = 64;

type Result<T> = std::result::Result<T, IndexError>;

const EOF: &str = "unexpected end of input";

/// No event the decoder keeps is shorter than this many bytes; used only to bound the up-front
/// reservation of the event vector (it grows past that if it must).
const MIN_EVENT_BYTES: usize = 8;

#[cold]
#[inline(never)]
fn err(offset: usize, reason: &'static str) -> IndexError {
    IndexError::Decode { offset, reason }
}

fn utf8(bytes: &[u8], at: usize) -> Result<&str> {
    std::str::from_utf8(bytes).map_err(|_| err(at, "invalid utf-8 in string"))
}

/// `N` bytes of `buf` at `pos`, if there are that many.
#[inline(always)]
fn be<const N: usize>(buf: &[u8], pos: usize) -> Option<[u8; N]> {
    buf.get(pos..pos.checked_add(N)?)?.try_into().ok()
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// Decodes one KV-event batch payload (the msgpack frame, without topic and sequence number).
///
/// The whole buffer must be exactly one batch: trailing bytes are an error. Events of an unknown
/// type are dropped from the result (see the module documentation for everything accepted).
pub fn decode_batch(buf: &[u8]) -> Result<EventBatch> {
    let mut out = EventBatch::default();
    let mut init = 0;
    let res = decode_into(buf, &mut out, &mut init);
    drop_hidden(&mut out.events, init);
    res.map(|()| out)
}

/// Decodes batch after batch into the same memory, as an ingestion loop does: each event is
/// decoded over an event of an earlier batch, in place, keeping its hash and token buffers, so a
/// steady stream of batches decodes without allocating or moving events (vLLM sends one
/// `BlockRemoved` per evicted block, thousands a second). Decodes exactly what
/// [`decode_batch`] decodes.
#[derive(Default)]
pub struct BatchDecoder {
    batch: EventBatch,
    /// Events initialised in the event vector's memory, up to its length and past it: those
    /// past it are earlier batches' events, kept (out of sight) for their buffers.
    init: usize,
}

impl Drop for BatchDecoder {
    fn drop(&mut self) {
        drop_hidden(&mut self.batch.events, self.init);
    }
}

/// Drops the events initialised past the length of `events` (`init` in all; see
/// `Reader::events`).
fn drop_hidden(events: &mut Vec<KvEvent>, init: usize) {
    let len = events.len();
    #[allow(unsafe_code)]
    // SAFETY: the first `init` events of the vector's memory are initialised (see
    // `Reader::events`); exposed, the vector owns them again and truncating drops those past
    // `len`.
    unsafe {
        events.set_len(init)
    };
    events.truncate(len);
}

impl BatchDecoder {
    /// A decoder holding no memory yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one batch; it stays valid until the next call. On error the decoder stays
    /// usable (the partial batch is dropped).
    pub fn decode(&mut self, buf: &[u8]) -> Result<&EventBatch> {
        decode_into(buf, &mut self.batch, &mut self.init)?;
        Ok(&self.batch)
    }
}

/// Decodes `buf` into `out`, over the `init` events initialised in its event vector's memory
/// (see [`BatchDecoder`]).
fn decode_into(buf: &[u8], out: &mut EventBatch, init: &mut usize) -> Result<()> {
    let mut r = Reader { buf, pos: 0 };
    let n = r.array_len()?;
    if n < 2 {
        return Err(err(0, "batch array has fewer than 2 elements"));
    }
    out.ts = r.f64()?;
    r.events(&mut out.events, init)?;
    out.data_parallel_rank = if n >= 3 { r.opt_i64()? } else { None };
    for _ in 3..n {
        r.skip_value()?;
    }
    if r.pos != buf.len() {
        return Err(err(r.pos, "trailing bytes after batch"));
    }
    Ok(())
}

/// `slot` made a `BlockStored` with every field empty, keeping its hash and token buffers.
fn as_stored(slot: &mut KvEvent) -> &mut BlockStored {
    if !matches!(slot, KvEvent::BlockStored(_)) {
        let block_hashes = match slot {
            KvEvent::BlockRemoved(r) => std::mem::take(&mut r.block_hashes),
            _ => Vec::new(),
        };
        *slot = KvEvent::BlockStored(BlockStored {
            block_hashes,
            ..BlockStored::default()
        });
    }
    let KvEvent::BlockStored(s) = slot else {
        unreachable!("made a BlockStored above")
    };
    // Every field, named, so that a new field cannot be forgotten here.
    let BlockStored {
        block_hashes,
        parent_block_hash,
        token_ids,
        block_size,
        lora_id,
        medium,
        lora_name,
        extra_keys,
        group_idx,
        kv_cache_spec_kind,
        kv_cache_spec_sliding_window,
        locality,
        ownership,
        session_id,
    } = s;
    block_hashes.clear();
    *parent_block_hash = None;
    token_ids.clear();
    *block_size = 0;
    *lora_id = None;
    *medium = None;
    *lora_name = None;
    *extra_keys = None;
    *group_idx = None;
    *kv_cache_spec_kind = None;
    *kv_cache_spec_sliding_window = None;
    *locality = None;
    *ownership = None;
    *session_id = None;
    s
}

/// `slot` made a `BlockRemoved` with every field empty, keeping its hash buffer.
fn as_removed(slot: &mut KvEvent) -> &mut BlockRemoved {
    if !matches!(slot, KvEvent::BlockRemoved(_)) {
        let block_hashes = match slot {
            KvEvent::BlockStored(s) => std::mem::take(&mut s.block_hashes),
            _ => Vec::new(),
        };
        *slot = KvEvent::BlockRemoved(BlockRemoved {
            block_hashes,
            ..BlockRemoved::default()
        });
    }
    let KvEvent::BlockRemoved(r) = slot else {
        unreachable!("made a BlockRemoved above")
    };
    let BlockRemoved {
        block_hashes,
        medium,
        group_idx,
        locality,
        ownership,
    } = r;
    block_hashes.clear();
    *medium = None;
    *group_idx = None;
    *locality = None;
    *ownership = None;
    r
}

/// The hash buffer of an event, if it has one.
fn hash_buffer(ev: &KvEvent) -> Option<&Vec<EngineHash>> {
    match ev {
        KvEvent::BlockStored(s) => Some(&s.block_hashes),
        KvEvent::BlockRemoved(r) => Some(&r.block_hashes),
        KvEvent::AllBlocksCleared => None,
    }
}

/// The type tag of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Stored,
    Removed,
    Cleared,
    Unknown,
}

impl Tag {
    fn from_name(name: &[u8]) -> Tag {
        match name {
            b"BlockStored" => Tag::Stored,
            b"BlockRemoved" => Tag::Removed,
            b"AllBlocksCleared" => Tag::Cleared,
            _ => Tag::Unknown,
        }
    }
}

/// A field of `BlockStored` (the fields of `BlockRemoved` are a subset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    BlockHashes,
    ParentBlockHash,
    TokenIds,
    BlockSize,
    LoraId,
    Medium,
    LoraName,
    ExtraKeys,
    GroupIdx,
    SpecKind,
    SlidingWindow,
    Locality,
    Ownership,
    SessionId,
}

/// `BlockStored`'s fields in declaration order (the positional form's element order after the tag).
const STORED_ORDER: [Field; 14] = [
    Field::BlockHashes,
    Field::ParentBlockHash,
    Field::TokenIds,
    Field::BlockSize,
    Field::LoraId,
    Field::Medium,
    Field::LoraName,
    Field::ExtraKeys,
    Field::GroupIdx,
    Field::SpecKind,
    Field::SlidingWindow,
    Field::Locality,
    Field::Ownership,
    Field::SessionId,
];

/// `BlockRemoved`'s fields in declaration order.
const REMOVED_ORDER: [Field; 5] = [
    Field::BlockHashes,
    Field::Medium,
    Field::GroupIdx,
    Field::Locality,
    Field::Ownership,
];

impl Field {
    fn from_key(key: &[u8]) -> Option<Field> {
        Some(match key {
            b"block_hashes" => Field::BlockHashes,
            b"parent_block_hash" => Field::ParentBlockHash,
            b"token_ids" => Field::TokenIds,
            b"block_size" => Field::BlockSize,
            b"lora_id" => Field::LoraId,
            b"medium" => Field::Medium,
            b"lora_name" => Field::LoraName,
            b"extra_keys" => Field::ExtraKeys,
            b"group_idx" => Field::GroupIdx,
            b"kv_cache_spec_kind" => Field::SpecKind,
            b"kv_cache_spec_sliding_window" => Field::SlidingWindow,
            b"locality" => Field::Locality,
            b"ownership" => Field::Ownership,
            b"session_id" => Field::SessionId,
            _ => return None,
        })
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }

    /// Whether an event of type `tag` has this field (`None`: type not known yet).
    fn belongs_to(self, tag: Option<Tag>) -> bool {
        match tag {
            None | Some(Tag::Stored) => true,
            Some(Tag::Removed) => REMOVED_ORDER.contains(&self),
            Some(Tag::Cleared | Tag::Unknown) => false,
        }
    }
}

/// A zero-copy cursor over a msgpack buffer. Invariant: `pos <= buf.len()`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    #[inline(always)]
    fn peek(&self) -> Result<u8> {
        match self.buf.get(self.pos) {
            Some(&b) => Ok(b),
            None => Err(err(self.pos, EOF)),
        }
    }

    #[inline(always)]
    fn byte(&mut self) -> Result<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    #[inline(always)]
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        match be::<N>(self.buf, self.pos) {
            Some(a) => {
                self.pos += N;
                Ok(a)
            }
            None => Err(err(self.pos, EOF)),
        }
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or_else(|| err(self.pos, EOF))?;
        self.pos += n;
        Ok(s)
    }

    /// The bytes from `start` to the cursor.
    fn since(&self, start: usize) -> &'a [u8] {
        self.buf.get(start..self.pos).unwrap_or_default()
    }

    /// A 16- or 32-bit big-endian length.
    #[inline(always)]
    fn len16(&mut self) -> Result<usize> {
        Ok(usize::from(u16::from_be_bytes(self.fixed()?)))
    }

    #[inline(always)]
    fn len32(&mut self) -> Result<usize> {
        // Saturates on 16-bit targets; the remaining-bytes checks then reject it.
        Ok(usize::try_from(u32::from_be_bytes(self.fixed()?)).unwrap_or(usize::MAX))
    }

    #[inline(always)]
    fn eat_nil(&mut self) -> bool {
        if self.buf.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// An array header, or `None` (cursor unchanged) if the next value is not an array. The
    /// length is checked against the remaining input (every element takes at least one byte).
    #[inline(always)]
    fn try_array_len(&mut self) -> Result<Option<usize>> {
        let at = self.pos;
        let m = self.peek()?;
        let n = match m {
            0x90..=0x9f => {
                self.pos += 1;
                usize::from(m & 0x0f)
            }
            0xdc => {
                self.pos += 1;
                self.len16()?
            }
            0xdd => {
                self.pos += 1;
                self.len32()?
            }
            _ => return Ok(None),
        };
        if n > self.remaining() {
            return Err(err(at, "array length exceeds input"));
        }
        Ok(Some(n))
    }

    #[inline]
    fn array_len(&mut self) -> Result<usize> {
        let at = self.pos;
        self.try_array_len()?
            .ok_or_else(|| err(at, "expected array"))
    }

    /// A map header (number of key/value pairs), checked against the remaining input.
    fn map_len(&mut self) -> Result<usize> {
        let at = self.pos;
        let m = self.byte()?;
        let n = match m {
            0x80..=0x8f => usize::from(m & 0x0f),
            0xde => self.len16()?,
            0xdf => self.len32()?,
            _ => return Err(err(at, "expected map")),
        };
        if n > self.remaining() / 2 {
            return Err(err(at, "map length exceeds input"));
        }
        Ok(n)
    }

    /// The raw bytes of a string, or `None` (cursor unchanged) if the next value is not one.
    #[inline(always)]
    fn try_str_bytes(&mut self) -> Result<Option<&'a [u8]>> {
        let m = self.peek()?;
        let n = match m {
            0xa0..=0xbf => {
                self.pos += 1;
                usize::from(m & 0x1f)
            }
            0xd9 => {
                self.pos += 1;
                usize::from(self.byte()?)
            }
            0xda => {
                self.pos += 1;
                self.len16()?
            }
            0xdb => {
                self.pos += 1;
                self.len32()?
            }
            _ => return Ok(None),
        };
        self.take(n).map(Some)
    }

    fn str(&mut self) -> Result<&'a str> {
        let at = self.pos;
        match self.try_str_bytes()? {
            Some(b) => utf8(b, at),
            None => Err(err(at, "expected string")),
        }
    }

    fn opt_str(&mut self) -> Result<Option<&'a str>> {
        if self.eat_nil() {
            Ok(None)
        } else {
            self.str().map(Some)
        }
    }

    fn opt_string(&mut self) -> Result<Option<String>> {
        Ok(self.opt_str()?.map(str::to_owned))
    }

    /// The payload of a `bin`, or `None` (cursor unchanged) if the next value is not one.
    #[inline(always)]
    fn try_bin(&mut self) -> Result<Option<&'a [u8]>> {
        let n = match self.peek()? {
            0xc4 => {
                self.pos += 1;
                usize::from(self.byte()?)
            }
            0xc5 => {
                self.pos += 1;
                self.len16()?
            }
            0xc6 => {
                self.pos += 1;
                self.len32()?
            }
            _ => return Ok(None),
        };
        self.take(n).map(Some)
    }

    /// Any msgpack integer, or `None` (cursor unchanged) if the next value is not one.
    #[inline(always)]
    fn try_int(&mut self) -> Result<Option<i128>> {
        let m = self.peek()?;
        if m < 0x80 {
            self.pos += 1;
            return Ok(Some(i128::from(m)));
        }
        if m >= 0xe0 {
            self.pos += 1;
            return Ok(Some(i128::from(i8::from_be_bytes([m]))));
        }
        if !(0xcc..=0xd3).contains(&m) {
            return Ok(None);
        }
        self.pos += 1;
        let v = match m {
            0xcc => i128::from(self.byte()?),
            0xcd => i128::from(u16::from_be_bytes(self.fixed()?)),
            0xce => i128::from(u32::from_be_bytes(self.fixed()?)),
            0xcf => i128::from(u64::from_be_bytes(self.fixed()?)),
            0xd0 => i128::from(i8::from_be_bytes(self.fixed()?)),
            0xd1 => i128::from(i16::from_be_bytes(self.fixed()?)),
            0xd2 => i128::from(i32::from_be_bytes(self.fixed()?)),
            _ => i128::from(i64::from_be_bytes(self.fixed()?)),
        };
        Ok(Some(v))
    }

    fn int(&mut self) -> Result<i128> {
        let at = self.pos;
        self.try_int()?.ok_or_else(|| err(at, "expected integer"))
    }

    fn i64(&mut self) -> Result<i64> {
        let at = self.pos;
        i64::try_from(self.int()?).map_err(|_| err(at, "integer out of range"))
    }

    fn opt_i64(&mut self) -> Result<Option<i64>> {
        if self.eat_nil() {
            Ok(None)
        } else {
            self.i64().map(Some)
        }
    }

    fn u32(&mut self) -> Result<u32> {
        let at = self.pos;
        u32::try_from(self.int()?).map_err(|_| err(at, "integer out of range"))
    }

    /// A float of either width, or an integer.
    fn f64(&mut self) -> Result<f64> {
        let at = self.pos;
        match self.peek()? {
            0xcb => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.fixed()?))
            }
            0xca => {
                self.pos += 1;
                Ok(f64::from(f32::from_be_bytes(self.fixed()?)))
            }
            _ => match self.try_int()? {
                // Rounds to nearest like Python's float(int); exact for any realistic timestamp.
                Some(v) => Ok(v as f64),
                None => Err(err(at, "expected float or integer")),
            },
        }
    }

    /// A block hash: an integer (its low 64 bits) or a `bin` digest.
    #[inline]
    fn hash(&mut self) -> Result<EngineHash> {
        let at = self.pos;
        let m = self.peek()?;
        if m == 0xcf {
            self.pos += 1;
            return Ok(EngineHash(u64::from_be_bytes(self.fixed()?)));
        }
        if let Some(v) = self.try_int()? {
            // Every msgpack integer lies in [i64::MIN, u64::MAX]; negative ones keep their
            // two's complement bits.
            return Ok(EngineHash(v as u64));
        }
        match self.try_bin()? {
            Some(digest) => Ok(EngineHash::from_digest(digest)),
            None => Err(err(at, "expected block hash (integer or bin)")),
        }
    }

    fn opt_hash(&mut self) -> Result<Option<EngineHash>> {
        if self.eat_nil() {
            Ok(None)
        } else {
            self.hash().map(Some)
        }
    }

    fn hashes(&mut self, out: &mut Vec<EngineHash>) -> Result<()> {
        let n = self.array_len()?;
        out.clear();
        out.reserve_exact(n);
        for _ in 0..n {
            out.push(self.hash()?);
        }
        Ok(())
    }

    /// An array of token ids, each an integer in `0..=u32::MAX`.
    ///
    /// The hot loop of the decoder: the widths msgspec uses for token ids (fixint, `cc`, `cd`,
    /// `ce`) are matched as slice patterns, which compile to one length check and direct loads;
    /// the output is sized once and filled in place.
    fn token_ids(&mut self, out: &mut Vec<u32>) -> Result<()> {
        let n = self.array_len()?;
        out.clear();
        out.resize(n, 0);
        let buf = self.buf;
        let mut rest = buf.get(self.pos..).unwrap_or_default();
        for slot in out.iter_mut() {
            let (v, tail) = match rest {
                [m @ 0x00..=0x7f, tail @ ..] => (u32::from(*m), tail),
                [0xcd, a, b, tail @ ..] => (u32::from(u16::from_be_bytes([*a, *b])), tail),
                [0xce, a, b, c, d, tail @ ..] => (u32::from_be_bytes([*a, *b, *c, *d]), tail),
                [0xcc, a, tail @ ..] => (u32::from(*a), tail),
                _ => {
                    // Other widths, negative or out-of-range values, wrong types, truncation.
                    self.pos = buf.len() - rest.len();
                    let at = self.pos;
                    let v = self.int()?;
                    let v = u32::try_from(v).map_err(|_| err(at, "token id out of range"))?;
                    (v, buf.get(self.pos..).unwrap_or_default())
                }
            };
            *slot = v;
            rest = tail;
        }
        self.pos = buf.len() - rest.len();
        Ok(())
    }

    /// `extra_keys`: nil, or one entry per block, each nil or an array of keys.
    fn extra_keys(&mut self) -> Result<Option<Vec<Option<Vec<ExtraKey>>>>> {
        if self.eat_nil() {
            return Ok(None);
        }
        let n = self.array_len()?;
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            if self.eat_nil() {
                blocks.push(None);
                continue;
            }
            let m = self.array_len()?;
            let mut keys = Vec::with_capacity(m);
            for _ in 0..m {
                keys.push(self.extra_key()?);
            }
            blocks.push(Some(keys));
        }
        Ok(Some(blocks))
    }

    fn extra_key(&mut self) -> Result<ExtraKey> {
        let start = self.pos;
        if let Some(s) = self.try_str_bytes()? {
            return Ok(ExtraKey::Str(utf8(s, start)?.to_owned()));
        }
        if let Some(b) = self.try_bin()? {
            return Ok(ExtraKey::Bytes(b.to_vec()));
        }
        if let Some(v) = self.try_int()? {
            return Ok(match i64::try_from(v) {
                Ok(i) => ExtraKey::Int(i),
                Err(_) => ExtraKey::Other(self.since(start).to_vec()),
            });
        }
        if let Some(mm) = self.try_mm_key()? {
            return Ok(mm);
        }
        self.skip_value()?;
        Ok(ExtraKey::Other(self.since(start).to_vec()))
    }

    /// `[identifier: str, offset: int]`, or `None` (cursor unchanged) for anything else.
    fn try_mm_key(&mut self) -> Result<Option<ExtraKey>> {
        let start = self.pos;
        if self.try_array_len()? == Some(2) {
            let id_at = self.pos;
            if let Some(id) = self.try_str_bytes()? {
                if let Some(offset) = self.try_int()?.and_then(|v| i64::try_from(v).ok()) {
                    return Ok(Some(ExtraKey::Mm {
                        identifier: utf8(id, id_at)?.to_owned(),
                        offset,
                    }));
                }
            }
        }
        self.pos = start;
        Ok(None)
    }

    /// Skips one value of any type, iteratively, allowing at most [`MAX_SKIP_DEPTH`] open
    /// containers.
    fn skip_value(&mut self) -> Result<()> {
        // Values still to skip in each open container (maps count keys and values).
        let mut pending = [0usize; MAX_SKIP_DEPTH];
        let mut depth = 0;
        loop {
            let at = self.pos;
            let m = self.byte()?;
            let children = match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
                0x80..=0x8f => 2 * usize::from(m & 0x0f),
                0x90..=0x9f => usize::from(m & 0x0f),
                0xa0..=0xbf => {
                    self.take(usize::from(m & 0x1f))?;
                    0
                }
                0xc4 | 0xd9 => {
                    let n = usize::from(self.byte()?);
                    self.take(n)?;
                    0
                }
                0xc5 | 0xda => {
                    let n = self.len16()?;
                    self.take(n)?;
                    0
                }
                0xc6 | 0xdb => {
                    let n = self.len32()?;
                    self.take(n)?;
                    0
                }
                // ext 8/16/32: length, then a type byte and the data.
                0xc7 => {
                    let n = usize::from(self.byte()?);
                    self.take(n.saturating_add(1))?;
                    0
                }
                0xc8 => {
                    let n = self.len16()?;
                    self.take(n.saturating_add(1))?;
                    0
                }
                0xc9 => {
                    let n = self.len32()?;
                    self.take(n.saturating_add(1))?;
                    0
                }
                0xcc | 0xd0 => {
                    self.take(1)?;
                    0
                }
                0xcd | 0xd1 => {
                    self.take(2)?;
                    0
                }
                0xca | 0xce | 0xd2 => {
                    self.take(4)?;
                    0
                }
                0xcb | 0xcf | 0xd3 => {
                    self.take(8)?;
                    0
                }
                // fixext 1/2/4/8/16: a type byte and the data.
                0xd4 => {
                    self.take(2)?;
                    0
                }
                0xd5 => {
                    self.take(3)?;
                    0
                }
                0xd6 => {
                    self.take(5)?;
                    0
                }
                0xd7 => {
                    self.take(9)?;
                    0
                }
                0xd8 => {
                    self.take(17)?;
                    0
                }
                0xdc => self.len16()?,
                0xdd => self.len32()?,
                0xde => self.len16()?.saturating_mul(2),
                0xdf => self.len32()?.saturating_mul(2),
                // 0xc1 is the one marker msgpack never uses.
                _ => return Err(err(at, "invalid msgpack marker")),
            };
            if children > 0 {
                if children > self.remaining() {
                    return Err(err(at, "container length exceeds input"));
                }
                let Some(slot) = pending.get_mut(depth) else {
                    return Err(err(at, "values nested too deeply"));
                };
                *slot = children;
                depth += 1;
                continue;
            }
            // One value is complete; close every container it completes.
            loop {
                let Some(top) = depth.checked_sub(1) else {
                    return Ok(());
                };
                let Some(left) = pending.get_mut(top) else {
                    return Ok(()); // unreachable: top < depth <= MAX_SKIP_DEPTH
                };
                *left -= 1;
                if *left > 0 {
                    break;
                }
                depth = top;
            }
        }
    }

    /// The batch's event array (events of unknown type are dropped), decoded over the `init`
    /// events initialised in the memory of `events` (its length and past it); those past the
    /// batch's last stay there, out of sight.
    fn events(&mut self, events: &mut Vec<KvEvent>, init: &mut usize) -> Result<()> {
        debug_assert!(*init >= events.len() && *init <= events.capacity());
        #[allow(unsafe_code)]
        // SAFETY: the first `init` events of the vector's memory are initialised: the vector
        // held them all when `init` was last set, and nothing has touched the vector since (the
        // owner hands it out only behind a shared reference).
        unsafe {
            events.set_len(*init)
        };
        let mut used = 0;
        let res = self.events_over(events, &mut used);
        // Pushes may have grown (and moved) the vector: all its events are initialised.
        *init = events.len();
        #[allow(unsafe_code)]
        // SAFETY: `used <= len`; the events past `used` stay initialised, counted by `init`,
        // and are dropped by the owner (or decoded over by the next batch).
        unsafe {
            events.set_len(used)
        };
        res
    }

    fn events_over(&mut self, events: &mut Vec<KvEvent>, used: &mut usize) -> Result<()> {
        let n = self.array_len()?;
        events.reserve(n.min(self.remaining() / MIN_EVENT_BYTES));
        for _ in 0..n {
            if *used == events.len() {
                events.push(KvEvent::AllBlocksCleared);
            }
            // The next event's hash buffer is cold by now (a batch was applied since it was
            // last written): fetch it while this event decodes.
            if let Some(next) = events.get(*used + 1).and_then(hash_buffer) {
                crate::table::prefetch_line(next.as_ptr());
            }
            if self.event(&mut events[*used])? {
                *used += 1;
            }
        }
        Ok(())
    }

    /// One event, decoded over `slot`; false for an event of an unknown type (skipped).
    fn event(&mut self, slot: &mut KvEvent) -> Result<bool> {
        let start = self.pos;
        // The type first: arrays always begin with it, and vLLM writes it first in maps. A map
        // that names it later is read field by field into an accumulator.
        let (tag, positional, count) = match self.peek()? {
            0x90..=0x9f | 0xdc | 0xdd => {
                let n = self.array_len()?;
                if n == 0 {
                    return Err(err(start, "event array is empty"));
                }
                let at = self.pos;
                let name = self
                    .try_str_bytes()?
                    .ok_or_else(|| err(at, "event type is not a string"))?;
                (Tag::from_name(name), true, n - 1)
            }
            0x80..=0x8f | 0xde | 0xdf => {
                let n = self.map_len()?;
                let first = self.pos;
                if n > 0 && self.try_str_bytes()? == Some(b"type".as_slice()) {
                    let at = self.pos;
                    let name = self
                        .try_str_bytes()?
                        .ok_or_else(|| err(at, "event type is not a string"))?;
                    (Tag::from_name(name), false, n - 1)
                } else {
                    self.pos = first;
                    return self.any_map_event(start, n, slot);
                }
            }
            _ => return Err(err(start, "event is neither a map nor an array")),
        };
        match tag {
            Tag::Stored => {
                let s = as_stored(slot);
                let seen = self.fields(tag, positional, count, |r, f| r.field(f, s))?;
                Self::check_required(tag, start, seen)?;
            }
            Tag::Removed => {
                let ev = as_removed(slot);
                let seen = self.fields(tag, positional, count, |r, f| r.removed_field(f, ev))?;
                Self::check_required(tag, start, seen)?;
            }
            Tag::Cleared | Tag::Unknown => {
                self.fields(tag, positional, count, |r, _| r.skip_value())?;
                if tag == Tag::Unknown {
                    return Ok(false);
                }
                *slot = KvEvent::AllBlocksCleared;
            }
        }
        Ok(true)
    }

    /// An event of type `tag` starting at `start` with the fields `seen` has every field its
    /// type requires.
    fn check_required(tag: Tag, start: usize, seen: u16) -> Result<()> {
        let required: &[(Field, &'static str)] = match tag {
            Tag::Stored => &[
                (Field::BlockHashes, "BlockStored has no block_hashes"),
                (Field::TokenIds, "BlockStored has no token_ids"),
                (Field::BlockSize, "BlockStored has no block_size"),
            ],
            Tag::Removed => &[(Field::BlockHashes, "BlockRemoved has no block_hashes")],
            Tag::Cleared | Tag::Unknown => &[],
        };
        match required.iter().find(|(f, _)| seen & f.bit() == 0) {
            Some((_, reason)) => Err(err(start, reason)),
            None => Ok(()),
        }
    }

    /// The `count` fields of an event of type `tag` after its type (positional, or map
    /// entries), each of the type's own passed to `read`, the rest skipped; returns the fields
    /// read.
    fn fields(
        &mut self,
        tag: Tag,
        positional: bool,
        count: usize,
        mut read: impl FnMut(&mut Self, Field) -> Result<()>,
    ) -> Result<u16> {
        let order: &[Field] = match tag {
            Tag::Stored => &STORED_ORDER,
            Tag::Removed => &REMOVED_ORDER,
            Tag::Cleared | Tag::Unknown => &[],
        };
        let mut seen = 0u16;
        for i in 0..count {
            let field = if positional {
                order.get(i).copied()
            } else {
                match self.try_str_bytes()? {
                    Some(key) => Field::from_key(key).filter(|f| f.belongs_to(Some(tag))),
                    None => {
                        // A non-string key cannot name a field.
                        self.skip_value()?;
                        None
                    }
                }
            };
            match field {
                Some(f) => {
                    read(self, f)?;
                    seen |= f.bit();
                }
                None => self.skip_value()?,
            }
        }
        Ok(seen)
    }

    /// A map event whose type is not its first entry: read into a `BlockStored` accumulator
    /// (fields may come before the type), then made the event its type names.
    fn any_map_event(&mut self, start: usize, n: usize, slot: &mut KvEvent) -> Result<bool> {
        let acc = as_stored(slot);
        let (tag, seen) = self.map_event(start, n, acc)?;
        Self::check_required(tag, start, seen)?;
        match tag {
            Tag::Stored => {}
            Tag::Removed => {
                let acc = std::mem::take(acc);
                *slot = KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: acc.block_hashes,
                    medium: acc.medium,
                    group_idx: acc.group_idx,
                    locality: acc.locality,
                    ownership: acc.ownership,
                });
            }
            Tag::Cleared => *slot = KvEvent::AllBlocksCleared,
            Tag::Unknown => return Ok(false),
        }
        Ok(true)
    }

    /// The `n` entries of a tagged-map event, read into `acc`; returns its tag and the fields
    /// seen.
    fn map_event(&mut self, start: usize, n: usize, acc: &mut BlockStored) -> Result<(Tag, u16)> {
        let mut tag = None;
        let mut seen = 0u16;
        for _ in 0..n {
            let Some(key) = self.try_str_bytes()? else {
                // A non-string key cannot name a field.
                self.skip_value()?;
                self.skip_value()?;
                continue;
            };
            if key == b"type" {
                let at = self.pos;
                let name = self
                    .try_str_bytes()?
                    .ok_or_else(|| err(at, "event type is not a string"))?;
                tag = Some(Tag::from_name(name));
                continue;
            }
            match Field::from_key(key) {
                Some(f) if f.belongs_to(tag) => {
                    self.field(f, acc)?;
                    seen |= f.bit();
                }
                _ => self.skip_value()?,
            }
        }
        let tag = tag.ok_or_else(|| err(start, "event map has no type"))?;
        Ok((tag, seen))
    }

    /// Reads field `f` of a `BlockRemoved` into `ev`.
    fn removed_field(&mut self, f: Field, ev: &mut BlockRemoved) -> Result<()> {
        match f {
            Field::BlockHashes => self.hashes(&mut ev.block_hashes)?,
            Field::Medium => ev.medium = self.opt_str()?.map(Medium::parse),
            Field::GroupIdx => ev.group_idx = self.opt_i64()?,
            Field::Locality => ev.locality = self.opt_string()?,
            Field::Ownership => ev.ownership = self.opt_string()?,
            _ => self.skip_value()?,
        }
        Ok(())
    }

    /// Reads field `f` into `acc` (which doubles as the accumulator for `BlockRemoved`).
    fn field(&mut self, f: Field, acc: &mut BlockStored) -> Result<()> {
        match f {
            Field::BlockHashes => self.hashes(&mut acc.block_hashes)?,
            Field::ParentBlockHash => acc.parent_block_hash = self.opt_hash()?,
            Field::TokenIds => self.token_ids(&mut acc.token_ids)?,
            Field::BlockSize => acc.block_size = self.u32()?,
            Field::LoraId => acc.lora_id = self.opt_i64()?,
            Field::Medium => acc.medium = self.opt_str()?.map(Medium::parse),
            Field::LoraName => acc.lora_name = self.opt_string()?,
            Field::ExtraKeys => acc.extra_keys = self.extra_keys()?,
            Field::GroupIdx => acc.group_idx = self.opt_i64()?,
            Field::SpecKind => acc.kv_cache_spec_kind = self.opt_string()?,
            Field::SlidingWindow => acc.kv_cache_spec_sliding_window = self.opt_i64()?,
            Field::Locality => acc.locality = self.opt_string()?,
            Field::Ownership => acc.ownership = self.opt_string()?,
            Field::SessionId => acc.session_id = self.opt_string()?,
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Options of [`encode_batch_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Write each event in the legacy positional form (vLLM before PR #42892): `[tag, required
    /// fields..., optional fields up to the last one set]`, with nil for unset optional fields
    /// in between. `BlockStored`'s required fields are the seven up to `lora_name`,
    /// `BlockRemoved`'s are `block_hashes` and `medium`.
    pub legacy_arrays: bool,
}

/// Appends the msgpack encoding of `batch` to `out`, exactly as vLLM 0.32 publishes it.
///
/// Containers or strings longer than `u32::MAX` cannot be expressed in msgpack and are not
/// supported. [`ExtraKey::Other`] is written verbatim, so it must hold one msgpack value.
pub fn encode_batch(batch: &EventBatch, out: &mut Vec<u8>) {
    encode_batch_with(batch, out, EncodeOptions::default());
}

/// Appends the msgpack encoding of `batch` to `out`, in the form chosen by `opts`.
pub fn encode_batch_with(batch: &EventBatch, out: &mut Vec<u8>, opts: EncodeOptions) {
    out.push(0x93);
    out.push(0xcb);
    out.extend_from_slice(&batch.ts.to_bits().to_be_bytes());
    write_array_len(out, batch.events.len());
    for event in &batch.events {
        match event {
            KvEvent::BlockStored(e) => write_stored(out, e, opts.legacy_arrays),
            KvEvent::BlockRemoved(e) => write_removed(out, e, opts.legacy_arrays),
            KvEvent::AllBlocksCleared => {
                let _ = Fields::begin(out, opts.legacy_arrays, "AllBlocksCleared", 0, &[]);
            }
        }
    }
    write_opt_int(out, batch.data_parallel_rank);
}

/// Writes an event's fields in either form.
struct Fields<'o> {
    out: &'o mut Vec<u8>,
    legacy: bool,
    /// Legacy form: optional fields still to write (set or not).
    legacy_slots: usize,
}

impl<'o> Fields<'o> {
    /// Writes the header and the tag, given the number of required fields and, in declaration
    /// order, which optional fields are set.
    fn begin(
        out: &'o mut Vec<u8>,
        legacy: bool,
        tag: &str,
        required: usize,
        optional_set: &[bool],
    ) -> Self {
        let legacy_slots = if legacy {
            let slots = optional_set.iter().rposition(|&s| s).map_or(0, |i| i + 1);
            write_array_len(out, 1 + required + slots);
            slots
        } else {
            let set = optional_set.iter().filter(|&&s| s).count();
            write_map_len(out, 1 + required + set);
            write_str(out, "type");
            0
        };
        write_str(out, tag);
        Fields {
            out,
            legacy,
            legacy_slots,
        }
    }

    /// Writes a required field's key (map form) and returns the buffer for its value.
    fn required(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.legacy {
            write_str(self.out, key);
        }
        self.out
    }

    /// Writes an optional field: omitted when `None` in the map form, nil in the legacy form
    /// (unless no later field is set).
    fn optional<T>(&mut self, key: &str, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
        if self.legacy {
            if self.legacy_slots == 0 {
                return;
            }
            self.legacy_slots -= 1;
            match value {
                Some(v) => write(self.out, v),
                None => self.out.push(0xc0),
            }
        } else if let Some(v) = value {
            write_str(self.out, key);
            write(self.out, v);
        }
    }
}

fn write_stored(out: &mut Vec<u8>, e: &BlockStored, legacy: bool) {
    let optional_set = [
        e.extra_keys.is_some(),
        e.group_idx.is_some(),
        e.kv_cache_spec_kind.is_some(),
        e.kv_cache_spec_sliding_window.is_some(),
        e.locality.is_some(),
        e.ownership.is_some(),
        e.session_id.is_some(),
    ];
    let mut f = Fields::begin(out, legacy, "BlockStored", 7, &optional_set);
    write_hashes(f.required("block_hashes"), &e.block_hashes);
    let o = f.required("parent_block_hash");
    match e.parent_block_hash {
        Some(h) => write_uint(o, h.0),
        None => o.push(0xc0),
    }
    let o = f.required("token_ids");
    write_array_len(o, e.token_ids.len());
    for &t in &e.token_ids {
        write_uint(o, u64::from(t));
    }
    write_uint(f.required("block_size"), u64::from(e.block_size));
    write_opt_int(f.required("lora_id"), e.lora_id);
    write_opt_str(f.required("medium"), e.medium.as_ref().map(Medium::as_str));
    write_opt_str(f.required("lora_name"), e.lora_name.as_deref());
    f.optional("extra_keys", e.extra_keys.as_deref(), write_extra_keys);
    f.optional("group_idx", e.group_idx, write_int);
    f.optional(
        "kv_cache_spec_kind",
        e.kv_cache_spec_kind.as_deref(),
        write_str,
    );
    f.optional(
        "kv_cache_spec_sliding_window",
        e.kv_cache_spec_sliding_window,
        write_int,
    );
    f.optional("locality", e.locality.as_deref(), write_str);
    f.optional("ownership", e.ownership.as_deref(), write_str);
    f.optional("session_id", e.session_id.as_deref(), write_str);
}

fn write_removed(out: &mut Vec<u8>, e: &BlockRemoved, legacy: bool) {
    let optional_set = [
        e.group_idx.is_some(),
        e.locality.is_some(),
        e.ownership.is_some(),
    ];
    let mut f = Fields::begin(out, legacy, "BlockRemoved", 2, &optional_set);
    write_hashes(f.required("block_hashes"), &e.block_hashes);
    write_opt_str(f.required("medium"), e.medium.as_ref().map(Medium::as_str));
    f.optional("group_idx", e.group_idx, write_int);
    f.optional("locality", e.locality.as_deref(), write_str);
    f.optional("ownership", e.ownership.as_deref(), write_str);
}

fn write_hashes(out: &mut Vec<u8>, hashes: &[EngineHash]) {
    write_array_len(out, hashes.len());
    for h in hashes {
        write_uint(out, h.0);
    }
}

fn write_extra_keys(out: &mut Vec<u8>, blocks: &[Option<Vec<ExtraKey>>]) {
    write_array_len(out, blocks.len());
    for block in blocks {
        let Some(keys) = block else {
            out.push(0xc0);
            continue;
        };
        write_array_len(out, keys.len());
        for key in keys {
            match key {
                ExtraKey::Str(s) => write_str(out, s),
                ExtraKey::Mm { identifier, offset } => {
                    out.push(0x92);
                    write_str(out, identifier);
                    write_int(out, *offset);
                }
                ExtraKey::Bytes(b) => write_bin(out, b),
                ExtraKey::Int(i) => write_int(out, *i),
                ExtraKey::Other(raw) => out.extend_from_slice(raw),
            }
        }
    }
}

/// A length as the 32-bit field msgpack allows (longer containers are unsupported).
fn len32(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

/// An unsigned integer in its smallest encoding (as msgspec writes it).
fn write_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= 0xff {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= 0xffff {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= 0xffff_ffff {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// A signed integer in its smallest encoding (non-negative values as unsigned, like msgspec).
fn write_int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        write_uint(out, v.unsigned_abs());
    } else if v >= -32 {
        out.push(v as u8);
    } else if v >= i64::from(i8::MIN) {
        out.extend_from_slice(&[0xd0, v as u8]);
    } else if v >= i64::from(i16::MIN) {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i64::from(i32::MIN) {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn write_opt_int(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        Some(v) => write_int(out, v),
        None => out.push(0xc0),
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n <= 0xff {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n <= 0xffff {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&len32(n));
    }
    out.extend_from_slice(s.as_bytes());
}

fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.push(0xc0),
    }
}

fn write_bin(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len();
    if n <= 0xff {
        out.extend_from_slice(&[0xc4, n as u8]);
    } else if n <= 0xffff {
        out.push(0xc5);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&len32(n));
    }
    out.extend_from_slice(b);
}

fn write_array_len(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x90 | n as u8);
    } else if n <= 0xffff {
        out.push(0xdc);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&len32(n));
    }
}

fn write_map_len(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0xde);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdf);
        out.extend_from_slice(&len32(n));
    }
}

#[cfg(test)]
mod tests;
