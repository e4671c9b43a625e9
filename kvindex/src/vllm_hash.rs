//! vLLM's own prefix-cache block hashes, reproduced bit-exactly.
//!
//! The index keys blocks by the hash each engine publishes in its KV events. A client that only
//! has token ids (a router deciding where to send a prompt, say) must compute the very same hashes
//! to ask the index which engines hold a prefix. This module does that, for **vLLM 0.32** exactly:
//! the hash input (tagged extra keys, the `NONE_HASH` seed rules, the serializers) changes between
//! vLLM versions, so values computed here match that version only.
//!
//! What vLLM computes (`vllm/utils/hashing.py`, `vllm/v1/core/kv_cache_utils.py`):
//!
//! * `NONE_HASH = hash_fn(seed)`, where the seed is the *string* `PYTHONHASHSEED` if that is set,
//!   else `"vllm-none-hash"` for `sha256`/`sha256_cbor`, else (xxhash) a random string per process.
//! * `block_hash = hash_fn((parent_digest or NONE_HASH, tuple(block_tokens), extra_keys))`, chained
//!   over the *full* blocks of a request; `extra_keys` is `None` or a tuple of tagged tuples.
//! * `hash_fn` serializes with pickle protocol 5 (`sha256`, `xxhash`) or canonical CBOR
//!   (`sha256_cbor`, `xxhash_cbor`), then digests with SHA-256 (32 bytes) or XXH3-128 (16 bytes,
//!   canonical big-endian form).
//! * Events carry [`Digest::to_u64`]: the last 8 digest bytes read big-endian.
//!
//! Both serializers are re-implemented here for the few Python types that occur (bytes, str, int,
//! tuple, None), writing into one reusable buffer per call chain; no per-token allocation happens.
//! Pickle output of blocks that carry extra keys depends on CPython object identity (memo
//! back-references), so those hashes are refused with [`IndexError::PickleExtraKeys`]; run vLLM
//! with `--prefix-caching-hash-algo sha256_cbor` when extra keys (LoRA, multimodal, cache salt)
//! matter.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::error::IndexError;
use crate::event::EngineHash;

/// The `NONE_HASH` seed vLLM uses for `sha256` and `sha256_cbor` when `PYTHONHASHSEED` is unset.
pub const DEFAULT_NONE_HASH_SEED: &str = "vllm-none-hash";

/// A value of vLLM's `--prefix-caching-hash-algo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VllmHashAlgo {
    /// `sha256` (vLLM's default): pickle protocol 5, SHA-256.
    #[default]
    Sha256,
    /// `sha256_cbor`: canonical CBOR, SHA-256. The one to use across languages.
    Sha256Cbor,
    /// `xxhash`: pickle protocol 5, XXH3-128.
    Xxhash,
    /// `xxhash_cbor`: canonical CBOR, XXH3-128.
    XxhashCbor,
}

impl VllmHashAlgo {
    /// All algorithms, in vLLM's order.
    pub const ALL: [VllmHashAlgo; 4] = [
        VllmHashAlgo::Sha256,
        VllmHashAlgo::Sha256Cbor,
        VllmHashAlgo::Xxhash,
        VllmHashAlgo::XxhashCbor,
    ];

    /// The name vLLM uses for this algorithm.
    pub fn as_str(self) -> &'static str {
        match self {
            VllmHashAlgo::Sha256 => "sha256",
            VllmHashAlgo::Sha256Cbor => "sha256_cbor",
            VllmHashAlgo::Xxhash => "xxhash",
            VllmHashAlgo::XxhashCbor => "xxhash_cbor",
        }
    }

    /// The digest length in bytes: 32 for SHA-256, 16 for XXH3-128.
    pub fn digest_len(self) -> usize {
        match self {
            VllmHashAlgo::Sha256 | VllmHashAlgo::Sha256Cbor => 32,
            VllmHashAlgo::Xxhash | VllmHashAlgo::XxhashCbor => 16,
        }
    }

    /// Whether the algorithm serializes with canonical CBOR (else with pickle).
    pub fn is_cbor(self) -> bool {
        matches!(self, VllmHashAlgo::Sha256Cbor | VllmHashAlgo::XxhashCbor)
    }

    /// Digests already-serialized bytes.
    fn digest(self, data: &[u8]) -> Digest {
        match self {
            VllmHashAlgo::Sha256 | VllmHashAlgo::Sha256Cbor => {
                Digest::from_array32(Sha256::digest(data).into())
            }
            VllmHashAlgo::Xxhash | VllmHashAlgo::XxhashCbor => {
                Digest::from_array16(xxhash_rust::xxh3::xxh3_128(data).to_be_bytes())
            }
        }
    }
}

impl FromStr for VllmHashAlgo {
    type Err = IndexError;

    /// Parses vLLM's exact (lower-case) name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VllmHashAlgo::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| IndexError::UnknownHashAlgo(s.to_owned()))
    }
}

impl fmt::Display for VllmHashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One block-hash extra key in the *tagged* form vLLM 0.32 hashes (not the untagged form its
/// events publish, see [`crate::event::ExtraKey`]).
///
/// vLLM puts them in this order: LoRA, multimodal items, cache salt, prompt embeddings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VllmExtraKey {
    /// `("lora", lora_name, lora_path)`, on every block of a LoRA request.
    Lora {
        /// The LoRA adapter's name.
        name: String,
        /// The LoRA adapter's path (not present in events).
        path: String,
    },
    /// `("mm", identifier, offset)`, for each multimodal item overlapping the block.
    Mm {
        /// The item's hash string (prefixed with the LoRA name where one applies).
        identifier: String,
        /// The item's start relative to the block start; negative if it began in an earlier block.
        offset: i64,
    },
    /// `("cache_salt", salt)`, on the first block of a request only.
    CacheSalt(String),
    /// `("prompt_embeds", digest)`: SHA-256 of the raw bytes of the block's embedding tensor.
    PromptEmbeds([u8; 32]),
}

