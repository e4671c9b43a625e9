//! Block identity: kvmesh's own 64-bit block keys.
//!
//! A key names a block *and its whole prefix*: block `i`'s key is
//! `(rotl(key[i-1], 29) ^ h[i]) * K` (wrapping, `K` odd), where `h[i]` is XXH3-64 of the block's
//! token ids (little-endian u32). For a given block content this is a bijection of the previous
//! key, so two different prefixes followed by the same block never merge into one key, and the
//! content hash makes the result uniform. The content hashes of a prompt's blocks do not depend
//! on each other, so the CPU computes several at once; only a rotate, an xor and a multiply are
//! chained (about five cycles a block, against the whole of XXH3 when each block's hash is
//! seeded with the key before it: an 8k-token prompt's keys took 13.5 µs that way, with the
//! tokens not in cache). Since the finalizer is a bijection, two different prefixes followed by the same
//! block never merge into one key. The chain starts from a seed derived from the
//! [`Namespace`]: the model, the LoRA adapter and (for the first block only, as vLLM does) the
//! cache salt. Multimodal items and prompt-embedding digests that touch a block are folded into
//! that block's key. Two tenants, two adapters or two models therefore never share a key, and an
//! engine's own block hash is never trusted as an identity: it is only an alias, mapped per event
//! to the key computed here.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Chains a block's content hash onto the key before it (see the module docs): for a fixed
/// `content`, a bijection of `prev`.
#[inline]
fn chain_step(prev: u64, content: u64) -> u64 {
    (prev.rotate_left(29) ^ content).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// kvmesh's identity of a block (and, through the chain, of its prefix). Never 0 or 1: those
/// values are reserved by the index's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub u64);

impl BlockKey {
    #[inline]
    fn new(raw: u64) -> Self {
        // 0 and 1 mark empty and deleted table slots; remapping two values out of 2^64 costs
        // nothing measurable in collisions.
        BlockKey(if raw < 2 { raw + 2 } else { raw })
    }
}

/// What a block's identity is scoped to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Namespace {
    /// The served model name (the engine's `--served-model-name` or model path).
    pub model: String,
    /// The LoRA adapter's name, if the request uses one.
    pub lora_name: Option<String>,
    /// vLLM's `cache_salt`, which isolates tenants; it enters the first block only.
    pub cache_salt: Option<String>,
}

impl Namespace {
    /// A namespace for a base model with no adapter and no salt.
    pub fn model(model: impl Into<String>) -> Self {
        Namespace {
            model: model.into(),
            lora_name: None,
            cache_salt: None,
        }
    }

    /// The seed of the first block's key.
    pub fn root_seed(&self) -> u64 {
        root_seed(
            &self.model,
            self.lora_name.as_deref(),
            self.cache_salt.as_deref(),
        )
    }
}

const DOMAIN: &[u8] = b"kvmesh.block-key.v2";

/// The seed of a chain's first block for a model, LoRA adapter and cache salt.
pub fn root_seed(model: &str, lora_name: Option<&str>, cache_salt: Option<&str>) -> u64 {
    let mut buf = Vec::with_capacity(DOMAIN.len() + model.len() + 64);
    buf.extend_from_slice(DOMAIN);
    push_field(&mut buf, model.as_bytes());
    match lora_name {
        Some(l) => {
            buf.push(1);
            push_field(&mut buf, l.as_bytes());
        }
        None => buf.push(0),
    }
    match cache_salt {
        Some(s) => {
            buf.push(1);
            push_field(&mut buf, s.as_bytes());
        }
        None => buf.push(0),
    }
    xxh3_64(&buf)
}

fn push_field(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// A multimodal item, placed in the prompt by token position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmItem {
    /// The item's content hash as vLLM names it (`mm_feature.identifier`).
    pub identifier: String,
    /// Index of the item's first placeholder token in the prompt.
    pub offset: usize,
    /// Number of placeholder tokens.
    pub length: usize,
}

/// Extra identity of one block beyond its tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockExtras {
    /// Multimodal items overlapping the block: (identifier, item start minus block start).
    pub mm: Vec<(String, i64)>,
    /// Digest of the block's prompt embeddings, if the prompt was given as embeddings.
    pub prompt_embeds: Option<Vec<u8>>,
}

impl BlockExtras {
    /// Whether the block has no extra identity.
    pub fn is_empty(&self) -> bool {
        self.mm.is_empty() && self.prompt_embeds.is_none()
    }
}

/// Computes chained block keys. Holds a scratch buffer so hashing allocates nothing per block.
#[derive(Default)]
pub struct KeyHasher {
    buf: Vec<u8>,
}

impl KeyHasher {
    /// A hasher with an empty scratch buffer.
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    fn hash(&mut self, prev: u64, tokens: &[u32]) -> u64 {
        // The hash is over little-endian u32s: on little-endian machines that is the slice's
        // own memory, hashed in place.
        let content = if cfg!(target_endian = "little") {
            xxh3_64(bytemuck::cast_slice(tokens))
        } else {
            self.buf.clear();
            for t in tokens {
                self.buf.extend_from_slice(&t.to_le_bytes());
            }
            xxh3_64(&self.buf)
        };
        chain_step(prev, content)
    }

    /// The key of a block whose predecessor in the chain has key `prev` (for the first block,
    /// `prev` is the namespace's root seed).
    #[inline]
    pub fn next(&mut self, prev: u64, tokens: &[u32]) -> BlockKey {
        BlockKey::new(self.hash(prev, tokens))
    }

