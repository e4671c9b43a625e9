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
    let mut r = Reader { buf, pos: 0 };
    let n = r.array_len()?;
    if n < 2 {
        return Err(err(0, "batch array has fewer than 2 elements"));
    }
    let ts = r.f64()?;
    let events = r.events()?;
    let data_parallel_rank = if n >= 3 { r.opt_i64()? } else { None };
    for _ in 3..n {
        r.skip_value()?;
    }
    if r.pos != buf.len() {
        return Err(err(r.pos, "trailing bytes after batch"));
    }
    Ok(EventBatch {
        ts,
        events,
        data_parallel_rank,
    })
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

    /// The batch's event array. Events of unknown type are dropped.
    ///
    /// Each event is decoded in place into a `BlockStored` pushed onto the vector (the struct is
    /// large; building it elsewhere and moving it in costs several copies per event), which is
    /// then turned into the event its tag names.
    fn events(&mut self) -> Result<Vec<KvEvent>> {
        let n = self.array_len()?;
        let mut events = Vec::with_capacity(n.min(self.remaining() / MIN_EVENT_BYTES));
        for _ in 0..n {
            let start = self.pos;
            events.push(KvEvent::BlockStored(BlockStored::default()));
            let Some(slot) = events.last_mut() else {
                return Err(err(start, "internal error: event slot missing")); // unreachable
            };
            let KvEvent::BlockStored(acc) = slot else {
                return Err(err(start, "internal error: event slot missing")); // unreachable
            };
            let (tag, seen) = match self.peek()? {
                0x80..=0x8f | 0xde | 0xdf => self.map_event(start, acc)?,
                0x90..=0x9f | 0xdc | 0xdd => self.array_event(start, acc)?,
                _ => return Err(err(start, "event is neither a map nor an array")),
            };
            let has = |f: Field| seen & f.bit() != 0;
            match tag {
                Tag::Stored => {
                    if !has(Field::BlockHashes) {
                        return Err(err(start, "BlockStored has no block_hashes"));
                    }
                    if !has(Field::TokenIds) {
                        return Err(err(start, "BlockStored has no token_ids"));
                    }
                    if !has(Field::BlockSize) {
                        return Err(err(start, "BlockStored has no block_size"));
                    }
                }
                Tag::Removed => {
                    if !has(Field::BlockHashes) {
                        return Err(err(start, "BlockRemoved has no block_hashes"));
                    }
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
                Tag::Unknown => {
                    events.pop();
                }
            }
        }
        Ok(events)
    }

    /// A tagged-map event, read into `acc`; returns its tag and the fields seen.
    fn map_event(&mut self, start: usize, acc: &mut BlockStored) -> Result<(Tag, u16)> {
        let n = self.map_len()?;
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

    /// A legacy positional event `[tag, field...]`, read into `acc`; returns its tag and the
    /// fields seen.
    fn array_event(&mut self, start: usize, acc: &mut BlockStored) -> Result<(Tag, u16)> {
        let n = self.array_len()?;
        if n == 0 {
            return Err(err(start, "event array is empty"));
        }
        let at = self.pos;
        let name = self
            .try_str_bytes()?
            .ok_or_else(|| err(at, "event type is not a string"))?;
        let tag = Tag::from_name(name);
        let order: &[Field] = match tag {
            Tag::Stored => &STORED_ORDER,
            Tag::Removed => &REMOVED_ORDER,
            Tag::Cleared | Tag::Unknown => &[],
        };
        let mut seen = 0u16;
        for i in 0..n - 1 {
            match order.get(i) {
                Some(&f) => {
                    self.field(f, acc)?;
                    seen |= f.bit();
                }
                None => self.skip_value()?,
            }
        }
        Ok((tag, seen))
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
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    // Golden payloads of shared/docs/vllm-interfaces.md section 1.2.
    const GOLDEN_STORED: &str = "93cb41d954fc40100000918ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657392cf7b0bf7bf7fd01682cf0b368b33d87bf3bfb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc00200102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20aa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797392c0c0a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e00";
    const GOLDEN_REMOVED: &str = "93cb41d954fc406000009284a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391cf0b368b33d87bf3bfa66d656469756da3475055a967726f75705f6964780081a474797065b0416c6c426c6f636b73436c656172656400";
    const GOLDEN_BYTES_HASH: &str = "93cb3ff0000000000000918ca474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391c420cd7c51bc5a8fc8643f383a2b9e01522fba7473c669e9270c7b0bf7bf7fd01682b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc00100102030405060708090a0b0c0d0e0f10aa626c6f636b5f73697a6510a76c6f72615f696401a66d656469756da3475055a96c6f72615f6e616d65a76d792d6c6f7261aa65787472615f6b6579739193a76d792d6c6f726192a8696d672d6861736803a874656e616e742d61a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6eaa73657373696f6e5f6964a2733100";
    const GOLDEN_LEGACY: &str =
        "93cb3ff00000000000009198ab426c6f636b53746f7265649105c092010202c0a3475055c000";

    const H1: u64 = 8866452693264111234;
    const H2: u64 = 807986237951177663;

    fn hex(s: &str) -> Vec<u8> {
        let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        s.chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    fn encode(batch: &EventBatch) -> Vec<u8> {
        let mut out = Vec::new();
        encode_batch(batch, &mut out);
        out
    }

    fn encode_legacy(batch: &EventBatch) -> Vec<u8> {
        let mut out = Vec::new();
        encode_batch_with(
            batch,
            &mut out,
            EncodeOptions {
                legacy_arrays: true,
            },
        );
        out
    }

    fn decode_err(buf: &[u8]) -> (usize, &'static str) {
        match decode_batch(buf) {
            Err(IndexError::Decode { offset, reason }) => (offset, reason),
            other => panic!("expected a decode error, got {other:?}"),
        }
    }

    fn stored(batch: &EventBatch, i: usize) -> &BlockStored {
        match &batch.events[i] {
            KvEvent::BlockStored(e) => e,
            other => panic!("event {i} is not BlockStored: {other:?}"),
        }
    }

    /// A test-side msgpack value, to build hostile and unusual payloads.
    enum V {
        Nil,
        U(u64),
        I(i64),
        F(f64),
        S(&'static str),
        A(Vec<V>),
        M(Vec<(V, V)>),
        /// Verbatim bytes (non-canonical encodings, invalid data).
        Raw(Vec<u8>),
    }

    fn enc_v(v: &V, out: &mut Vec<u8>) {
        match v {
            V::Nil => out.push(0xc0),
            V::U(u) => write_uint(out, *u),
            V::I(i) => write_int(out, *i),
            V::F(f) => {
                out.push(0xcb);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
            V::S(s) => write_str(out, s),
            V::A(items) => {
                write_array_len(out, items.len());
                items.iter().for_each(|i| enc_v(i, out));
            }
            V::M(pairs) => {
                write_map_len(out, pairs.len());
                for (k, v) in pairs {
                    enc_v(k, out);
                    enc_v(v, out);
                }
            }
            V::Raw(b) => out.extend_from_slice(b),
        }
    }

    fn bytes_of(v: &V) -> Vec<u8> {
        let mut out = Vec::new();
        enc_v(v, &mut out);
        out
    }

    /// A batch `[1.5, events, 7]`.
    fn batch_of(events: Vec<V>) -> Vec<u8> {
        bytes_of(&V::A(vec![V::F(1.5), V::A(events), V::U(7)]))
    }

    fn raw(s: &str) -> V {
        V::Raw(hex(s))
    }

    fn golden_stored() -> EventBatch {
        EventBatch {
            ts: 1700000000.25,
            events: vec![KvEvent::BlockStored(BlockStored {
                block_hashes: vec![EngineHash(H1), EngineHash(H2)],
                parent_block_hash: None,
                token_ids: (1..=32).collect(),
                block_size: 16,
                lora_id: None,
                medium: Some(Medium::Gpu),
                lora_name: None,
                extra_keys: Some(vec![None, None]),
                group_idx: Some(0),
                kv_cache_spec_kind: Some("full_attention".into()),
                ..BlockStored::default()
            })],
            data_parallel_rank: Some(0),
        }
    }

    fn golden_removed() -> EventBatch {
        EventBatch {
            ts: 1700000001.5,
            events: vec![
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![EngineHash(H2)],
                    medium: Some(Medium::Gpu),
                    group_idx: Some(0),
                    locality: None,
                    ownership: None,
                }),
                KvEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(0),
        }
    }

    fn golden_legacy() -> EventBatch {
        EventBatch {
            ts: 1.0,
            events: vec![KvEvent::BlockStored(BlockStored {
                block_hashes: vec![EngineHash(5)],
                parent_block_hash: None,
                token_ids: vec![1, 2],
                block_size: 2,
                lora_id: None,
                medium: Some(Medium::Gpu),
                lora_name: None,
                ..BlockStored::default()
            })],
            data_parallel_rank: Some(0),
        }
    }

    #[test]
    fn golden_stored_decodes() {
        let b = decode_batch(&hex(GOLDEN_STORED)).unwrap();
        assert_eq!(b.ts, 1700000000.25);
        assert_eq!(b.data_parallel_rank, Some(0));
        assert_eq!(b.events.len(), 1);
        let e = stored(&b, 0);
        assert_eq!(e.block_hashes, vec![EngineHash(H1), EngineHash(H2)]);
        assert_eq!(e.block_hashes[0].0, 0x7b0b_f7bf_7fd0_1682);
        assert_eq!(e.parent_block_hash, None);
        assert_eq!(e.token_ids, (1..=32).collect::<Vec<u32>>());
        assert_eq!(e.block_size, 16);
        assert_eq!(e.lora_id, None);
        assert_eq!(e.medium, Some(Medium::Gpu));
        assert_eq!(e.lora_name, None);
        assert_eq!(e.extra_keys, Some(vec![None, None]));
        assert_eq!(e.group_idx, Some(0));
        assert_eq!(e.kv_cache_spec_kind.as_deref(), Some("full_attention"));
        assert_eq!(e.kv_cache_spec_sliding_window, None);
        assert_eq!(e.locality, None);
        assert_eq!(e.ownership, None);
        assert_eq!(e.session_id, None);
        assert_eq!(b, golden_stored());
    }

    #[test]
    fn golden_removed_decodes() {
        let b = decode_batch(&hex(GOLDEN_REMOVED)).unwrap();
        assert_eq!(b.ts, 1700000001.5);
        assert_eq!(b.data_parallel_rank, Some(0));
        assert_eq!(b.events.len(), 2);
        let KvEvent::BlockRemoved(r) = &b.events[0] else {
            panic!("not BlockRemoved: {:?}", b.events[0]);
        };
        assert_eq!(r.block_hashes, vec![EngineHash(H2)]);
        assert_eq!(r.medium, Some(Medium::Gpu));
        assert_eq!(r.group_idx, Some(0));
        assert_eq!(r.locality, None);
        assert_eq!(r.ownership, None);
        assert_eq!(b.events[1], KvEvent::AllBlocksCleared);
        assert_eq!(b, golden_removed());
    }

    #[test]
    fn golden_bytes_hash_decodes() {
        let b = decode_batch(&hex(GOLDEN_BYTES_HASH)).unwrap();
        assert_eq!(b.ts, 1.0);
        assert_eq!(b.data_parallel_rank, Some(0));
        assert_eq!(b.events.len(), 1);
        let e = stored(&b, 0);
        // The int form of a digest is its last 8 bytes: the same hash as in the first golden.
        assert_eq!(e.block_hashes, vec![EngineHash(H1)]);
        assert_eq!(e.parent_block_hash, None);
        assert_eq!(e.token_ids, (1..=16).collect::<Vec<u32>>());
        assert_eq!(e.block_size, 16);
        assert_eq!(e.lora_id, Some(1));
        assert_eq!(e.medium, Some(Medium::Gpu));
        assert_eq!(e.lora_name.as_deref(), Some("my-lora"));
        assert_eq!(
            e.extra_keys,
            Some(vec![Some(vec![
                ExtraKey::Str("my-lora".into()),
                ExtraKey::Mm {
                    identifier: "img-hash".into(),
                    offset: 3
                },
                ExtraKey::Str("tenant-a".into()),
            ])])
        );
        assert_eq!(e.group_idx, Some(0));
        assert_eq!(e.kv_cache_spec_kind.as_deref(), Some("full_attention"));
        assert_eq!(e.kv_cache_spec_sliding_window, None);
        assert_eq!(e.locality, None);
        assert_eq!(e.ownership, None);
        assert_eq!(e.session_id.as_deref(), Some("s1"));
    }

    #[test]
    fn golden_legacy_decodes() {
        let b = decode_batch(&hex(GOLDEN_LEGACY)).unwrap();
        assert_eq!(b, golden_legacy());
    }

    #[test]
    fn encode_reproduces_goldens_byte_for_byte() {
        assert_eq!(encode(&golden_stored()), hex(GOLDEN_STORED));
        assert_eq!(encode(&golden_removed()), hex(GOLDEN_REMOVED));
        assert_eq!(encode_legacy(&golden_legacy()), hex(GOLDEN_LEGACY));
        // Decode then encode is the identity on every golden with integer hashes.
        for g in [GOLDEN_STORED, GOLDEN_REMOVED] {
            assert_eq!(encode(&decode_batch(&hex(g)).unwrap()), hex(g));
        }
        // The bytes-hash golden re-encodes with integer hashes and decodes to the same batch.
        let b = decode_batch(&hex(GOLDEN_BYTES_HASH)).unwrap();
        assert_eq!(decode_batch(&encode(&b)).unwrap(), b);
        assert_eq!(decode_batch(&encode_legacy(&b)).unwrap(), b);
    }

    #[test]
    fn encode_appends() {
        let mut out = vec![0xaa];
        encode_batch(&golden_removed(), &mut out);
        assert_eq!(out[0], 0xaa);
        assert_eq!(&out[1..], &hex(GOLDEN_REMOVED)[..]);
    }

    #[test]
    fn legacy_forms_of_all_event_types() {
        let batch = EventBatch {
            ts: 2.5,
            events: vec![
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![EngineHash(1), EngineHash(u64::MAX)],
                    medium: None,
                    group_idx: None,
                    locality: Some("LOCAL".into()),
                    ownership: None,
                }),
                KvEvent::AllBlocksCleared,
                KvEvent::BlockStored(BlockStored {
                    block_hashes: vec![EngineHash(9)],
                    token_ids: vec![3; 4],
                    block_size: 4,
                    session_id: Some("s".into()),
                    ..BlockStored::default()
                }),
            ],
            data_parallel_rank: None,
        };
        let legacy = encode_legacy(&batch);
        let expected = bytes_of(&V::A(vec![
            V::F(2.5),
            V::A(vec![
                V::A(vec![
                    V::S("BlockRemoved"),
                    V::A(vec![V::U(1), V::U(u64::MAX)]),
                    V::Nil,
                    V::Nil,
                    V::S("LOCAL"),
                ]),
                V::A(vec![V::S("AllBlocksCleared")]),
                V::A(vec![
                    V::S("BlockStored"),
                    V::A(vec![V::U(9)]),
                    V::Nil,
                    V::A(vec![V::U(3), V::U(3), V::U(3), V::U(3)]),
                    V::U(4),
                    V::Nil,
                    V::Nil,
                    V::Nil,
                    V::Nil,
                    V::Nil,
                    V::Nil,
                    V::Nil,
                    V::Nil,
                    V::Nil,
                    V::S("s"),
                ]),
            ]),
            V::Nil,
        ]));
        assert_eq!(legacy, expected);
        assert_eq!(decode_batch(&legacy).unwrap(), batch);
        assert_eq!(decode_batch(&encode(&batch)).unwrap(), batch);
    }

    #[test]
    fn legacy_short_and_long_events() {
        // Oldest form: no medium, no lora_name; and a newer one with an unknown 16th field.
        let buf = batch_of(vec![
            V::A(vec![
                V::S("BlockStored"),
                V::A(vec![V::U(1)]),
                V::U(0),
                V::A(vec![V::U(7)]),
                V::U(1),
                V::I(3),
            ]),
            V::A(vec![
                V::S("BlockRemoved"),
                V::A(vec![V::U(1)]),
                V::S("CPU"),
                V::U(2),
                V::S("REMOTE"),
                V::S("tier-1"),
                V::M(vec![(V::S("future"), V::A(vec![V::Nil]))]),
            ]),
            V::A(vec![V::S("AllBlocksCleared"), V::U(1), V::U(2)]),
        ]);
        let b = decode_batch(&buf).unwrap();
        assert_eq!(
            b.events,
            vec![
                KvEvent::BlockStored(BlockStored {
                    block_hashes: vec![EngineHash(1)],
                    parent_block_hash: Some(EngineHash(0)),
                    token_ids: vec![7],
                    block_size: 1,
                    lora_id: Some(3),
                    ..BlockStored::default()
                }),
                KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![EngineHash(1)],
                    medium: Some(Medium::Cpu),
                    group_idx: Some(2),
                    locality: Some("REMOTE".into()),
                    ownership: Some("tier-1".into()),
                }),
                KvEvent::AllBlocksCleared,
            ]
        );
        // Too short: BlockStored without block_size.
        let buf = batch_of(vec![V::A(vec![
            V::S("BlockStored"),
            V::A(vec![]),
            V::Nil,
            V::A(vec![]),
        ])]);
        assert_eq!(decode_err(&buf).1, "BlockStored has no block_size");
        assert_eq!(
            decode_err(&batch_of(vec![V::A(vec![])])).1,
            "event array is empty"
        );
    }

    #[test]
    fn map_keys_in_any_order_and_unknown_keys_skipped() {
        let nested = V::M(vec![
            (V::S("a"), V::A(vec![V::U(1), V::F(2.0), V::Nil, raw("c3")])),
            (V::U(5), raw("c40401020304")), // non-string key, bin value
            (V::S("ext"), raw("d6ff00000001")), // fixext4
            (raw("c70201ffff"), raw("ca3f800000")), // ext8 key, f32 value
            (raw("c0"), raw("d80100000000000000000000000000000000")), // nil key, fixext16
            (V::S("s"), raw("da0003616263")), // str16
        ]);
        let buf = batch_of(vec![V::M(vec![
            (V::S("zzz_unknown"), nested),
            (
                V::S("token_ids"),
                V::A(vec![V::U(1), V::U(300), V::U(70000)]),
            ),
            (V::S("medium"), V::S("cpu")),
            (V::U(1), V::A(vec![V::A(vec![V::Nil])])),
            (V::S("block_size"), V::U(3)),
            (V::S("block_hashes"), V::A(vec![V::U(10)])),
            (V::S("group_idx"), V::Nil),
            (V::S("locality"), V::S("LOCAL")),
            (V::S("unknown_bin"), raw("c5000100")),
            (V::S("type"), V::S("BlockStored")),
            (V::S("parent_block_hash"), V::U(9)),
            (V::S("kv_cache_spec_sliding_window"), V::I(128)),
            (V::S("ownership"), V::S("t")),
        ])]);
        let b = decode_batch(&buf).unwrap();
        assert_eq!(b.data_parallel_rank, Some(7));
        assert_eq!(
            b.events,
            vec![KvEvent::BlockStored(BlockStored {
                block_hashes: vec![EngineHash(10)],
                parent_block_hash: Some(EngineHash(9)),
                token_ids: vec![1, 300, 70000],
                block_size: 3,
                medium: Some(Medium::Cpu),
                kv_cache_spec_sliding_window: Some(128),
                locality: Some("LOCAL".into()),
                ownership: Some("t".into()),
                ..BlockStored::default()
            })]
        );
    }

    #[test]
    fn fields_of_other_event_types_are_ignored() {
        // `type` first: BlockStored-only keys of a BlockRemoved are skipped unread (even if bad).
        let removed = V::M(vec![
            (V::S("type"), V::S("BlockRemoved")),
            (V::S("token_ids"), V::A(vec![V::I(-1)])),
            (V::S("block_hashes"), V::A(vec![V::U(3)])),
        ]);
        let cleared = V::M(vec![
            (V::S("type"), V::S("AllBlocksCleared")),
            (V::S("block_hashes"), V::S("junk")),
        ]);
        // `type` last: fields are read, then discarded.
        let removed_late = V::M(vec![
            (V::S("lora_name"), V::S("x")),
            (V::S("block_hashes"), V::A(vec![V::U(4)])),
            (V::S("type"), V::S("BlockRemoved")),
        ]);
        let b = decode_batch(&batch_of(vec![removed, cleared, removed_late])).unwrap();
        let removed = |h| {
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![EngineHash(h)],
                ..BlockRemoved::default()
            })
        };
        assert_eq!(
            b.events,
            vec![removed(3), KvEvent::AllBlocksCleared, removed(4)]
        );
    }

    #[test]
    fn unknown_event_types_are_skipped() {
        let buf = batch_of(vec![
            V::M(vec![
                (V::S("type"), V::S("BlockPinned")),
                (V::S("block_hashes"), V::A(vec![V::U(1)])),
                (V::S("whatever"), V::M(vec![(V::U(1), V::U(2))])),
            ]),
            V::A(vec![V::S("FutureEvent"), V::A(vec![V::Nil]), V::U(3)]),
            V::M(vec![(V::S("type"), V::S("AllBlocksCleared"))]),
        ]);
        let b = decode_batch(&buf).unwrap();
        assert_eq!(b.events, vec![KvEvent::AllBlocksCleared]);
    }

    #[test]
    fn every_int_width_is_accepted() {
        let widths = [
            "05",
            "cc05",
            "cd0005",
            "ce00000005",
            "cf0000000000000005",
            "d005",
            "d10005",
            "d200000005",
            "d30000000000000005",
        ];
        let tokens: Vec<V> = widths.iter().map(|w| raw(w)).collect();
        let hashes: Vec<V> = widths.iter().map(|w| raw(w)).collect();
        let buf = bytes_of(&V::A(vec![
            raw("cd0102"), // integer ts
            V::A(vec![V::A(vec![
                V::S("BlockStored"),
                V::A(hashes),
                raw("ff"), // negative fixint parent hash: two's complement
                V::A(tokens),
                raw("d10009"),
                raw("d3fffffffffffffffe"),
            ])]),
            raw("d2ffffffff"),
        ]));
        let b = decode_batch(&buf).unwrap();
        assert_eq!(b.ts, 258.0);
        assert_eq!(b.data_parallel_rank, Some(-1));
        let e = stored(&b, 0);
        assert_eq!(e.block_hashes, vec![EngineHash(5); 9]);
        assert_eq!(e.parent_block_hash, Some(EngineHash(u64::MAX)));
        assert_eq!(e.token_ids, vec![5; 9]);
        assert_eq!(e.block_size, 9);
        assert_eq!(e.lora_id, Some(-2));
        // Large values of each width.
        let buf = batch_of(vec![V::A(vec![
            V::S("BlockStored"),
            V::A(vec![
                raw("cfffffffffffffffff"),
                raw("d38000000000000000"),
                raw("c403010203"),
            ]),
            raw("c4090102030405060708ff"),
            V::A(vec![
                raw("ccff"),
                raw("cdffff"),
                raw("ceffffffff"),
                raw("cf00000000ffffffff"),
            ]),
            V::U(0),
        ])]);
        let e = decode_batch(&buf).unwrap();
        let e = stored(&e, 0).clone();
        assert_eq!(
            e.block_hashes,
            vec![
                EngineHash(u64::MAX),
                EngineHash(1 << 63),
                EngineHash(0x010203)
            ]
        );
        assert_eq!(e.parent_block_hash, Some(EngineHash(0x02030405060708ff)));
        assert_eq!(e.token_ids, vec![255, 65535, u32::MAX, u32::MAX]);
        // f32 ts.
        let buf = bytes_of(&V::A(vec![raw("ca3fc00000"), V::A(vec![])]));
        assert_eq!(decode_batch(&buf).unwrap().ts, 1.5);
    }

    #[test]
    fn encode_uses_smallest_ints_and_strings() {
        let cases_u: [(u64, &str); 9] = [
            (0, "00"),
            (127, "7f"),
            (128, "cc80"),
            (255, "ccff"),
            (256, "cd0100"),
            (65535, "cdffff"),
            (65536, "ce00010000"),
            (u64::from(u32::MAX), "ceffffffff"),
            (1 << 32, "cf0000000100000000"),
        ];
        for (v, h) in cases_u {
            let mut out = Vec::new();
            write_uint(&mut out, v);
            assert_eq!(out, hex(h), "{v}");
            let mut out = Vec::new();
            if let Ok(i) = i64::try_from(v) {
                write_int(&mut out, i);
                assert_eq!(out, hex(h), "{v}");
            }
        }
        let cases_i: [(i64, &str); 9] = [
            (-1, "ff"),
            (-32, "e0"),
            (-33, "d0df"),
            (-128, "d080"),
            (-129, "d1ff7f"),
            (-32768, "d18000"),
            (-32769, "d2ffff7fff"),
            (i64::from(i32::MIN), "d280000000"),
            (i64::from(i32::MIN) - 1, "d3ffffffff7fffffff"),
        ];
        for (v, h) in cases_i {
            let mut out = Vec::new();
            write_int(&mut out, v);
            assert_eq!(out, hex(h), "{v}");
        }
        for (n, header) in [(31, "bf"), (32, "d920"), (255, "d9ff"), (256, "da0100")] {
            let s = "x".repeat(n);
            let mut out = Vec::new();
            write_str(&mut out, &s);
            assert_eq!(out[..out.len() - n], hex(header)[..], "{n}");
        }
        for (n, header) in [(15, "9f"), (16, "dc0010"), (65536, "dd00010000")] {
            let mut out = Vec::new();
            write_array_len(&mut out, n);
            assert_eq!(out, hex(header));
        }
    }

    #[test]
    fn extra_keys_mapping() {
        let keys = V::A(vec![
            V::S("lora"),
            V::A(vec![V::S("mm"), V::I(-4)]),
            raw("c403abcdef"),
            V::I(-7),
            V::U(7),
            V::Nil,
            V::F(0.5),
            V::A(vec![V::U(1), V::S("a")]),
            V::A(vec![V::S("a"), V::U(1), V::U(2)]),
            V::A(vec![V::S("a"), raw("cfffffffffffffffff")]),
            raw("cfffffffffffffffff"),
            V::M(vec![(V::S("k"), V::A(vec![]))]),
            raw("dc0002a16101"), // [str, int] with a 16-bit array header is still Mm
        ]);
        let buf = batch_of(vec![V::M(vec![
            (V::S("type"), V::S("BlockStored")),
            (V::S("block_hashes"), V::A(vec![V::U(1), V::U(2), V::U(3)])),
            (V::S("token_ids"), V::A(vec![])),
            (V::S("block_size"), V::U(0)),
            (V::S("extra_keys"), V::A(vec![keys, V::Nil, V::A(vec![])])),
        ])]);
        let b = decode_batch(&buf).unwrap();
        let e = stored(&b, 0);
        let expected = vec![
            ExtraKey::Str("lora".into()),
            ExtraKey::Mm {
                identifier: "mm".into(),
                offset: -4,
            },
            ExtraKey::Bytes(vec![0xab, 0xcd, 0xef]),
            ExtraKey::Int(-7),
            ExtraKey::Int(7),
            ExtraKey::Other(hex("c0")),
            ExtraKey::Other(bytes_of(&V::F(0.5))),
            ExtraKey::Other(hex("9201a161")),
            ExtraKey::Other(hex("93a1610102")),
            ExtraKey::Other(hex("92a161cfffffffffffffffff")),
            ExtraKey::Other(hex("cfffffffffffffffff")),
            ExtraKey::Other(hex("81a16b90")),
            ExtraKey::Mm {
                identifier: "a".into(),
                offset: 1,
            },
        ];
        assert_eq!(e.extra_keys, Some(vec![Some(expected), None, Some(vec![])]));
        // Re-encoding keeps everything (the 16-bit header becomes a fixarray).
        let again = decode_batch(&encode(&b)).unwrap();
        assert_eq!(again, b);
        // extra_keys nil is None.
        let buf = batch_of(vec![V::A(vec![
            V::S("BlockStored"),
            V::A(vec![]),
            V::Nil,
            V::A(vec![]),
            V::U(0),
            V::Nil,
            V::Nil,
            V::Nil,
            V::Nil,
        ])]);
        assert_eq!(stored(&decode_batch(&buf).unwrap(), 0).extra_keys, None);
    }

    #[test]
    fn batch_shapes() {
        // Two elements: no rank.
        let b = decode_batch(&bytes_of(&V::A(vec![V::F(1.0), V::A(vec![])]))).unwrap();
        assert_eq!(b.data_parallel_rank, None);
        assert!(b.events.is_empty());
        // Nil rank, and extra elements ignored.
        let buf = bytes_of(&V::A(vec![
            V::F(1.0),
            V::A(vec![]),
            V::Nil,
            V::M(vec![(V::S("x"), V::A(vec![V::U(1)]))]),
            V::S("more"),
        ]));
        assert_eq!(decode_batch(&buf).unwrap().data_parallel_rank, None);
        // 16-bit array header for the batch.
        let mut buf = hex("dc0003");
        buf.extend_from_slice(&bytes_of(&V::F(1.0)));
        buf.extend_from_slice(&hex("dc0000"));
        buf.push(0x02);
        assert_eq!(decode_batch(&buf).unwrap().data_parallel_rank, Some(2));
        // Encoding a None rank writes nil, and 16 events use array16.
        let batch = EventBatch {
            ts: 0.0,
            events: vec![KvEvent::AllBlocksCleared; 16],
            data_parallel_rank: None,
        };
        let out = encode(&batch);
        assert_eq!(out[10..13], hex("dc0010")[..]);
        assert_eq!(out.last(), Some(&0xc0));
        assert_eq!(decode_batch(&out).unwrap(), batch);
    }

    #[test]
    fn every_truncation_of_the_goldens_fails() {
        for g in [
            GOLDEN_STORED,
            GOLDEN_REMOVED,
            GOLDEN_BYTES_HASH,
            GOLDEN_LEGACY,
        ] {
            let full = hex(g);
            assert!(decode_batch(&full).is_ok());
            for len in 0..full.len() {
                let (offset, _) = decode_err(&full[..len]);
                assert!(offset <= len, "offset {offset} past the input ({len})");
            }
        }
    }

    #[test]
    fn trailing_bytes_fail() {
        let mut buf = hex(GOLDEN_REMOVED);
        let n = buf.len();
        buf.push(0x00);
        assert_eq!(decode_err(&buf), (n, "trailing bytes after batch"));
    }

    #[test]
    fn huge_declared_lengths_fail_without_allocating() {
        let huge_array = raw("ddffffffff00000000000000000000");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                hex("ddffffffff00000000000000000000"),
                "array length exceeds input",
            ),
            (
                bytes_of(&V::A(vec![V::F(1.0), raw("dd7fffffff00")])),
                "array length exceeds input",
            ),
            (
                batch_of(vec![raw("dfffffffff0000")]),
                "map length exceeds input",
            ),
            (
                batch_of(vec![V::M(vec![
                    (V::S("type"), V::S("BlockStored")),
                    (V::S("token_ids"), huge_array),
                ])]),
                "array length exceeds input",
            ),
            (batch_of(vec![V::M(vec![(raw("dbffffffff"), V::Nil)])]), EOF),
            (
                batch_of(vec![V::M(vec![(V::S("x"), raw("c6ffffffff00"))])]),
                EOF,
            ),
            (
                batch_of(vec![V::M(vec![(V::S("x"), raw("c9ffffffff0000"))])]),
                EOF,
            ),
            (
                batch_of(vec![V::M(vec![(V::S("x"), raw("dfffffffff0000"))])]),
                "container length exceeds input",
            ),
            (
                batch_of(vec![V::M(vec![(
                    V::S("extra_keys"),
                    V::A(vec![raw("ddffffffff")]),
                )])]),
                "array length exceeds input",
            ),
        ];
        for (buf, reason) in cases {
            assert_eq!(decode_err(&buf).1, reason, "{buf:02x?}");
        }
    }

    fn nested_arrays(depth: usize) -> V {
        let mut v = V::U(1);
        for _ in 0..depth {
            v = V::A(vec![v]);
        }
        v
    }

    #[test]
    fn skipping_limits_nesting_depth() {
        let event = |v: V| {
            batch_of(vec![V::M(vec![
                (V::S("deep"), v),
                (V::S("type"), V::S("AllBlocksCleared")),
            ])])
        };
        assert!(decode_batch(&event(nested_arrays(MAX_SKIP_DEPTH))).is_ok());
        let buf = event(nested_arrays(MAX_SKIP_DEPTH + 1));
        assert_eq!(decode_err(&buf).1, "values nested too deeply");
        // Deeply nested maps in an extra key: kept verbatim up to the limit.
        let mut v = V::Nil;
        for _ in 0..MAX_SKIP_DEPTH {
            v = V::M(vec![(V::S("k"), v)]);
        }
        let raw_v = bytes_of(&v);
        let buf = batch_of(vec![V::A(vec![
            V::S("BlockStored"),
            V::A(vec![]),
            V::Nil,
            V::A(vec![]),
            V::U(0),
            V::Nil,
            V::Nil,
            V::Nil,
            V::A(vec![V::A(vec![v])]),
        ])]);
        let b = decode_batch(&buf).unwrap();
        assert_eq!(
            stored(&b, 0).extra_keys,
            Some(vec![Some(vec![ExtraKey::Other(raw_v)])])
        );
        // A million nested arrays: an error, not a stack overflow.
        let mut buf = batch_of(vec![V::M(vec![(V::S("deep"), V::Nil)])]);
        buf.truncate(buf.len() - 2); // drop nil and the rank
        buf.extend(std::iter::repeat_n(0x91, 1_000_000));
        assert_eq!(decode_err(&buf).1, "values nested too deeply");
    }

    #[test]
    fn wrong_types_fail_with_offsets() {
        let stored_with = |key: &'static str, v: V| {
            batch_of(vec![V::M(vec![
                (V::S("type"), V::S("BlockStored")),
                (V::S(key), v),
            ])])
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                bytes_of(&V::A(vec![V::S("1.0"), V::A(vec![])])),
                "expected float or integer",
            ),
            (
                bytes_of(&V::A(vec![V::F(1.0), V::M(vec![])])),
                "expected array",
            ),
            (bytes_of(&V::U(1)), "expected array"),
            (
                bytes_of(&V::A(vec![V::F(1.0)])),
                "batch array has fewer than 2 elements",
            ),
            (
                bytes_of(&V::A(vec![V::F(1.0), V::A(vec![]), V::S("0")])),
                "expected integer",
            ),
            (
                bytes_of(&V::A(vec![
                    V::F(1.0),
                    V::A(vec![]),
                    raw("cf8000000000000000"),
                ])),
                "integer out of range",
            ),
            (
                batch_of(vec![V::U(3)]),
                "event is neither a map nor an array",
            ),
            (batch_of(vec![V::M(vec![])]), "event map has no type"),
            (
                batch_of(vec![V::M(vec![(V::S("type"), V::U(1))])]),
                "event type is not a string",
            ),
            (
                batch_of(vec![V::A(vec![V::Nil])]),
                "event type is not a string",
            ),
            (
                stored_with("token_ids", V::A(vec![V::S("1")])),
                "expected integer",
            ),
            (
                stored_with("token_ids", V::A(vec![V::I(-1)])),
                "token id out of range",
            ),
            (
                stored_with("token_ids", V::A(vec![V::U(1 << 32)])),
                "token id out of range",
            ),
            (stored_with("block_size", V::I(-1)), "integer out of range"),
            (stored_with("block_size", V::Nil), "expected integer"),
            (
                stored_with("block_hashes", V::A(vec![V::S("h")])),
                "expected block hash (integer or bin)",
            ),
            (stored_with("block_hashes", V::Nil), "expected array"),
            (stored_with("medium", V::U(1)), "expected string"),
            (stored_with("extra_keys", V::U(1)), "expected array"),
            (
                stored_with("extra_keys", V::A(vec![V::U(1)])),
                "expected array",
            ),
            (stored_with("lora_id", V::F(1.0)), "expected integer"),
            (
                stored_with("token_ids", V::A(vec![])),
                "BlockStored has no block_hashes",
            ),
            (
                batch_of(vec![V::M(vec![(V::S("type"), V::S("BlockRemoved"))])]),
                "BlockRemoved has no block_hashes",
            ),
            (
                batch_of(vec![V::M(vec![(V::S("x"), raw("c1"))])]),
                "invalid msgpack marker",
            ),
        ];
        for (buf, reason) in cases {
            assert_eq!(decode_err(&buf).1, reason, "{buf:02x?}");
        }
        // The offset points at the offending value.
        let buf = stored_with("block_size", V::S("x"));
        let at = buf.len() - 3; // "x" is a1 78, then the rank
        assert_eq!(decode_err(&buf), (at, "expected integer"));
    }

    #[test]
    fn invalid_utf8_fails() {
        let bad = raw("a2c328");
        let stored_with = |key: &'static str, v: V| {
            batch_of(vec![V::M(vec![
                (V::S("type"), V::S("BlockStored")),
                (V::S(key), v),
            ])])
        };
        for key in ["medium", "lora_name", "kv_cache_spec_kind", "session_id"] {
            let buf = stored_with(key, raw("a2c328"));
            let at = buf.len() - 4;
            assert_eq!(decode_err(&buf), (at, "invalid utf-8 in string"), "{key}");
        }
        let buf = stored_with("extra_keys", V::A(vec![V::A(vec![raw("a2c328")])]));
        assert_eq!(decode_err(&buf).1, "invalid utf-8 in string");
        let buf = stored_with(
            "extra_keys",
            V::A(vec![V::A(vec![V::A(vec![bad, V::U(1)])])]),
        );
        assert_eq!(decode_err(&buf).1, "invalid utf-8 in string");
        // Unknown keys and unknown type names are compared as bytes, never decoded as text.
        let buf = batch_of(vec![V::M(vec![
            (raw("a2c328"), V::Nil),
            (V::S("type"), raw("a2c328")),
        ])]);
        assert!(decode_batch(&buf).unwrap().events.is_empty());
    }

    #[test]
    fn fuzz_seeds_decode() {
        let seeds: [&[u8]; 6] = [
            include_bytes!("../fuzz/seeds/golden_stored.bin"),
            include_bytes!("../fuzz/seeds/golden_removed_cleared.bin"),
            include_bytes!("../fuzz/seeds/golden_bytes_hash.bin"),
            include_bytes!("../fuzz/seeds/golden_legacy.bin"),
            include_bytes!("../fuzz/seeds/rich.bin"),
            include_bytes!("../fuzz/seeds/two_elements_int_ts.bin"),
        ];
        assert_eq!(seeds[0], &hex(GOLDEN_STORED)[..]);
        assert_eq!(seeds[1], &hex(GOLDEN_REMOVED)[..]);
        assert_eq!(seeds[2], &hex(GOLDEN_BYTES_HASH)[..]);
        assert_eq!(seeds[3], &hex(GOLDEN_LEGACY)[..]);
        for seed in seeds {
            check_reencode(seed).unwrap();
        }
        // The rich seed: every field, every extra-key kind, legacy events, an unknown event.
        let b = decode_batch(seeds[4]).unwrap();
        assert_eq!(b.ts, 1.7e9);
        assert_eq!(b.data_parallel_rank, Some(3));
        assert_eq!(b.events.len(), 5);
        let e = stored(&b, 0);
        assert_eq!(
            e.block_hashes,
            vec![
                EngineHash(u64::MAX),
                EngineHash(300),
                EngineHash(70000),
                EngineHash(0x010203)
            ]
        );
        assert_eq!(e.parent_block_hash, Some(EngineHash(5_000_000_000)));
        assert_eq!(e.token_ids.len(), 16);
        assert_eq!(e.token_ids[7], u32::MAX);
        assert_eq!(e.lora_id, Some(-5));
        assert_eq!(e.medium, Some(Medium::Storage));
        assert_eq!(e.lora_name.as_deref(), Some(&*"x".repeat(40)));
        let keys = e.extra_keys.as_ref().unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0].as_ref().unwrap().len(), 7);
        assert_eq!(
            keys[0].as_ref().unwrap()[6],
            ExtraKey::Other(hex("9201a161"))
        );
        assert_eq!(e.kv_cache_spec_sliding_window, Some(4096));
        assert_eq!(e.session_id.as_deref(), Some("sess"));
        let b = decode_batch(seeds[5]).unwrap();
        assert_eq!((b.ts, b.data_parallel_rank), (1700000000.0, None));
        assert_eq!(b.events, vec![KvEvent::AllBlocksCleared]);
    }

    // --- property tests -----------------------------------------------------------------------

    fn hash_s() -> impl Strategy<Value = EngineHash> {
        prop_oneof![any::<u64>(), 0u64..300, 0u64..70_000, 0u64..5_000_000_000].prop_map(EngineHash)
    }

    fn int_s() -> impl Strategy<Value = i64> {
        prop_oneof![
            any::<i64>(),
            -300i64..300,
            -70_000i64..70_000,
            -5_000_000_000i64..5_000_000_000
        ]
    }

    fn string_s() -> impl Strategy<Value = String> {
        prop_oneof![9 => ".{0,40}", 1 => ".{30,300}"]
    }

    fn medium_s() -> impl Strategy<Value = Medium> {
        prop_oneof![
            Just(Medium::Gpu),
            Just(Medium::Cpu),
            Just(Medium::Storage),
            "[a-z]{0,8}X".prop_map(Medium::Other),
        ]
    }

    /// msgpack values that decode as `ExtraKey::Other`.
    fn other_raw_s() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(hex("c0")),
            Just(hex("c2")),
            Just(hex("c3")),
            any::<f64>().prop_map(|f| bytes_of(&V::F(f))),
            Just(hex("80")),
            Just(hex("8101a161")),
            Just(hex("93010203")),
            Just(hex("9201a161")),
            Just(hex("92a1619101")),
            Just(hex("cfffffffffffffffff")),
            Just(hex("d40100")),
            Just(hex("c70301616263")),
        ]
    }

    fn extra_key_s() -> impl Strategy<Value = ExtraKey> {
        prop_oneof![
            string_s().prop_map(ExtraKey::Str),
            (string_s(), int_s())
                .prop_map(|(identifier, offset)| ExtraKey::Mm { identifier, offset }),
            vec(any::<u8>(), 0..300).prop_map(ExtraKey::Bytes),
            int_s().prop_map(ExtraKey::Int),
            other_raw_s().prop_map(ExtraKey::Other),
        ]
    }

    fn stored_s() -> impl Strategy<Value = BlockStored> {
        let head = (
            vec(hash_s(), 0..20),
            proptest::option::of(hash_s()),
            vec(prop_oneof![any::<u32>(), 0u32..128, 0u32..70_000], 0..70),
            any::<u32>(),
            proptest::option::of(int_s()),
            proptest::option::of(medium_s()),
            proptest::option::of(string_s()),
        );
        let tail = (
            proptest::option::of(vec(proptest::option::of(vec(extra_key_s(), 0..4)), 0..4)),
            proptest::option::of(int_s()),
            proptest::option::of(string_s()),
            proptest::option::of(int_s()),
            proptest::option::of(string_s()),
            proptest::option::of(string_s()),
            proptest::option::of(string_s()),
        );
        (head, tail).prop_map(
            |(
                (
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    lora_id,
                    medium,
                    lora_name,
                ),
                (
                    extra_keys,
                    group_idx,
                    kv_cache_spec_kind,
                    kv_cache_spec_sliding_window,
                    locality,
                    ownership,
                    session_id,
                ),
            )| BlockStored {
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
            },
        )
    }

    fn removed_s() -> impl Strategy<Value = BlockRemoved> {
        (
            vec(hash_s(), 0..4),
            proptest::option::of(medium_s()),
            proptest::option::of(int_s()),
            proptest::option::of(string_s()),
            proptest::option::of(string_s()),
        )
            .prop_map(|(block_hashes, medium, group_idx, locality, ownership)| {
                BlockRemoved {
                    block_hashes,
                    medium,
                    group_idx,
                    locality,
                    ownership,
                }
            })
    }

    fn batch_s() -> impl Strategy<Value = EventBatch> {
        let event = prop_oneof![
            stored_s().prop_map(KvEvent::BlockStored),
            removed_s().prop_map(KvEvent::BlockRemoved),
            Just(KvEvent::AllBlocksCleared),
        ];
        (
            any::<f64>(),
            vec(event, 0..5),
            proptest::option::of(int_s()),
        )
            .prop_map(|(ts, events, data_parallel_rank)| EventBatch {
                ts,
                events,
                data_parallel_rank,
            })
    }

    /// Equality with `ts` compared by bits (NaN-safe).
    fn same(a: &EventBatch, b: &EventBatch) -> bool {
        a.ts.to_bits() == b.ts.to_bits()
            && a.events == b.events
            && a.data_parallel_rank == b.data_parallel_rank
    }

    /// The fuzz target's property: whatever decodes re-encodes to something that decodes the
    /// same, in both forms, and encoding is stable.
    fn check_reencode(buf: &[u8]) -> std::result::Result<(), TestCaseError> {
        if let Ok(a) = decode_batch(buf) {
            let enc = encode(&a);
            let b = decode_batch(&enc).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(same(&a, &b));
            prop_assert_eq!(encode(&b), enc);
            let c =
                decode_batch(&encode_legacy(&a)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(same(&a, &c));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn prop_roundtrip_map_form(batch in batch_s()) {
            let enc = encode(&batch);
            let back = decode_batch(&enc).unwrap();
            prop_assert!(same(&back, &batch), "{:?} != {:?}", back, batch);
            prop_assert_eq!(encode(&back), enc);
        }

        #[test]
        fn prop_roundtrip_legacy_form(batch in batch_s()) {
            let back = decode_batch(&encode_legacy(&batch)).unwrap();
            prop_assert!(same(&back, &batch), "{:?} != {:?}", back, batch);
        }

        #[test]
        fn prop_truncated_encodings_fail(batch in batch_s(), cut in any::<prop::sample::Index>()) {
            let enc = encode(&batch);
            let len = cut.index(enc.len());
            prop_assert!(decode_batch(&enc[..len]).is_err());
        }

        #[test]
        fn prop_random_bytes_never_panic(buf in vec(any::<u8>(), 0..600)) {
            check_reencode(&buf)?;
        }

        #[test]
        fn prop_mutated_goldens_never_panic(
            which in 0usize..4,
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut buf = hex([GOLDEN_STORED, GOLDEN_REMOVED, GOLDEN_BYTES_HASH, GOLDEN_LEGACY][which]);
            for (at, byte) in edits {
                let i = at.index(buf.len());
                buf[i] = byte;
            }
            check_reencode(&buf)?;
        }
    }
}
