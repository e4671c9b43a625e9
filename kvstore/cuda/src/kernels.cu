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

#ifndef UNROLL
#define UNROLL 4
#endif
// L2 prefetch size hint on loads (0: none, 128 or 256 bytes).
#ifndef KVMESH_L2_HINT
#define KVMESH_L2_HINT 0
#endif

__device__ __forceinline__ Vec16 load16(const Vec16* p) {
#if KVMESH_L2_HINT == 256
    Vec16 v;
    asm volatile("ld.global.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
#elif KVMESH_L2_HINT == 128
    Vec16 v;
    asm volatile("ld.global.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
#else
    return *p;
#endif
}

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
                buf[k] = load16(src);
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

// The same moves through Hopper's bulk copy engine (TMA, sm_90+): the host side of every chunk
// moves as one bulk copy between shared memory and the mapped host memory, the GPU side with
// ordinary coalesced accesses. No layout conversion. Two shared-memory buffers per block.
#define BULK_CHUNK 16384

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void chunk_at(const KernelParams& p, u32 c, u32 cpf, char*& gpu, char*& host, u32& len) {
    const u32 frag = c / cpf;
    const u32 part = c - frag * cpf;
    const u32 move = frag / p.num_layers;
    const u32 layer = frag - move * p.num_layers;
    const u64* layer_base = reinterpret_cast<const u64*>(p.descriptors);
    const u32* blocks = reinterpret_cast<const u32*>(layer_base + p.num_layers);
    const u32* slots = blocks + p.num_moves;
    const u64 off = (u64)part * BULK_CHUNK;
    gpu = reinterpret_cast<char*>(__ldg(layer_base + layer) + (u64)__ldg(blocks + move) * p.block_stride + off);
    host = reinterpret_cast<char*>(p.host_base + (u64)__ldg(slots + move) * p.slot_stride + (u64)layer * p.page_bytes + off);
    const u64 rest = p.page_bytes - off;
    len = rest < BULK_CHUNK ? (u32)rest : BULK_CHUNK;
}

extern "C" __global__ void __launch_bounds__(256) kvmesh_copy_pages_bulk(const KernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ alignas(128) unsigned char buf[2][BULK_CHUNK];
    __shared__ alignas(8) u64 bar[2];
    const u32 cpf = (u32)((p.page_bytes + BULK_CHUNK - 1) / BULK_CHUNK);
    const u32 total = p.num_moves * p.num_layers * cpf;
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&bar[0])) : "memory");
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&bar[1])) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (p.to_host) {
        int i = 0;
        for (u32 c = blockIdx.x; c < total; c += gridDim.x, i ^= 1) {
            char* gpu; char* host; u32 len;
            chunk_at(p, c, cpf, gpu, host, len);
            if (threadIdx.x == 0) {
                // The bulk store issued from this buffer two chunks ago must have read it.
                asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
            }
            __syncthreads();
            for (u32 o = threadIdx.x * 16; o < len; o += blockDim.x * 16) {
                *reinterpret_cast<Vec16*>(buf[i] + o) = *reinterpret_cast<const Vec16*>(gpu + o);
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncthreads();
            if (threadIdx.x == 0) {
                asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                             :: "l"(host), "r"(smem_addr(buf[i])), "r"(len) : "memory");
                asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            }
        }
        if (threadIdx.x == 0) {
            asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
        }
    } else {
        u32 phase[2] = {0, 0};
        u32 c = blockIdx.x;
        if (threadIdx.x == 0 && c < total) {
            char* gpu; char* host; u32 len;
            chunk_at(p, c, cpf, gpu, host, len);
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(&bar[0])), "r"(len) : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         :: "r"(smem_addr(buf[0])), "l"(host), "r"(len), "r"(smem_addr(&bar[0])) : "memory");
        }
        int i = 0;
        for (; c < total; c += gridDim.x, i ^= 1) {
            const u32 next = c + gridDim.x;
            if (threadIdx.x == 0 && next < total) {
                char* g2; char* h2; u32 l2;
                chunk_at(p, next, cpf, g2, h2, l2);
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(&bar[i ^ 1])), "r"(l2) : "memory");
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             :: "r"(smem_addr(buf[i ^ 1])), "l"(h2), "r"(l2), "r"(smem_addr(&bar[i ^ 1])) : "memory");
            }
            char* gpu; char* host; u32 len;
            chunk_at(p, c, cpf, gpu, host, len);
            u32 done = 0;
            while (!done) {
                asm volatile("{ .reg .pred P; mbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2; selp.u32 %0, 1, 0, P; }"
                             : "=r"(done) : "r"(smem_addr(&bar[i])), "r"(phase[i]) : "memory");
            }
            phase[i] ^= 1;
            for (u32 o = threadIdx.x * 16; o < len; o += blockDim.x * 16) {
                *reinterpret_cast<Vec16*>(gpu + o) = *reinterpret_cast<const Vec16*>(buf[i] + o);
            }
            __syncthreads();
        }
    }
#endif
}