    /// Like [`KeyHasher::next`], with the block's extra identity folded in.
    pub fn next_with(&mut self, prev: u64, tokens: &[u32], extras: &BlockExtras) -> BlockKey {
        let base = self.hash(prev, tokens);
        if extras.is_empty() {
            return BlockKey::new(base);
        }
        self.buf.clear();
        self.buf.extend_from_slice(b"x");
        for (id, off) in &extras.mm {
            self.buf.push(b'm');
            push_field(&mut self.buf, id.as_bytes());
            self.buf.extend_from_slice(&off.to_le_bytes());
        }
        if let Some(d) = &extras.prompt_embeds {
            self.buf.push(b'e');
            push_field(&mut self.buf, d);
        }
        BlockKey::new(xxh3_64_with_seed(&self.buf, base))
    }

    /// The keys of every full block of `tokens` in `ns`, in order.
    pub fn chain(&mut self, ns: &Namespace, tokens: &[u32], block_size: usize) -> Vec<BlockKey> {
        let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
        if block_size == 0 {
            return out;
        }
        let mut prev = ns.root_seed();
        for (i, block) in tokens.chunks_exact(block_size).enumerate() {
            prefetch_block_tokens(tokens, i, block_size);
            let k = self.next(prev, block);
            out.push(k);
            prev = k.0;
        }
        out
    }
}

/// Blocks ahead of the one being hashed whose tokens are prefetched.
const TOKENS_AHEAD: usize = 16;

/// Prefetches the tokens of block `i + TOKENS_AHEAD` of `tokens` (blocks of `block_size`), to
/// be called while block `i` is hashed. A prompt fresh from the tokenizer is in cache anyway;
/// one that is not streams in at the hardware prefetcher's pace, which stops at every page
/// boundary (a 16-token block is 64 bytes: a page every 64 blocks).
#[inline]
pub(crate) fn prefetch_block_tokens(tokens: &[u32], i: usize, block_size: usize) {
    let start = (i + TOKENS_AHEAD) * block_size;
    if start >= tokens.len() {
        return;
    }
    let end = (start + block_size).min(tokens.len());
    let mut t = start;
    while t < end {
        crate::table::prefetch_line(&tokens[t]);
        t += 16; // one 64-byte line of u32 tokens
    }
}

/// The extra identity of block `block` (of `block_size` tokens) given a prompt's multimodal items.
pub fn block_extras(items: &[MmItem], block: usize, block_size: usize) -> BlockExtras {
    let start = block * block_size;
    let end = start + block_size;
    let mm = items
        .iter()
        .filter(|it| it.offset < end && it.offset + it.length > start)
        .map(|it| (it.identifier.clone(), it.offset as i64 - start as i64))
        .collect();
    BlockExtras {
        mm,
        prompt_embeds: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_prefix_and_namespace() {
        let mut h = KeyHasher::new();
        let toks: Vec<u32> = (0..64).collect();
        let a = h.chain(&Namespace::model("m"), &toks, 16);
        assert_eq!(a.len(), 4);
        // Same block content at a different position has a different key.
        let shifted: Vec<u32> = (16..64).collect();
        let b = h.chain(&Namespace::model("m"), &shifted, 16);
        assert_ne!(a[1], b[0]);
        // Model, LoRA and salt all change every key.
        let other_model = h.chain(&Namespace::model("m2"), &toks, 16);
        let lora = h.chain(
            &Namespace {
                lora_name: Some("l".into()),
                ..Namespace::model("m")
            },
            &toks,
            16,
        );
        let salt = h.chain(
            &Namespace {
                cache_salt: Some("t".into()),
                ..Namespace::model("m")
            },
            &toks,
            16,
        );
        for i in 0..4 {
            assert_ne!(a[i], other_model[i]);
            assert_ne!(a[i], lora[i]);
            assert_ne!(a[i], salt[i]);
        }
        // A LoRA name is not confused with a salt of the same text.
        let salt_l = h.chain(
            &Namespace {
                cache_salt: Some("l".into()),
                ..Namespace::model("m")
            },
            &toks,
            16,
        );
        assert_ne!(lora[0], salt_l[0]);
        // Partial trailing blocks are not keyed.
        assert_eq!(h.chain(&Namespace::model("m"), &toks[..63], 16).len(), 3);
        // Deterministic.
        assert_eq!(a, h.chain(&Namespace::model("m"), &toks, 16));
    }

    #[test]
    fn extras_change_the_key() {
        let mut h = KeyHasher::new();
        let toks: Vec<u32> = (0..16).collect();
        let plain = h.next(7, &toks);
        let e1 = BlockExtras {
            mm: vec![("img".into(), 3)],
            prompt_embeds: None,
        };
        let e2 = BlockExtras {
            mm: vec![("img".into(), -3)],
            prompt_embeds: None,
        };
        assert_eq!(plain, h.next_with(7, &toks, &BlockExtras::default()));
        assert_ne!(plain, h.next_with(7, &toks, &e1));
        assert_ne!(h.next_with(7, &toks, &e1), h.next_with(7, &toks, &e2));
    }

    #[test]
    fn mm_items_map_to_overlapping_blocks() {
        let items = vec![MmItem {
            identifier: "a".into(),
            offset: 10,
            length: 20,
        }];
        assert_eq!(block_extras(&items, 0, 16).mm, vec![("a".to_string(), 10)]);
        assert_eq!(block_extras(&items, 1, 16).mm, vec![("a".to_string(), -6)]);
        assert!(block_extras(&items, 2, 16).mm.is_empty());
    }
}