/// A block digest: 32 bytes (SHA-256) or 16 bytes (XXH3-128).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    /// The digest in the first `len` bytes; the rest is zero.
    bytes: [u8; 32],
    len: u8,
}

impl Digest {
    fn from_array32(bytes: [u8; 32]) -> Self {
        Digest { bytes, len: 32 }
    }

    fn from_array16(src: [u8; 16]) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(&src);
        Digest { bytes, len: 16 }
    }

    /// A digest from its bytes, which must be 16 or 32 long (as vLLM's parent hashes are).
    pub fn from_slice(src: &[u8]) -> Result<Self, IndexError> {
        if let Ok(a) = <[u8; 32]>::try_from(src) {
            Ok(Digest::from_array32(a))
        } else if let Ok(a) = <[u8; 16]>::try_from(src) {
            Ok(Digest::from_array16(a))
        } else {
            Err(IndexError::InvalidArgument(format!(
                "a vLLM block digest has 16 or 32 bytes, not {}",
                src.len()
            )))
        }
    }

    /// The digest bytes, exactly as vLLM holds them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// vLLM's int form of the digest, as its events carry it by default: the last 8 bytes read
    /// big-endian (`int.from_bytes(digest, "big") & (2**64 - 1)`).
    pub fn to_u64(&self) -> u64 {
        let end = usize::from(self.len);
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&self.bytes[end - 8..end]);
        u64::from_be_bytes(tail)
    }

    /// The hash under which the index knows this block ([`Digest::to_u64`]).
    pub fn engine_hash(&self) -> EngineHash {
        EngineHash(self.to_u64())
    }
}

impl AsRef<[u8]> for Digest {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Display for Digest {
    /// Lower-case hex, like Python's `digest.hex()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Computes vLLM 0.32 block hashes for one algorithm and one `NONE_HASH` seed.
#[derive(Clone, Debug)]
pub struct VllmHasher {
    algo: VllmHashAlgo,
    none_hash: Digest,
}

impl VllmHasher {
    /// A hasher whose `NONE_HASH` is `hash_fn(seed)`.
    ///
    /// `seed` is the engine's `PYTHONHASHSEED` string if it had one set (used verbatim, e.g.
    /// `"0"`), else [`DEFAULT_NONE_HASH_SEED`] for the SHA-256 algorithms.
    pub fn new(algo: VllmHashAlgo, seed: &str) -> Self {
        let mut buf = Vec::with_capacity(seed.len() + 16);
        if algo.is_cbor() {
            cbor::text(&mut buf, seed);
        } else {
            let mut p = Pickler::begin(&mut buf);
            p.save_str(seed);
            p.finish();
        }
        VllmHasher {
            algo,
            none_hash: algo.digest(&buf),
        }
    }

    /// A hasher with the seed vLLM uses when `PYTHONHASHSEED` is unset.
    ///
    /// That is [`DEFAULT_NONE_HASH_SEED`] for `sha256` and `sha256_cbor`. For the xxhash
    /// algorithms vLLM then draws a random seed per process, so their hashes cannot be reproduced
    /// and this fails with [`IndexError::InvalidArgument`]: pass the engine's `PYTHONHASHSEED` to
    /// [`VllmHasher::new`] instead.
    pub fn with_default_seed(algo: VllmHashAlgo) -> Result<Self, IndexError> {
        match algo {
            VllmHashAlgo::Sha256 | VllmHashAlgo::Sha256Cbor => {
                Ok(VllmHasher::new(algo, DEFAULT_NONE_HASH_SEED))
            }
            VllmHashAlgo::Xxhash | VllmHashAlgo::XxhashCbor => {
                Err(IndexError::InvalidArgument(format!(
                    "vLLM seeds {algo} NONE_HASH randomly per process unless PYTHONHASHSEED is \
                     set; pass that seed explicitly"
                )))
            }
        }
    }

    /// The algorithm.
    pub fn algo(&self) -> VllmHashAlgo {
        self.algo
    }

    /// `NONE_HASH`, the parent of a request's first block.
    pub fn none_hash(&self) -> &[u8] {
        self.none_hash.as_bytes()
    }

    /// The hash of one full block: `hash_fn((parent or NONE_HASH, tokens, extra or None))`.
    ///
    /// `parent` is the previous block's full digest; `None` or empty means `NONE_HASH`. An empty
    /// `extra` is hashed as Python `None`. The pickle algorithms refuse non-empty `extra` with
    /// [`IndexError::PickleExtraKeys`].
    pub fn block_hash(
        &self,
        parent: Option<&[u8]>,
        tokens: &[u32],
        extra: &[VllmExtraKey],
    ) -> Result<Digest, IndexError> {
        let mut buf = Vec::new();
        self.block_hash_in(&mut buf, parent, tokens, extra)
    }

    /// The chained hashes of the full blocks of `tokens` (a trailing partial block is ignored),
    /// starting from `NONE_HASH`, without extra keys.
    ///
    /// Fails with [`IndexError::InvalidArgument`] if `block_size` is 0.
    pub fn hash_blocks(
        &self,
        tokens: &[u32],
        block_size: usize,
    ) -> Result<Vec<Digest>, IndexError> {
        self.hash_blocks_with(tokens, block_size, |_, _| {})
    }

