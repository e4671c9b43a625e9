// kvmesh's KV copy kernel, compiled at run time by NVRTC (no headers needed).
//
// One launch moves `num_moves` blocks of `num_layers` pages each between a GPU KV cache and host
// slots in mapped pinned memory (reached through unified virtual addressing): the GPU reads or
// writes the host memory itself, over PCIe, so many small pages cost one launch rather than one
// DMA each. Work is a flat range of 16-byte vectors indexed in destination order, so stores are
// coalesced; each thread keeps UNROLL loads in flight before its stores.

typedef unsigned int u32;
typedef unsigned long long u64;

struct alignas(16) Vec16 {
    u32 x, y, z, w;
};

// Must match `KernelParams` in engine.rs field for field.
struct KernelParams {
    u64 descriptors;   // device: u64 layer_base[num_layers], then u32 blocks[num_moves], u32 slots[num_moves]
    u64 host_base;     // host slots (a device-visible address)
    u64 slot_stride;   // bytes between host slots
    u64 block_stride;  // bytes between GPU blocks of one layer
    u64 page_bytes;    // bytes of one (layer, block) page
    u32 num_moves;
    u32 num_layers;
    u32 page_vecs;     // page_bytes / 16
    u32 row_vecs;      // bytes of one row / 16 (used when transposing)
    u32 dst_outer;     // destination page's outer row count (N for LBNHC, H for LBHNC)
    u32 dst_inner;     // destination page's inner row count
    u32 transpose;     // 1: source and destination pages have different row orders
    u32 to_host;       // 1: GPU -> host (gather), 0: host -> GPU (scatter)
    u32 total_vecs;    // num_moves * num_layers * page_vecs
    u32 pad;
};

#define UNROLL 4

__device__ __forceinline__ void locate(const KernelParams& p, u32 v, const Vec16*& src, Vec16*& dst) {
    const u32 frag = v / p.page_vecs;
    const u32 off = v - frag * p.page_vecs;
    const u32 move = frag / p.num_layers;
    const u32 layer = frag - move * p.num_layers;
    const u64* layer_base = reinterpret_cast<const u64*>(p.descriptors);
    const u32* blocks = reinterpret_cast<const u32*>(layer_base + p.num_layers);
    const u32* slots = blocks + p.num_moves;
    char* gpu = reinterpret_cast<char*>(__ldg(layer_base + layer) + (u64)__ldg(blocks + move) * p.block_stride);
    char* host = reinterpret_cast<char*>(p.host_base + (u64)__ldg(slots + move) * p.slot_stride + (u64)layer * p.page_bytes);
    u32 soff = off;
    if (p.transpose) {
        // Destination row r = j0 * inner + j1 holds what the source has at row j1 * outer + j0.
        const u32 row = off / p.row_vecs;
        const u32 col = off - row * p.row_vecs;
        const u32 j0 = row / p.dst_inner;
        const u32 j1 = row - j0 * p.dst_inner;
        soff = (j1 * p.dst_outer + j0) * p.row_vecs + col;
    }
    if (p.to_host) {
        src = reinterpret_cast<const Vec16*>(gpu) + soff;
        dst = reinterpret_cast<Vec16*>(host) + off;
    } else {
        src = reinterpret_cast<const Vec16*>(host) + soff;
        dst = reinterpret_cast<Vec16*>(gpu) + off;
    }
}

extern "C" __global__ void __launch_bounds__(512) kvmesh_copy_pages(const KernelParams p) {
    const u32 stride = gridDim.x * blockDim.x;
    for (u32 base = blockIdx.x * blockDim.x + threadIdx.x; base < p.total_vecs; base += stride * UNROLL) {
        Vec16 buf[UNROLL];
        Vec16* dst[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const u32 v = base + k * stride;
            dst[k] = nullptr;
            if (v < p.total_vecs) {
                const Vec16* src;
                locate(p, v, src, dst[k]);
                buf[k] = *src;
            }
        }
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            if (dst[k] != nullptr) {
                *dst[k] = buf[k];
            }
        }
    }
}
