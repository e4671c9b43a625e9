//! vLLM's CUDA KV-cache layouts and the geometry of host slots: pure arithmetic, no GPU.
//!
//! vLLM gives every attention layer a view `[num_blocks, H, N, C]` of one backing buffer, where
//! `H` is the number of KV heads, `N` the tokens per block and `C` one head's K and V entries
//! concatenated (`head_size + head_size_v` elements). For the layer-outer layouts that CUDA
//! backends use, layer `l`'s block `b` is one contiguous *page* of `H * N * C` bytes at
//! `layer_base[l] + b * block_stride`; inside the page the rows of `C` bytes come in one of two
//! orders:
//!
//! * [`KvLayout::Lbnhc`] (vLLM's `NHD`, FlashAttention's default): token-major, row `n * H + h`;
//! * [`KvLayout::Lbhnc`] (vLLM's `HND`, what NIXL asks for): head-major, row `h * N + n`.
//!
//! A host slot holds one block of every layer: layer `l`'s page at `slot * slot_stride +
//! l * page_bytes`, its rows in the slot's own layout, so blocks written by an engine in one layout
//! can be read back by an engine in the other.

use crate::error::{CudaError, Result};

/// The order of the rows inside one (layer, block) page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// Token-major (`NHD`): row `n * H + h`.
    Lbnhc,
    /// Head-major (`HND`): row `h * N + n`.
    Lbhnc,
}

impl KvLayout {
    /// Parses vLLM's names for the layer-outer layouts (`LBNHC`/`NHD`, `LBHNC`/`HND`).
    pub fn from_vllm(name: &str) -> Option<KvLayout> {
        match name {
            "LBNHC" | "NHD" => Some(KvLayout::Lbnhc),
            "LBHNC" | "HND" => Some(KvLayout::Lbhnc),
            _ => None,
        }
    }

    /// The page row holding token `n` of head `h`.
    pub fn row(self, shape: PageShape, n: u32, h: u32) -> u32 {
        match self {
            KvLayout::Lbnhc => n * shape.num_heads + h,
            KvLayout::Lbhnc => h * shape.tokens_per_block + n,
        }
    }

    /// The inverse of [`KvLayout::row`]: `(n, h)` of a row.
    pub fn token_head(self, shape: PageShape, row: u32) -> (u32, u32) {
        match self {
            KvLayout::Lbnhc => (row / shape.num_heads, row % shape.num_heads),
            KvLayout::Lbhnc => (row % shape.tokens_per_block, row / shape.tokens_per_block),
        }
    }

    /// The (outer, inner) row counts of a page in this layout.
    pub(crate) fn dims(self, shape: PageShape) -> (u32, u32) {
        match self {
            KvLayout::Lbnhc => (shape.tokens_per_block, shape.num_heads),
            KvLayout::Lbhnc => (shape.num_heads, shape.tokens_per_block),
        }
    }
}

/// The shape of one (layer, block) page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageShape {
    /// KV heads held by this rank (`H`).
    pub num_heads: u32,
    /// Tokens per (kernel) block (`N`).
    pub tokens_per_block: u32,
    /// Bytes of one row: one token's K and V for one head (`C` elements times the dtype size).
    pub entry_bytes: u32,
}

impl PageShape {
    /// Bytes of one page: `H * N * C`.
    pub fn page_bytes(&self) -> u64 {
        self.num_heads as u64 * self.tokens_per_block as u64 * self.entry_bytes as u64
    }

    /// Rows per page: `H * N`.
    pub fn rows(&self) -> u32 {
        self.num_heads * self.tokens_per_block
    }

    fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || self.tokens_per_block == 0 || self.entry_bytes == 0 {
            return Err(CudaError::InvalidLayout {
                reason: format!("empty page shape {self:?}"),
            });
        }
        if (self.num_heads as u64 * self.tokens_per_block as u64) > u32::MAX as u64 {
            return Err(CudaError::InvalidLayout {
                reason: format!("too many rows per page in {self:?}"),
            });
        }
        Ok(())
    }
}

/// A GPU KV cache as vLLM hands it over (`register_kv_caches`): one base address per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// Device address of each layer's view (its block 0).
    pub layers: Vec<u64>,
    /// Blocks per layer (dim 0 of the view).
    pub num_blocks: u32,
    /// Bytes between consecutive blocks of one layer (the view's dim-0 stride in bytes).
    pub block_stride: u64,
    /// Shape of one page.
    pub shape: PageShape,
    /// Row order inside a page.
    pub layout: KvLayout,
}