    /// Like [`VllmHasher::hash_blocks`], with extra keys per block.
    ///
    /// `extra_keys(i, keys)` is called for block `i` (tokens `i * block_size ..`) with `keys`
    /// empty, and pushes that block's keys in vLLM's order. For a LoRA request with a cache salt:
    ///
    /// ```
    /// # use kvindex::vllm_hash::{VllmExtraKey, VllmHashAlgo, VllmHasher};
    /// let hasher = VllmHasher::with_default_seed(VllmHashAlgo::Sha256Cbor)?;
    /// let lora = VllmExtraKey::Lora { name: "my-lora".into(), path: "/path/to/lora".into() };
    /// let salt = VllmExtraKey::CacheSalt("tenant-a".into());
    /// let tokens: Vec<u32> = (1..=40).collect();
    /// let hashes = hasher.hash_blocks_with(&tokens, 16, |i, keys| {
    ///     keys.push(lora.clone());
    ///     if i == 0 {
    ///         keys.push(salt.clone());
    ///     }
    /// })?;
    /// assert_eq!(hashes.len(), 2);
    /// assert_eq!(hashes[0].to_u64(), 9760758178144695293);
    /// # Ok::<(), kvindex::IndexError>(())
    /// ```
    pub fn hash_blocks_with<F>(
        &self,
        tokens: &[u32],
        block_size: usize,
        mut extra_keys: F,
    ) -> Result<Vec<Digest>, IndexError>
    where
        F: FnMut(usize, &mut Vec<VllmExtraKey>),
    {
        if block_size == 0 {
            return Err(IndexError::InvalidArgument(
                "block size must be positive".to_owned(),
            ));
        }
        let mut out = Vec::with_capacity(tokens.len() / block_size);
        let mut buf = Vec::new();
        let mut keys = Vec::new();
        let mut parent = self.none_hash;
        for (i, block) in tokens.chunks_exact(block_size).enumerate() {
            keys.clear();
            extra_keys(i, &mut keys);
            parent = self.block_hash_in(&mut buf, Some(parent.as_bytes()), block, &keys)?;
            out.push(parent);
        }
        Ok(out)
    }

    /// [`VllmHasher::block_hash`], serializing into `buf` (cleared first).
    fn block_hash_in(
        &self,
        buf: &mut Vec<u8>,
        parent: Option<&[u8]>,
        tokens: &[u32],
        extra: &[VllmExtraKey],
    ) -> Result<Digest, IndexError> {
        let parent = match parent {
            Some(p) if !p.is_empty() => p,
            _ => self.none_hash.as_bytes(),
        };
        buf.clear();
        if self.algo.is_cbor() {
            cbor::block(buf, parent, tokens, extra);
        } else {
            if !extra.is_empty() {
                return Err(IndexError::PickleExtraKeys);
            }
            let mut p = Pickler::begin(buf);
            p.save_block(parent, tokens);
            p.finish();
        }
        Ok(self.algo.digest(buf))
    }
}

/// Canonical CBOR (as `cbor2.dumps(obj, canonical=True)` writes it) for the types in a block-hash
/// input: definite lengths, shortest heads, tuples as arrays.
mod cbor {
    use super::VllmExtraKey;

    const UINT: u8 = 0;
    const NINT: u8 = 1;
    const BYTES: u8 = 2;
    const TEXT: u8 = 3;
    const ARRAY: u8 = 4;
    const NULL: u8 = 0xf6;

    /// A head: major type and argument, in the shortest form.
    pub(super) fn head(buf: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        if n < 24 {
            buf.push(m | n as u8);
        } else if n <= 0xff {
            buf.extend_from_slice(&[m | 24, n as u8]);
        } else if n <= 0xffff {
            let b = (n as u16).to_be_bytes();
            buf.extend_from_slice(&[m | 25, b[0], b[1]]);
        } else if n <= 0xffff_ffff {
            let b = (n as u32).to_be_bytes();
            buf.extend_from_slice(&[m | 26, b[0], b[1], b[2], b[3]]);
        } else {
            buf.push(m | 27);
            buf.extend_from_slice(&n.to_be_bytes());
        }
    }

    /// An int: major type 0, or major type 1 with argument `-1 - v` when negative.
    pub(super) fn int(buf: &mut Vec<u8>, v: i64) {
        if v >= 0 {
            head(buf, UINT, v.unsigned_abs());
        } else {
            head(buf, NINT, v.unsigned_abs() - 1);
        }
    }

    pub(super) fn bytes(buf: &mut Vec<u8>, b: &[u8]) {
        head(buf, BYTES, b.len() as u64);
        buf.extend_from_slice(b);
    }

    pub(super) fn text(buf: &mut Vec<u8>, s: &str) {
        head(buf, TEXT, s.len() as u64);
        buf.extend_from_slice(s.as_bytes());
    }

    fn array(buf: &mut Vec<u8>, len: usize) {
        head(buf, ARRAY, len as u64);
    }

    /// One tagged extra key, a 2- or 3-element array.
    pub(super) fn extra_key(buf: &mut Vec<u8>, key: &VllmExtraKey) {
        match key {
            VllmExtraKey::Lora { name, path } => {
                array(buf, 3);
                text(buf, "lora");
                text(buf, name);
                text(buf, path);
            }
            VllmExtraKey::Mm { identifier, offset } => {
                array(buf, 3);
                text(buf, "mm");
                text(buf, identifier);
                int(buf, *offset);
            }
            VllmExtraKey::CacheSalt(salt) => {
                array(buf, 2);
                text(buf, "cache_salt");
                text(buf, salt);
            }
            VllmExtraKey::PromptEmbeds(digest) => {
                array(buf, 2);
                text(buf, "prompt_embeds");
                bytes(buf, digest);
            }
        }
    }

