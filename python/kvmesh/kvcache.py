"""How an engine's paged KV cache maps to kvmesh store blocks (no vLLM import needed).

vLLM hands a KV connector one tensor per attention layer. ``describe(kv_caches)`` reads their
shapes and strides and says where each block's pages are:

* **Host memory** (vLLM's CPU build): every layer is block-outer, ``[num_blocks, ...]`` with a
  contiguous page per block. A store block is every layer's page, layer after layer.
* **GPU memory** (vLLM's CUDA builds): a layer is ``[2, num_blocks, block_size, heads, head_size]``
  (FlashAttention), ``[num_blocks, 2, block_size, heads, head_size]`` (FlashInfer), either with the
  heads outside the tokens in memory (the ``HND`` layout, made by vLLM with a stride permutation)
  or not (``NHD``), or ``[num_blocks, block_size, head_size]`` (MLA: one latent "head", no K/V
  split). K and V of a layer become two page lists; a store block is the K page then the V page
  of layer 0, then of layer 1, and so on, each page in the cache's own row order (so engines with
  different layouts never share store keys: the connector folds the layout into them). kvstore's
  CUDA copy engine moves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class HostLayout:
    """KV pages in host memory: per layer ``(base address, bytes between blocks)``."""

    layers: list[tuple[int, int]]
    page_bytes: int
    num_blocks: int

    @property
    def block_bytes(self) -> int:
        return self.page_bytes * len(self.layers)


@dataclass
class GpuLayout:
    """KV pages in GPU memory, as kvstore's CUDA copy engine takes them: the device address of
    each page list's block 0 (K and V of every layer), the bytes between blocks, and the shape of
    one page (``num_heads`` x ``tokens_per_block`` rows of ``entry_bytes``) in ``layout``."""

    layers: list[int]
    block_stride: int
    num_blocks: int
    num_heads: int
    tokens_per_block: int
    entry_bytes: int
    layout: str  # "LBNHC" (NHD: tokens outside heads) or "LBHNC" (HND)
    device: int

    @property
    def page_bytes(self) -> int:
        return self.num_heads * self.tokens_per_block * self.entry_bytes

    @property
    def block_bytes(self) -> int:
        return self.page_bytes * len(self.layers)


def _unique(kv_caches: dict[str, Any]) -> list[tuple[str, Any]]:
    """The layers' tensors, once each (hybrid models alias one cache to several layers)."""
    seen: set[int] = set()
    out = []
    for name, t in kv_caches.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out.append((name, t))
    return out


def describe(kv_caches: dict[str, Any], num_blocks: Optional[int] = None):
    """A ``HostLayout`` or ``GpuLayout`` for vLLM's per-layer KV tensors; ``ValueError`` for a
    layout kvmesh cannot move. ``num_blocks`` (the engine's block count, when known) tells the
    block dimension from the K/V one where both could be either."""
    layers = _unique(kv_caches)
    if not layers:
        raise ValueError("no KV-cache tensors")
    if layers[0][1].is_cuda:
        return _describe_gpu(layers, num_blocks)
    return _describe_host(layers)


def _describe_host(layers: list[tuple[str, Any]]) -> HostLayout:
    out, page, num_blocks = [], None, None
    for name, t in layers:
        if t.is_cuda:
            raise ValueError(f"layer {name} is on the GPU, the others in host memory")
        if not t[0].is_contiguous():
            raise ValueError(
                f"layer {name}'s block page is not contiguous (shape {tuple(t.shape)}, strides "
                f"{t.stride()}); a block-outer KV layout is not supported"
            )
        p = t[0].numel() * t.element_size()
        if page is None:
            page, num_blocks = p, t.shape[0]
        elif p != page or t.shape[0] != num_blocks:
            raise ValueError("every layer must have the same page size and block count")
        out.append((t.data_ptr(), t.stride(0) * t.element_size()))
    return HostLayout(out, page, num_blocks)


def _page_lists(name: str, t: Any, num_blocks: Optional[int]) -> list[Any]:
    """The tensor's page lists, each ``[num_blocks, tokens, heads, head_size]`` (a view)."""
    if t.dim() == 5:
        if t.shape[0] == 2 and (num_blocks is None or t.shape[1] == num_blocks):
            return [t[0], t[1]]  # FlashAttention: [2, blocks, tokens, heads, head_size]
        if t.shape[1] == 2 and (num_blocks is None or t.shape[0] == num_blocks):
            return [t[:, 0], t[:, 1]]  # FlashInfer: [blocks, 2, tokens, heads, head_size]
    if t.dim() == 3:
        return [t.unsqueeze(2)]  # MLA: [blocks, tokens, head_size], one latent head
    raise ValueError(
        f"layer {name}: KV tensor of shape {tuple(t.shape)} is none of vLLM's CUDA layouts "
        "([2, blocks, tokens, heads, head_size], [blocks, 2, tokens, heads, head_size], "
        "[blocks, tokens, head_size])"
    )


def _describe_gpu(layers: list[tuple[str, Any]], num_blocks: Optional[int]) -> GpuLayout:
    bases: list[int] = []
    geometry = None
    for name, t in layers:
        if not t.is_cuda:
            raise ValueError(f"layer {name} is in host memory, the others on the GPU")
        es = t.element_size()
        for p in _page_lists(name, t, num_blocks):
            nb, n, h, d = p.shape
            sb, sn, sh, sd = p.stride()
            if sd != 1:
                raise ValueError(f"layer {name}: head_size is not the innermost dimension")
            if sh == d and sn == h * d:
                layout = "LBNHC"  # tokens outside heads (NHD)
            elif sn == d and sh == n * d:
                layout = "LBHNC"  # heads outside tokens (HND)
            else:
                raise ValueError(
                    f"layer {name}: a page of shape {(n, h, d)} with strides {(sn, sh, sd)} is "
                    "not contiguous in NHD or HND order"
                )
            g = (nb, sb * es, h, n, d * es, layout, t.device.index or 0)
            if geometry is None:
                geometry = g
            elif g != geometry:
                raise ValueError(
                    f"layer {name}: its geometry {g} differs from the first layer's {geometry}"
                )
            bases.append(p.data_ptr())
    nb, stride, h, n, entry, layout, device = geometry
    return GpuLayout(bases, stride, nb, h, n, entry, layout, device)