impl CacheSpec {
    /// A cache whose layers each have `num_blocks` contiguous pages.
    pub fn contiguous(
        layers: Vec<u64>,
        num_blocks: u32,
        shape: PageShape,
        layout: KvLayout,
    ) -> Self {
        CacheSpec {
            layers,
            num_blocks,
            block_stride: shape.page_bytes(),
            shape,
            layout,
        }
    }

    /// Bytes one layer spans: from block 0 to the end of the last block.
    pub fn layer_span(&self) -> u64 {
        if self.num_blocks == 0 {
            return 0;
        }
        (self.num_blocks as u64 - 1) * self.block_stride + self.shape.page_bytes()
    }

    /// Offset of block `block` inside a layer.
    pub fn block_offset(&self, block: u32) -> u64 {
        block as u64 * self.block_stride
    }

    /// Checks the arithmetic (not the pointers: the engine does that with the driver).
    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        if self.layers.is_empty() {
            return Err(CudaError::InvalidLayout {
                reason: "a cache needs at least one layer".into(),
            });
        }
        if self.layers.len() > u32::MAX as usize {
            return Err(CudaError::InvalidLayout {
                reason: format!("{} layers", self.layers.len()),
            });
        }
        if self.num_blocks == 0 {
            return Err(CudaError::InvalidLayout {
                reason: "a cache needs at least one block".into(),
            });
        }
        if self.block_stride < self.shape.page_bytes() {
            return Err(CudaError::InvalidLayout {
                reason: format!(
                    "block stride {} is smaller than a page of {} bytes",
                    self.block_stride,
                    self.shape.page_bytes()
                ),
            });
        }
        for (l, &base) in self.layers.iter().enumerate() {
            if base == 0 {
                return Err(CudaError::InvalidPointer {
                    what: "cache layer",
                    ptr: 0,
                    reason: format!("layer {l} has a null base"),
                });
            }
            if base.checked_add(self.layer_span()).is_none() {
                return Err(CudaError::InvalidPointer {
                    what: "cache layer",
                    ptr: base,
                    reason: format!("layer {l} wraps the address space"),
                });
            }
        }
        Ok(())
    }
}

/// Host slots: `num_slots` slots of `slot_stride` bytes, each holding one block of every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSpec {
    /// Number of slots.
    pub num_slots: u32,
    /// Bytes between slots; at least `layers * page_bytes`.
    pub slot_stride: u64,
    /// Row order of the pages in a slot.
    pub layout: KvLayout,
}

impl SlotSpec {
    /// Slots packed back to back for `cache`'s geometry, in `layout`.
    pub fn packed(cache: &CacheSpec, num_slots: u32, layout: KvLayout) -> Self {
        SlotSpec {
            num_slots,
            slot_stride: cache.layers.len() as u64 * cache.shape.page_bytes(),
            layout,
        }
    }

    /// Bytes needed to hold all slots.
    pub fn bytes(&self) -> u64 {
        self.num_slots as u64 * self.slot_stride
    }

    /// Offset of layer `layer`'s page of slot `slot`.
    pub fn page_offset(&self, cache: &CacheSpec, slot: u32, layer: u32) -> u64 {
        slot as u64 * self.slot_stride + layer as u64 * cache.shape.page_bytes()
    }

    /// Checks that the slots hold `cache`'s blocks and fit `buffer_len` bytes.
    pub fn validate(&self, cache: &CacheSpec, buffer_len: u64) -> Result<()> {
        let need = cache.layers.len() as u64 * cache.shape.page_bytes();
        if self.slot_stride < need {
            return Err(CudaError::InvalidLayout {
                reason: format!(
                    "slot stride {} is smaller than one block of all layers ({need} bytes)",
                    self.slot_stride
                ),
            });
        }
        match (self.num_slots as u64).checked_mul(self.slot_stride) {
            Some(b) if b <= buffer_len => Ok(()),
            _ => Err(CudaError::InvalidLayout {
                reason: format!(
                    "{} slots of {} bytes do not fit a host buffer of {buffer_len} bytes",
                    self.num_slots, self.slot_stride
                ),
            }),
        }
    }
}

/// One block to move: GPU block `block` to or from host slot `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct BlockMove {
    /// Block id in the GPU cache (dim 0 of vLLM's per-layer view).
    pub block: u32,
    /// Slot index in the host buffer.
    pub slot: u32,
}