    /// `(parent, tuple(tokens), extra_keys or None)`.
    pub(super) fn block(buf: &mut Vec<u8>, parent: &[u8], tokens: &[u32], extra: &[VllmExtraKey]) {
        // Worst case 5 bytes a token; one reservation keeps the token loop allocation-free.
        buf.reserve(16 + parent.len() + 5 * tokens.len());
        array(buf, 3);
        bytes(buf, parent);
        array(buf, tokens.len());
        for &t in tokens {
            head(buf, UINT, u64::from(t));
        }
        if extra.is_empty() {
            buf.push(NULL);
        } else {
            array(buf, extra.len());
            for key in extra {
                extra_key(buf, key);
            }
        }
    }
}

/// Opcodes of pickle protocol 5 that the block-hash inputs use.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const NONE: u8 = b'N';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES: u8 = b'B';
    pub const BINBYTES8: u8 = 0x8e;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE: u8 = b'X';
    pub const BINUNICODE8: u8 = 0x8d;
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE1: u8 = 0x85;
    pub const MEMOIZE: u8 = 0x94;
}

/// `FRAME` opcode plus its u64 length.
const FRAME_HEADER_SIZE: usize = 9;
/// CPython commits a frame at the first object boundary at or past this size.
const FRAME_SIZE_TARGET: usize = 64 * 1024;
/// Frames shorter than this get no `FRAME` header.
const FRAME_SIZE_MIN: usize = 4;

/// `pickle.dumps(obj, protocol=5)` as CPython's C pickler (`Modules/_pickle.c`) writes it, for
/// bytes, str, int, None and tuples of those whose objects are all distinct (so the memo never
/// yields a back-reference).
///
/// Framing follows the C code: a frame opens at the first write after `PROTO`; at the start of
/// every object (`save()`), a frame holding `FRAME_SIZE_TARGET` bytes or more is closed; bytes or
/// str payloads of that size or more are written outside any frame; frames under
/// `FRAME_SIZE_MIN` bytes lose their header.
struct Pickler<'a> {
    buf: &'a mut Vec<u8>,
    /// Where the open frame's header placeholder starts.
    frame_start: Option<usize>,
    framing: bool,
}

impl<'a> Pickler<'a> {
    /// Clears `buf` and writes the protocol header.
    fn begin(buf: &'a mut Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(&[op::PROTO, 5]);
        Pickler {
            buf,
            frame_start: None,
            framing: true,
        }
    }

    /// Writes `STOP` and closes the last frame.
    fn finish(mut self) {
        self.write(&[op::STOP]);
        self.commit_frame();
    }

    /// `_Pickler_Write`: appends, opening a frame first if none is open.
    fn write(&mut self, data: &[u8]) {
        if self.framing && self.frame_start.is_none() {
            self.frame_start = Some(self.buf.len());
            self.buf.extend_from_slice(&[0; FRAME_HEADER_SIZE]);
        }
        self.buf.extend_from_slice(data);
    }

    /// `_Pickler_CommitFrame`: fills in the open frame's header, or drops it if the frame is tiny.
    fn commit_frame(&mut self) {
        let Some(start) = self.frame_start.take() else {
            return;
        };
        let frame_len = self.buf.len() - start - FRAME_HEADER_SIZE;
        if frame_len >= FRAME_SIZE_MIN {
            self.buf[start] = op::FRAME;
            self.buf[start + 1..start + FRAME_HEADER_SIZE]
                .copy_from_slice(&(frame_len as u64).to_le_bytes());
        } else {
            self.buf.drain(start..start + FRAME_HEADER_SIZE);
        }
    }

    /// `_Pickler_OpcodeBoundary`, called at the start of every `save()`.
    fn boundary(&mut self) {
        if let Some(start) = self.frame_start {
            if self.buf.len() - start - FRAME_HEADER_SIZE >= FRAME_SIZE_TARGET {
                self.commit_frame();
            }
        }
    }

    /// `_Pickler_write_bytes`: a header and a payload; large payloads go outside any frame.
    fn write_payload(&mut self, header: &[u8], payload: &[u8]) {
        let bypass = payload.len() >= FRAME_SIZE_TARGET;
        if bypass {
            self.commit_frame();
            self.framing = false;
        }
        self.write(header);
        self.write(payload);
        self.framing = true;
    }

    /// A length-prefixed payload with a 1-, 4- or 8-byte length, then `MEMOIZE`.
    fn save_sized(&mut self, ops: [u8; 3], payload: &[u8]) {
        self.boundary();
        let n = payload.len();
        let mut header = [0u8; 9];
        let header_len = if let Ok(n8) = u8::try_from(n) {
            header[0] = ops[0];
            header[1] = n8;
            2
        } else if let Ok(n32) = u32::try_from(n) {
            header[0] = ops[1];
            header[1..5].copy_from_slice(&n32.to_le_bytes());
            5
        } else {
            header[0] = ops[2];
            header[1..9].copy_from_slice(&(n as u64).to_le_bytes());
            9
        };
        self.write_payload(&header[..header_len], payload);
        self.write(&[op::MEMOIZE]);
    }

    /// A Python `bytes`.
    fn save_bytes(&mut self, b: &[u8]) {
        self.save_sized([op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8], b);
    }

    /// A Python `str`.
    fn save_str(&mut self, s: &str) {
        self.save_sized(
            [op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8],
            s.as_bytes(),
        );
    }

    /// `None`.
    fn save_none(&mut self) {
        self.boundary();
        self.write(&[op::NONE]);
    }

    /// A Python `int`: `K`, `M`, `J` within the signed 32-bit range, else `LONG1` with the
    /// shortest little-endian two's-complement bytes.
    fn save_int(&mut self, v: i64) {
        self.boundary();
        if let Ok(v32) = i32::try_from(v) {
            let b = v32.to_le_bytes();
            if b[2] != 0 || b[3] != 0 {
                self.write(&[op::BININT, b[0], b[1], b[2], b[3]]);
            } else if b[1] != 0 {
                self.write(&[op::BININT2, b[0], b[1]]);
            } else {
                self.write(&[op::BININT1, b[0]]);
            }
            return;
        }
        // |v| >= 2^31 here, so 4..=9 bytes with one spare sign byte, trimmed for -(2^(8k-1)).
        let nbits = 64 - v.unsigned_abs().leading_zeros() as usize;
        let mut nbytes = nbits / 8 + 1;
        let le = i128::from(v).to_le_bytes();
        if v < 0 && le[nbytes - 1] == 0xff && le[nbytes - 2] & 0x80 != 0 {
            nbytes -= 1;
        }
        let mut out = [0u8; 11];
        out[0] = op::LONG1;
        out[1] = nbytes as u8;
        out[2..2 + nbytes].copy_from_slice(&le[..nbytes]);
        self.write(&out[..2 + nbytes]);
    }

    /// A tuple of ints (`)`, `TUPLE1..3`, or `MARK … TUPLE`), memoized unless empty.
    fn save_int_tuple(&mut self, items: &[u32]) {
        self.boundary();
        if items.is_empty() {
            self.write(&[op::EMPTY_TUPLE]);
            return;
        }
        let long = items.len() > 3;
        if long {
            self.write(&[op::MARK]);
        }
        // Worst case 5 bytes an int; reserve once so the loop never reallocates.
        self.buf.reserve(5 * items.len() + 8);
        for &t in items {
            self.save_int(i64::from(t));
        }
        if long {
            self.write(&[op::TUPLE]);
        } else {
            self.write(&[op::TUPLE1 + (items.len() as u8 - 1)]);
        }
        self.write(&[op::MEMOIZE]);
    }