/// Checks every move against the cache and the slots; `dest_is_slot` says which side is written,
/// and that side must not repeat. `seen` is scratch space reused between calls.
pub(crate) fn validate_moves(
    cache: &CacheSpec,
    slots: &SlotSpec,
    moves: &[BlockMove],
    dest_is_slot: bool,
    seen: &mut Vec<u64>,
) -> Result<()> {
    let dest_range = if dest_is_slot {
        slots.num_slots
    } else {
        cache.num_blocks
    };
    seen.clear();
    seen.resize((dest_range as usize).div_ceil(64), 0);
    for m in moves {
        if m.block >= cache.num_blocks {
            return Err(CudaError::BlockOutOfRange {
                block: m.block,
                num_blocks: cache.num_blocks,
            });
        }
        if m.slot >= slots.num_slots {
            return Err(CudaError::SlotOutOfRange {
                slot: m.slot,
                num_slots: slots.num_slots,
            });
        }
        let d = if dest_is_slot { m.slot } else { m.block };
        let (w, bit) = ((d / 64) as usize, 1u64 << (d % 64));
        if seen[w] & bit != 0 {
            return Err(CudaError::DuplicateDestination { index: d });
        }
        seen[w] |= bit;
    }
    Ok(())
}

/// Copies one page from `src` (rows in `src_layout`) to `dst` (rows in `dst_layout`).
pub fn convert_page(
    shape: PageShape,
    src_layout: KvLayout,
    src: &[u8],
    dst_layout: KvLayout,
    dst: &mut [u8],
) {
    let c = shape.entry_bytes as usize;
    if src_layout == dst_layout {
        dst.copy_from_slice(src);
        return;
    }
    for row in 0..shape.rows() {
        let (n, h) = dst_layout.token_head(shape, row);
        let s = src_layout.row(shape, n, h) as usize;
        let d = row as usize;
        dst[d * c..(d + 1) * c].copy_from_slice(&src[s * c..(s + 1) * c]);
    }
}

/// What a gather does, on the CPU: `layers[l]` holds layer `l`'s bytes from its base address.
/// Used as the reference in tests; also a CPU fallback.
pub fn gather_on_cpu(
    cache: &CacheSpec,
    layers: &[&[u8]],
    slots: &SlotSpec,
    host: &mut [u8],
    moves: &[BlockMove],
) {
    let page = cache.shape.page_bytes() as usize;
    for m in moves {
        for (l, layer) in layers.iter().enumerate() {
            let s = cache.block_offset(m.block) as usize;
            let d = slots.page_offset(cache, m.slot, l as u32) as usize;
            convert_page(
                cache.shape,
                cache.layout,
                &layer[s..s + page],
                slots.layout,
                &mut host[d..d + page],
            );
        }
    }
}

/// What a scatter does, on the CPU (the inverse of [`gather_on_cpu`]).
pub fn scatter_on_cpu(
    slots: &SlotSpec,
    host: &[u8],
    cache: &CacheSpec,
    layers: &mut [&mut [u8]],
    moves: &[BlockMove],
) {
    let page = cache.shape.page_bytes() as usize;
    for m in moves {
        for (l, layer) in layers.iter_mut().enumerate() {
            let s = slots.page_offset(cache, m.slot, l as u32) as usize;
            let d = cache.block_offset(m.block) as usize;
            convert_page(
                cache.shape,
                slots.layout,
                &host[s..s + page],
                cache.layout,
                &mut layer[d..d + page],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> PageShape {
        PageShape {
            num_heads: 3,
            tokens_per_block: 4,
            entry_bytes: 2,
        }
    }

    #[test]
    fn rows_round_trip_in_both_layouts() {
        let s = shape();
        for layout in [KvLayout::Lbnhc, KvLayout::Lbhnc] {
            let mut seen = vec![false; s.rows() as usize];
            for n in 0..s.tokens_per_block {
                for h in 0..s.num_heads {
                    let r = layout.row(s, n, h);
                    assert!(!seen[r as usize]);
                    seen[r as usize] = true;
                    assert_eq!(layout.token_head(s, r), (n, h));
                }
            }
        }
        assert_eq!(KvLayout::Lbnhc.row(s, 1, 2), 5);
        assert_eq!(KvLayout::Lbhnc.row(s, 1, 2), 9);
    }

    #[test]
    fn convert_page_transposes_and_inverts() {
        let s = shape();
        let src: Vec<u8> = (0..s.page_bytes() as u8).collect();
        let mut mid = vec![0u8; src.len()];
        let mut back = vec![0u8; src.len()];
        convert_page(s, KvLayout::Lbnhc, &src, KvLayout::Lbhnc, &mut mid);
        // Token 1, head 2: row 5 in NHC, row 9 in HNC.
        assert_eq!(&mid[18..20], &src[10..12]);
        assert_ne!(mid, src);
        convert_page(s, KvLayout::Lbhnc, &mid, KvLayout::Lbnhc, &mut back);
        assert_eq!(back, src);
    }

    #[test]
    fn vllm_names() {
        assert_eq!(KvLayout::from_vllm("NHD"), Some(KvLayout::Lbnhc));
        assert_eq!(KvLayout::from_vllm("LBHNC"), Some(KvLayout::Lbhnc));
        assert_eq!(KvLayout::from_vllm("BLNHC"), None);
    }

    #[test]
    fn geometry_errors() {
        let s = shape();
        let mut c = CacheSpec::contiguous(vec![0x1000, 0x100000], 8, s, KvLayout::Lbnhc);
        c.validate().unwrap();
        c.block_stride = 3;
        assert!(matches!(c.validate(), Err(CudaError::InvalidLayout { .. })));
        c.block_stride = s.page_bytes();
        c.layers[1] = 0;
        assert!(matches!(
            c.validate(),
            Err(CudaError::InvalidPointer { .. })
        ));
        c.layers[1] = u64::MAX - 4;
        assert!(matches!(
            c.validate(),
            Err(CudaError::InvalidPointer { .. })
        ));
        c.layers[1] = 0x100000;
        let slots = SlotSpec::packed(&c, 4, KvLayout::Lbhnc);
        slots.validate(&c, slots.bytes()).unwrap();
        assert!(slots.validate(&c, slots.bytes() - 1).is_err());
        let narrow = SlotSpec {
            slot_stride: 10,
            ..slots
        };
        assert!(narrow.validate(&c, 1 << 20).is_err());
    }

    #[test]
    fn move_validation() {
        let c = CacheSpec::contiguous(vec![0x1000], 8, shape(), KvLayout::Lbnhc);
        let slots = SlotSpec::packed(&c, 4, KvLayout::Lbnhc);
        let mut seen = Vec::new();
        let ok = [
            BlockMove { block: 7, slot: 0 },
            BlockMove { block: 7, slot: 3 },
        ];
        validate_moves(&c, &slots, &ok, true, &mut seen).unwrap();
        assert!(matches!(
            validate_moves(&c, &slots, &ok, false, &mut seen),
            Err(CudaError::DuplicateDestination { index: 7 })
        ));
        let bad_block = [BlockMove { block: 8, slot: 0 }];
        assert!(matches!(
            validate_moves(&c, &slots, &bad_block, true, &mut seen),
            Err(CudaError::BlockOutOfRange { block: 8, .. })
        ));
        let bad_slot = [BlockMove { block: 0, slot: 4 }];
        assert!(matches!(
            validate_moves(&c, &slots, &bad_slot, true, &mut seen),
            Err(CudaError::SlotOutOfRange { slot: 4, .. })
        ));
    }

    #[test]
    fn cpu_round_trip_across_layouts() {
        let s = shape();
        let c = CacheSpec::contiguous(vec![1, 2], 5, s, KvLayout::Lbnhc);
        let slots = SlotSpec::packed(&c, 3, KvLayout::Lbhnc);
        let span = c.layer_span() as usize;
        let l0: Vec<u8> = (0..span).map(|i| (i * 7 + 1) as u8).collect();
        let l1: Vec<u8> = (0..span).map(|i| (i * 13 + 5) as u8).collect();
        let moves = [
            BlockMove { block: 4, slot: 1 },
            BlockMove { block: 0, slot: 2 },
        ];
        let mut host = vec![0xA5u8; slots.bytes() as usize];
        gather_on_cpu(&c, &[&l0, &l1], &slots, &mut host, &moves);
        let page = s.page_bytes() as usize;
        assert!(host[..slots.slot_stride as usize]
            .iter()
            .all(|&b| b == 0xA5));
        let mut d0 = vec![0u8; span];
        let mut d1 = vec![0u8; span];
        scatter_on_cpu(&slots, &host, &c, &mut [&mut d0, &mut d1], &moves);
        for m in moves {
            let o = c.block_offset(m.block) as usize;
            assert_eq!(d0[o..o + page], l0[o..o + page]);
            assert_eq!(d1[o..o + page], l1[o..o + page]);
        }
    }
}