    /// `(parent, tuple(tokens), None)`.
    fn save_block(&mut self, parent: &[u8], tokens: &[u32]) {
        self.boundary();
        self.save_bytes(parent);
        self.save_int_tuple(tokens);
        self.save_none();
        self.write(&[op::TUPLE1 + 2]);
        self.write(&[op::MEMOIZE]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn range(a: u32, b: u32) -> Vec<u32> {
        (a..=b).collect()
    }

    /// One row of the table in vllm-interfaces.md 2.6.
    struct Row {
        algo: VllmHashAlgo,
        seed: &'static str,
        none_hash: &'static str,
        b1: (&'static str, u64),
        b2: (&'static str, u64),
    }

    const ROWS: [Row; 6] = [
        Row {
            algo: VllmHashAlgo::Sha256Cbor,
            seed: "vllm-none-hash",
            none_hash: "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0",
            b1: (
                "cd7c51bc5a8fc8643f383a2b9e01522fba7473c669e9270c7b0bf7bf7fd01682",
                8866452693264111234,
            ),
            b2: (
                "2533ea50426b36e9e4d68296cac6bce8cf602e46957d0fe40b368b33d87bf3bf",
                807986237951177663,
            ),
        },
        Row {
            algo: VllmHashAlgo::Sha256Cbor,
            seed: "0",
            none_hash: "4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e",
            b1: (
                "202da172482d928bbc42ab25b0151e2b895f13f41002e27b2ceabcfae6d332ea",
                3236607068019569386,
            ),
            b2: (
                "4a0a393805c6d2f0ed831000d41bb65980336c4c04895d5e26470bbec927f5bf",
                2758186210834249151,
            ),
        },
        Row {
            algo: VllmHashAlgo::Sha256,
            seed: "vllm-none-hash",
            none_hash: "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198",
            b1: (
                "7b255da405e1d722823892e4fef187b4d8ac78215d7f0dd2137bb037547f4caf",
                1403909460543360175,
            ),
            b2: (
                "8e717becdc2054b7a3223b7b844f462c0db0ac86287b752b16d077ad0843c577",
                1643945449041937783,
            ),
        },
        Row {
            algo: VllmHashAlgo::Sha256,
            seed: "0",
            none_hash: "1973e23848344dc43a988a9b478663803cfffe1243480253f9a3cf004b14aa7c",
            b1: (
                "bea72b7d33de03c1aa715efbb492d0e0d3801f00c1f985756896072ae8b31325",
                7536218907325174565,
            ),
            b2: (
                "2744667f6645310ff670b0c5d7c64987ffa5940de5a549f17d92dcbb5b559e31",
                9048537298590080561,
            ),
        },
        Row {
            algo: VllmHashAlgo::XxhashCbor,
            seed: "0",
            none_hash: "1ebe36576dcb573f26b99533a20aaeca",
            b1: ("c2d7a75070fc6d6b0c3fb0af456c1009", 882618318818381833),
            b2: ("93add93233ea572fb2e2b1685bac6f8d", 12890060145260523405),
        },
        Row {
            algo: VllmHashAlgo::Xxhash,
            seed: "0",
            none_hash: "6fb31cc38bba6066183f7f2104b9c051",
            b1: ("6ba7d7fc1608e5f0a4612b1b0c87458f", 11844795890135418255),
            b2: ("dbd92304eaa08219c5cf8f4ce18166b6", 14253768906014549686),
        },
    ];

    #[test]
    fn golden_table() {
        for row in &ROWS {
            let h = VllmHasher::new(row.algo, row.seed);
            let ctx = format!("{} seed {:?}", row.algo, row.seed);
            assert_eq!(hex(h.none_hash()), row.none_hash, "NONE_HASH {ctx}");

            let b1 = h.block_hash(None, &range(1, 16), &[]).unwrap();
            assert_eq!(b1.to_string(), row.b1.0, "block 1 {ctx}");
            assert_eq!(b1.to_u64(), row.b1.1, "block 1 u64 {ctx}");
            assert_eq!(b1.as_bytes().len(), row.algo.digest_len());

            let b2 = h
                .block_hash(Some(b1.as_bytes()), &range(17, 32), &[])
                .unwrap();
            assert_eq!(b2.to_string(), row.b2.0, "block 2 {ctx}");
            assert_eq!(b2.to_u64(), row.b2.1, "block 2 u64 {ctx}");
            assert_eq!(b2.engine_hash(), EngineHash(row.b2.1));

            // Chained form, with a trailing partial block that must be ignored.
            let chained = h.hash_blocks(&range(1, 40), 16).unwrap();
            assert_eq!(chained, vec![b1, b2], "chained {ctx}");
        }
    }

    #[test]
    fn default_seeds() {
        for algo in [VllmHashAlgo::Sha256, VllmHashAlgo::Sha256Cbor] {
            let d = VllmHasher::with_default_seed(algo).unwrap();
            assert_eq!(
                d.none_hash(),
                VllmHasher::new(algo, DEFAULT_NONE_HASH_SEED).none_hash()
            );
            assert_eq!(d.algo(), algo);
        }
        assert_eq!(
            hex(VllmHasher::with_default_seed(VllmHashAlgo::Sha256Cbor)
                .unwrap()
                .none_hash()),
            ROWS[0].none_hash
        );
        for algo in [VllmHashAlgo::Xxhash, VllmHashAlgo::XxhashCbor] {
            assert!(matches!(
                VllmHasher::with_default_seed(algo),
                Err(IndexError::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn xxhash_with_literal_default_seed() {
        let cbor = VllmHasher::new(VllmHashAlgo::XxhashCbor, "vllm-none-hash");
        assert_eq!(hex(cbor.none_hash()), "a4e364baa0791a6f63bbf917db9b700d");
        let pickle = VllmHasher::new(VllmHashAlgo::Xxhash, "vllm-none-hash");
        assert_eq!(hex(pickle.none_hash()), "d98f72b9c430d985211489af307f0229");
    }

    fn lora_salt_keys() -> Vec<VllmExtraKey> {
        vec![
            VllmExtraKey::Lora {
                name: "my-lora".into(),
                path: "/path/to/lora".into(),
            },
            VllmExtraKey::CacheSalt("tenant-a".into()),
        ]
    }

    #[test]
    fn extra_keys_golden() {
        let h = VllmHasher::with_default_seed(VllmHashAlgo::Sha256Cbor).unwrap();
        let d = h
            .block_hash(None, &range(1, 16), &lora_salt_keys())
            .unwrap();
        assert_eq!(
            d.to_string(),
            "48bb184c8761a103a474bffae858c8a04e87210652dd7c4887752dd92acdb3fd"
        );
        assert_eq!(d.to_u64(), 9760758178144695293);

        let mut buf = Vec::new();
        cbor::block(&mut buf, h.none_hash(), &range(1, 16), &lora_salt_keys());
        let tail = unhex(
            "82 83 646c6f7261 676d792d6c6f7261 6d2f706174682f746f2f6c6f7261 \
             82 6a63616368655f73616c74 6874656e616e742d61",
        );
        assert!(buf.ends_with(&tail), "{}", hex(&buf));
        // array(3), bytes(32), array(16) of 1..16, then the keys.
        assert_eq!(buf.len(), 1 + 2 + 32 + 1 + 16 + tail.len());
    }

    #[test]
    fn extra_keys_refused_by_pickle() {
        for algo in [VllmHashAlgo::Sha256, VllmHashAlgo::Xxhash] {
            let h = VllmHasher::new(algo, "0");
            assert!(matches!(
                h.block_hash(None, &range(1, 16), &lora_salt_keys()),
                Err(IndexError::PickleExtraKeys)
            ));
            assert!(matches!(
                h.hash_blocks_with(&range(1, 16), 16, |_, k| k
                    .push(VllmExtraKey::CacheSalt("s".into()))),
                Err(IndexError::PickleExtraKeys)
            ));
        }
    }

    #[test]
    fn hash_blocks_with_keys_chains() {
        let h = VllmHasher::with_default_seed(VllmHashAlgo::Sha256Cbor).unwrap();
        let keys = lora_salt_keys();
        let tokens = range(1, 48);
        let got = h
            .hash_blocks_with(&tokens, 16, |i, k| {
                k.push(keys[0].clone());
                if i == 0 {
                    k.push(keys[1].clone());
                }
            })
            .unwrap();
        let b1 = h.block_hash(None, &tokens[..16], &keys).unwrap();
        let b2 = h
            .block_hash(Some(b1.as_bytes()), &tokens[16..32], &keys[..1])
            .unwrap();
        let b3 = h
            .block_hash(Some(b2.as_bytes()), &tokens[32..], &keys[..1])
            .unwrap();
        assert_eq!(got, vec![b1, b2, b3]);
        assert_eq!(got[0].to_u64(), 9760758178144695293);
        assert!(matches!(
            h.hash_blocks(&tokens, 0),
            Err(IndexError::InvalidArgument(_))
        ));
        assert!(h.hash_blocks(&tokens[..15], 16).unwrap().is_empty());
    }

    #[test]
    fn empty_parent_means_none_hash() {
        let h = VllmHasher::new(VllmHashAlgo::Sha256, "0");
        let a = h.block_hash(None, &range(1, 16), &[]).unwrap();
        let b = h.block_hash(Some(&[]), &range(1, 16), &[]).unwrap();
        let c = h
            .block_hash(Some(h.none_hash()), &range(1, 16), &[])
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn cbor_seed_bytes() {
        let mut buf = Vec::new();
        cbor::text(&mut buf, "vllm-none-hash");
        assert_eq!(buf, unhex("6e 766c6c6d2d6e6f6e652d68617368"));
    }

    #[test]
    fn cbor_block_bytes() {
        let h = VllmHasher::with_default_seed(VllmHashAlgo::Sha256Cbor).unwrap();
        let mut buf = Vec::new();
        cbor::block(&mut buf, h.none_hash(), &range(1, 16), &[]);
        let mut want = unhex("83 5820");
        want.extend_from_slice(h.none_hash());
        want.push(0x90);
        want.extend(1u8..=16);
        want.push(0xf6);
        assert_eq!(hex(&buf), hex(&want));
        assert!(hex(&buf).starts_with("8358209bd9"));
        assert!(hex(&buf).contains("eef0900102"));
    }

    #[test]
    fn cbor_int_heads() {
        let cases: [(i64, &str); 16] = [
            (0, "00"),
            (23, "17"),
            (24, "1818"),
            (255, "18ff"),
            (256, "190100"),
            (65535, "19ffff"),
            (65536, "1a00010000"),
            (4294967295, "1affffffff"),
            (4294967296, "1b0000000100000000"),
            (-1, "20"),
            (-24, "37"),
            (-25, "3818"),
            (-256, "38ff"),
            (-257, "390100"),
            (i64::MIN, "3b7fffffffffffffff"),
            (i64::MAX, "1b7fffffffffffffff"),
        ];
        for (v, want) in cases {
            let mut buf = Vec::new();
            cbor::int(&mut buf, v);
            assert_eq!(hex(&buf), want, "{v}");
        }
    }

    #[test]
    fn cbor_mm_negative_offset() {
        let mut buf = Vec::new();
        cbor::extra_key(
            &mut buf,
            &VllmExtraKey::Mm {
                identifier: "abc".into(),
                offset: -5,
            },
        );
        // array(3), "mm", "abc", -5 as major type 1 with argument 4.
        assert_eq!(hex(&buf), "83626d6d6361626324");

        buf.clear();
        cbor::extra_key(
            &mut buf,
            &VllmExtraKey::Mm {
                identifier: "abc".into(),
                offset: -300,
            },
        );
        assert_eq!(hex(&buf), "83626d6d6361626339012b");

        // And it hashes (CBOR only), differently from the positive offset.
        let h = VllmHasher::with_default_seed(VllmHashAlgo::Sha256Cbor).unwrap();
        let mm = |offset| VllmExtraKey::Mm {
            identifier: "abc".into(),
            offset,
        };
        let neg = h.block_hash(None, &range(1, 16), &[mm(-5)]).unwrap();
        let pos = h.block_hash(None, &range(1, 16), &[mm(5)]).unwrap();
        assert_ne!(neg, pos);
    }

    #[test]
    fn cbor_prompt_embeds_key() {
        let mut buf = Vec::new();
        cbor::extra_key(&mut buf, &VllmExtraKey::PromptEmbeds([0xab; 32]));
        let mut want = unhex("82 6d 70726f6d70745f656d62656473 5820");
        want.extend_from_slice(&[0xab; 32]);
        assert_eq!(buf, want);
    }

    fn pickle_str(s: &str) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut p = Pickler::begin(&mut buf);
        p.save_str(s);
        p.finish();
        buf
    }

    fn pickle_block(parent: &[u8], tokens: &[u32]) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut p = Pickler::begin(&mut buf);
        p.save_block(parent, tokens);
        p.finish();
        buf
    }

    #[test]
    fn pickle_seed_bytes() {
        let mut want = unhex("80 05 95 1200000000000000 8c 0e");
        want.extend_from_slice(b"vllm-none-hash");
        want.extend_from_slice(&[0x94, 0x2e]);
        assert_eq!(hex(&pickle_str("vllm-none-hash")), hex(&want));
    }

    #[test]
    fn pickle_block_bytes() {
        let h = VllmHasher::with_default_seed(VllmHashAlgo::Sha256).unwrap();
        let buf = pickle_block(h.none_hash(), &range(1, 16));
        let mut want = unhex("80 05 95 4a00000000000000 43 20");
        want.extend_from_slice(h.none_hash());
        want.extend_from_slice(&[0x94, 0x28]);
        for t in 1u8..=16 {
            want.extend_from_slice(&[0x4b, t]);
        }
        want.extend_from_slice(&unhex("74 94 4e 87 94 2e"));
        assert_eq!(hex(&buf), hex(&want));
    }

    #[test]
    fn pickle_short_tuples_and_tiny_frames() {
        // Expected bytes are CPython 3.11's `pickle.dumps(obj, 5)`.
        // (b"", (), None): empty bytes, and the empty tuple is not memoized.
        assert_eq!(
            hex(&pickle_block(b"", &[])),
            "8005950800000000000000430094294e87942e"
        );
        // (b"ab", (7,), None)
        assert_eq!(
            hex(&pickle_block(b"ab", &[7])),
            "8005950d0000000000000043026162944b0785944e87942e"
        );
        // (b"ab", (7, 300, 70000), None)
        assert_eq!(
            hex(&pickle_block(b"ab", &[7, 300, 70000])),
            "800595150000000000000043026162944b074d2c014a7011010087944e87942e"
        );
        // "": a 4-byte frame still gets its header.
        assert_eq!(hex(&pickle_str("")), "80059504000000000000008c00942e");
    }

    #[test]
    fn pickle_int_forms() {
        // CPython 3.11's `pickle.dumps(v, 5)`; frames under 4 bytes have no header.
        let cases: [(i64, &str); 14] = [
            (0, "80054b002e"),
            (255, "80054bff2e"),
            (256, "80059504000000000000004d00012e"),
            (65535, "80059504000000000000004dffff2e"),
            (65536, "80059506000000000000004a000001002e"),
            (2147483647, "80059506000000000000004affffff7f2e"),
            (2147483648, "80059508000000000000008a0500000080002e"),
            (4294967295, "80059508000000000000008a05ffffffff002e"),
            (-1, "80059506000000000000004affffffff2e"),
            (-2147483648, "80059506000000000000004a000000802e"),
            (-2147483649, "80059508000000000000008a05ffffff7fff2e"),
            (-1099511627776, "80059509000000000000008a060000000000ff2e"),
            (i64::MAX, "8005950b000000000000008a08ffffffffffffff7f2e"),
            (i64::MIN, "8005950b000000000000008a0800000000000000802e"),
        ];
        for (v, want) in cases {
            let mut buf = Vec::new();
            let mut p = Pickler::begin(&mut buf);
            p.save_int(v);
            p.finish();
            assert_eq!(hex(&buf), want, "{v}");
        }
    }

    #[test]
    fn pickle_large_block_frames() {
        // CPython 3.11: sha256(pickle.dumps((bytes(32), tuple(range(40000)), None), 5)). The
        // token tuple spans two frames, of 65537 and 54249 bytes.
        let tokens: Vec<u32> = (0..40000).collect();
        let buf = pickle_block(&[0u8; 32], &tokens);
        assert_eq!(buf.len(), 119806);
        assert_eq!(buf[2], op::FRAME);
        assert_eq!(buf[3..11], 65537u64.to_le_bytes());
        assert_eq!(buf[2 + 9 + 65537], op::FRAME);
        assert_eq!(
            buf[2 + 9 + 65537 + 1..2 + 9 + 65537 + 9],
            54249u64.to_le_bytes()
        );
        assert_eq!(
            VllmHashAlgo::Sha256.digest(&buf).to_string(),
            "025cc6a33127ee81e942ae438483be5c4f9c16e9203e7bf785639999252aef56"
        );
    }

    #[test]
    fn pickle_large_payloads_skip_frames() {
        // CPython 3.11: a str or bytes of 64 KiB or more is written outside any frame, and the
        // 2-byte tail after it is too short for a frame header.
        let seed = "x".repeat(70000);
        let buf = pickle_str(&seed);
        assert_eq!(buf.len(), 70009);
        assert_eq!(hex(&buf[..7]), "80055870110100");
        assert_eq!(
            VllmHashAlgo::Sha256.digest(&buf).to_string(),
            "359d6b20d805fe22ce7b02a26a1dcaf721738fe5af46f89f1ad8c79c9eba2685"
        );
        // (bytes(70000), (1, 2), None)
        let buf = pickle_block(&[0u8; 70000], &[1, 2]);
        assert_eq!(buf.len(), 70027);
        assert_eq!(hex(&buf[..7]), "80054270110100");
        assert_eq!(
            VllmHashAlgo::Sha256.digest(&buf).to_string(),
            "4d24f85108dd77a6528d22cf8f45d9dfa1eafc86e0610534a2b50a5d981a6b8a"
        );
    }

    #[test]
    fn algo_names() {
        for algo in VllmHashAlgo::ALL {
            assert_eq!(algo.as_str().parse::<VllmHashAlgo>().unwrap(), algo);
            assert_eq!(algo.to_string(), algo.as_str());
        }
        assert_eq!(VllmHashAlgo::default(), VllmHashAlgo::Sha256);
        for bad in ["builtin", "SHA256", "sha256-cbor", ""] {
            assert!(matches!(
                bad.parse::<VllmHashAlgo>(),
                Err(IndexError::UnknownHashAlgo(s)) if s == bad
            ));
        }
    }

    #[test]
    fn digest_forms() {
        let d = Digest::from_slice(&unhex("00112233445566778899aabbccddeeff")).unwrap();
        assert_eq!(d.as_bytes().len(), 16);
        assert_eq!(d.to_u64(), 0x8899aabbccddeeff);
        assert_eq!(format!("{d:?}"), "Digest(00112233445566778899aabbccddeeff)");
        assert_eq!(d.as_ref(), d.as_bytes());
        assert!(Digest::from_slice(&[0; 20]).is_err());
        let d32 = Digest::from_slice(&[7; 32]).unwrap();
        assert_eq!(d32.to_u64(), 0x0707070707070707);
    }
}
