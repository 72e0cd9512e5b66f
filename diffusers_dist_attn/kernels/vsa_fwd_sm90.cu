// Video Sparse Attention, fine-stage FORWARD for Hopper (sm_90a): block-sparse flash attention over 64x64 blocks.
//
// Opt-in (DIFFUSERS_DIST_ATTN_VSA_CUDA=1): it reads every key block as a 64-row tile, while the Triton kernels read
// partial border blocks as 16/32-row tiles; on one H200 the layer forward takes 12-33% longer with it, so it is not
// the default (see README.md here). Correctness: tests/gpu/test_vsa_cuda.py; ptxas resources: BUILD_NOTES.md
// here; speed: benchmarks/NOTES.md.
//
// Contract (same as `_fwd_kernel` in diffusers_dist_attn/vsa/triton_kernels.py), per (batch*head bh, query block
// qb) with S = 64 N tokens per head:
//   for t < q2k_num[bh, qb, 2]:  kb = q2k_idx[bh, qb, t];  keys/values = rows kb*64 .. kb*64+63 of K[bh], V[bh]
//   logits = Q_blk K_kb^T * scale, key slots >= block_sizes[kb] masked to -inf; online softmax (base 2)
//   out_s = softmax(...) V;  out = out_s + out_c[bh, qb, :] (* gate);  lse = m + log2(l) (base 2, of s*scale*log2e)
// out and out_s are zero at pad query rows (slots >= block_sizes[qb]). q2k_num holds the ends of the lists' three
// size-class groups; this kernel reads every key block as a 64-row tile, so it needs only the last end.
// Precondition: 1 <= q2k_num[.., 2] <= maxk (the op's top-k is >= 1; a consumer with an empty list would wait for a
// tile forever).
//
// CTA layout (384 threads = 3 warpgroups, one CTA per SM: __launch_bounds__(384, 1)):
//   warpgroup 0 = producer: warp c (c < kConsumers), lane 0, streams the Q tile and the listed K/V tiles of
//                 consumer c through TMA (cp.async.bulk.tensor, SWIZZLE_128B) into a kStages-deep ring.
//                 setmaxnreg.dec to kProducerRegs registers.
//   warpgroups 1, 2 = consumers: each owns one (bh, qb) tile of 64 query rows (tile = blockIdx.x * 2 + c) and its
//                 own ring; S = Q K^T with wgmma m64n64k16 (A, B from shared memory), online softmax in
//                 registers, O += P V with wgmma m64n{D}k16 (P from registers, V from shared memory, transposed),
//                 software-pipelined so that P_{t-1} V_{t-1} runs during the softmax of S_t (FA3's intra-warpgroup
//                 overlap). setmaxnreg.inc to kConsumerRegs registers.
// Shared memory per consumer: Q [64, D] + kStages x (K [64, D] + V [64, D]) in bf16; every [64, D] tile is stored
// as D/64 "halves" of [64 rows][64 columns] = 8 KB (128-byte rows, 128B-swizzled by TMA), 1024-byte aligned.
// D = 128: 16 KB per tile, 112 KB per consumer, 225 KB per CTA. D = 64: 56 KB per consumer.
//
// Synchronisation (all mbarriers, per consumer c and stage s):
//   q_full[c]      producer expect_tx(Q bytes) + TMA completion          -> consumer waits (parity 0)
//   k_full[c][s]   producer expect_tx(K bytes) + TMA completion          -> consumer waits before S = Q K^T
//   v_full[c][s]   producer expect_tx(V bytes) + TMA completion          -> consumer waits before O += P V
//   empty[c][s]    128 consumer arrivals after their P V wgmma retired  -> producer waits before reusing stage s
//
// Measured and not kept (benchmarks/NOTES.md, git history): one K/V ring shared by both consumers over the union
// of their lists (slower: the consumers run in lockstep), FA3's inter-warpgroup ping-pong of the GEMM issues
// (slower without more overlap to gain). Not done: a persistent grid, TMA stores of O (stmatrix), reading partial
// tiles as 16- or 32-row tiles (the Triton kernels' size classes), fp16 inputs, the backward (Triton's is used).

#include <cuda_bf16.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include "sm90_ptx.cuh"
#include "vsa_fwd_sm90.h"

namespace vsa_sm90 {
namespace {

constexpr int kBlock = 64;                   // tokens per block (rows of a tile)
constexpr int kStages = 3;                   // K/V ring depth per consumer (two stages are held by the pipeline)
constexpr int kConsumers = 2;                // consumer warpgroups per CTA (each one query tile)
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kHalfBytes = kBlock * 64 * 2;  // one [64 rows][64 bf16] swizzled half-tile: 8 KB
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;           // 128 * (40 + 2 * 232) = 64512 <= 65536 registers per SM
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Cfg {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static constexpr int kHalves = D / 64;
  static constexpr int kTileBytes = kHalfBytes * kHalves;            // one [64, D] bf16 tile
  static constexpr int kConsumerBytes = kTileBytes * (1 + 2 * kStages);  // Q + ring of (K, V)
  static constexpr int kSmemBytes = kConsumers * kConsumerBytes + 1024;  // + slack to align the base to 1024 B
  static constexpr int kAcc = D / 2;                                  // O: 64 x D fp32 over 128 threads
};

struct Barriers {
  uint64_t q_full[kConsumers];
  uint64_t k_full[kConsumers][kStages];
  uint64_t v_full[kConsumers][kStages];
  uint64_t empty[kConsumers][kStages];
};

// ---------------------------------------------------------------------------------------------------------------
// producer: one thread per consumer issues all TMA loads of that consumer's tile
// ---------------------------------------------------------------------------------------------------------------
template <int D>
__device__ __forceinline__ void produce(const CUtensorMap* tm_q, const CUtensorMap* tm_k, const CUtensorMap* tm_v,
                                        const FwdArgs& p, Barriers& bars, uint8_t* ring, int c, int tile) {
  using C = Cfg<D>;
  const int bh = tile / p.n;  // 32-bit: the host checks BH * S < 2^31 (TMA coordinates are int32 anyway)
  const int qb = tile - bh * p.n;
  const int row_base = bh * p.n * kBlock;  // first row of this head in the [BH*S, D] view
  // Q: D/64 boxes of [64 rows, 64 columns]
  mbar_arrive_expect_tx(&bars.q_full[c], C::kTileBytes);
#pragma unroll
  for (int h = 0; h < C::kHalves; ++h)
    tma_load_2d(ring + h * kHalfBytes, tm_q, &bars.q_full[c], h * 64, row_base + qb * kBlock);

  const int32_t* list = p.q2k_idx + static_cast<int64_t>(tile) * p.maxk;
  const int num = p.q2k_num[tile * 3 + 2];
  for (int t = 0; t < num; ++t) {
    const int s = t % kStages;
    const uint32_t phase = (t / kStages) & 1;
    const int row = row_base + list[t] * kBlock;
    uint8_t* k_dst = ring + C::kTileBytes * (1 + 2 * s);
    uint8_t* v_dst = k_dst + C::kTileBytes;
    mbar_wait(&bars.empty[c][s], phase ^ 1);  // first pass through the ring: returns at once
    mbar_arrive_expect_tx(&bars.k_full[c][s], C::kTileBytes);
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h) tma_load_2d(k_dst + h * kHalfBytes, tm_k, &bars.k_full[c][s], h * 64, row);
    mbar_arrive_expect_tx(&bars.v_full[c][s], C::kTileBytes);
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h) tma_load_2d(v_dst + h * kHalfBytes, tm_v, &bars.v_full[c][s], h * 64, row);
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo = the lower column
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------------------------------------
// consumer: one warpgroup, one 64-row query tile
// ---------------------------------------------------------------------------------------------------------------
// Accumulator fragment of wgmma m64nNk16 (fp32) for thread tid of the warpgroup (warp w = tid / 32, lane l):
//   d[j8 * 4 + i * 2 + e]  =  D[row = 16 w + l / 4 + 8 i][col = 8 j8 + 2 (l % 4) + e],  i, e in {0, 1}
// so each thread holds 2 rows (r0, r0 + 8) and each row is spread over the 4 lanes of a quad.
template <int D>
__device__ __forceinline__ void consume(const FwdArgs& p, Barriers& bars, uint8_t* ring, int c, int tile,
                                        int tid) {
  using C = Cfg<D>;
  const int warp = tid / 32, lane = tid % 32;
  const int r0 = warp * 16 + lane / 4;
  const int cq = (lane % 4) * 2;
  const float qk_scale = p.scale * kLog2e;
  const int32_t* list = p.q2k_idx + static_cast<int64_t>(tile) * p.maxk;
  const int num = p.q2k_num[tile * 3 + 2];
  const uint32_t q_addr = smem_u32(ring);

  float o[C::kAcc];
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};  // per-thread partial row sums (reduced over the quad at the end)

  // key block t of the list -> its ring stage (K at k_addr, V at k_addr + tile) and the stage's phase parity
  auto k_addr_of = [&](int t) { return q_addr + C::kTileBytes * (1 + 2 * (t % kStages)); };
  auto phase_of = [](int t) { return static_cast<uint32_t>((t / kStages) & 1); };

  // S[64 x 64] = Q[64 x D] K^T, issued (not awaited): D/16 k-steps; step kk reads columns 16 kk.. of half kk / 4
  auto issue_qk = [&](float (&sc)[32], uint32_t k_addr) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk / 4) * kHalfBytes + (kk % 4) * 32;
      wgmma_ss_m64n64k16(sc, make_desc_sw128(q_addr + off, 16, 1024), make_desc_sw128(k_addr + off, 16, 1024),
                         kk > 0);
    }
    wgmma_commit();
  };
  // O[64 x D] += P[64 x 64] V[64 x D], issued: 4 k-steps of 16 keys = 16 rows (2 KB) of each V half
  auto issue_pv = [&](const uint32_t (&a)[4][4], uint32_t v_addr) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t desc_v = make_desc_sw128(v_addr + kk * 16 * 128, kHalfBytes, 1024);
      if constexpr (D == 128)
        wgmma_rs_m64n128k16_tB(o, a[kk], desc_v, 1);
      else
        wgmma_rs_m64n64k16_tB(o, a[kk], desc_v, 1);
    }
    wgmma_commit();
  };
  // online softmax (base 2) of a finished S: pad keys (col >= valid) -> -inf; updates m, l; the factor O must be
  // rescaled by goes to `alpha`, P (bf16) to `a` as wgmma A fragments (k-step kk = accumulator chunks 2kk, 2kk+1)
  auto softmax = [&](float (&sc)[32], int valid, float (&alpha)[2], uint32_t (&a)[4][4]) {
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = sc[j8 * 4 + i * 2 + e];
          x = (j8 * 8 + cq + e < valid) ? x * qk_scale : -INFINITY;
          mx[i] = fmaxf(mx[i], x);
        }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      alpha[i] = ex2(m[i] - mx[i]);  // first block: ex2(-inf) = 0 (valid >= 1, so mx is finite)
      m[i] = mx[i];
      l[i] *= alpha[i];
    }
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = sc[j8 * 4 + i * 2 + e];
          x = ex2(x - mx[i]);
          l[i] += x;
        }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      a[kk][0] = pack_bf16(sc[(2 * kk) * 4 + 0], sc[(2 * kk) * 4 + 1]);          // row r0,     keys 16kk + cq
      a[kk][1] = pack_bf16(sc[(2 * kk) * 4 + 2], sc[(2 * kk) * 4 + 3]);          // row r0 + 8, keys 16kk + cq
      a[kk][2] = pack_bf16(sc[(2 * kk + 1) * 4 + 0], sc[(2 * kk + 1) * 4 + 1]);  // row r0,     keys 16kk + 8 + cq
      a[kk][3] = pack_bf16(sc[(2 * kk + 1) * 4 + 2], sc[(2 * kk + 1) * 4 + 3]);  // row r0 + 8, keys 16kk + 8 + cq
    }
  };

  // Software pipeline (FlashAttention-3's intra-warpgroup overlap): while O += P_{t-1} V_{t-1} runs on the tensor
  // cores, the softmax of S_t = Q K_t^T (issued just before it) runs on the FP/MUFU units. O is rescaled by
  // alpha_t only after that P V has retired; P_t goes to its own registers because P_{t-1} is still being read.
  // one pipeline step for key block t >= 1: P_{t-1} (in `p_in`) V_{t-1} runs while P_t goes to `p_out`
  float alpha[2];
  auto step = [&](int t, const uint32_t (&p_in)[4][4], uint32_t (&p_out)[4][4]) {
    float sc[32];
    mbar_wait(&bars.k_full[c][t % kStages], phase_of(t));
    issue_qk(sc, k_addr_of(t));
    mbar_wait(&bars.v_full[c][(t - 1) % kStages], phase_of(t - 1));
    fence_regs(o);
    issue_pv(p_in, k_addr_of(t - 1) + C::kTileBytes);
    wgmma_wait<1>();  // S_t done (groups retire in order); P_{t-1} V_{t-1} may still run
    fence_regs(sc);
    softmax(sc, p.block_sizes[list[t]], alpha, p_out);
    wgmma_wait<0>();
    fence_regs(o);
    mbar_arrive(&bars.empty[c][(t - 1) % kStages]);  // this thread no longer reads block t - 1's stage
#pragma unroll
    for (int j8 = 0; j8 < D / 8; ++j8)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        o[j8 * 4 + i * 2 + 0] *= alpha[i];
        o[j8 * 4 + i * 2 + 1] *= alpha[i];
      }
  };
  auto last_pv = [&](const uint32_t (&p_in)[4][4]) {
    mbar_wait(&bars.v_full[c][(num - 1) % kStages], phase_of(num - 1));
    fence_regs(o);
    issue_pv(p_in, k_addr_of(num - 1) + C::kTileBytes);
    wgmma_wait<0>();
    fence_regs(o);
    mbar_arrive(&bars.empty[c][(num - 1) % kStages]);
  };

  mbar_wait(&bars.q_full[c], 0);
  uint32_t p_even[4][4], p_odd[4][4];  // P of even / odd t: two sets, so no copy between in-flight registers
  {
    float sc[32];
    mbar_wait(&bars.k_full[c][0], 0);
    issue_qk(sc, k_addr_of(0));
    wgmma_wait<0>();
    fence_regs(sc);
    softmax(sc, p.block_sizes[list[0]], alpha, p_even);  // O = 0: no rescale
  }
  int t = 1;
  for (; t + 1 < num; t += 2) {
    step(t, p_even, p_odd);
    step(t + 1, p_odd, p_even);
  }
  if (t < num) {
    step(t, p_even, p_odd);
    last_pv(p_odd);
  } else {
    last_pv(p_even);
  }

  // ---- epilogue: out_s = O / l; out = out_s + out_c (* gate); lse = m + log2(l)
  const int row_first = tile * kBlock;  // first row of the tile in the [BH*S, D] view (tile = bh * N + qb)
  const float* oc_row = p.out_c + static_cast<int64_t>(tile) * D;
  const int valid_rows = p.block_sizes[tile % p.n];
  const __nv_bfloat16* gate = static_cast<const __nv_bfloat16*>(p.gate);
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  __nv_bfloat16* out_s = static_cast<__nv_bfloat16*>(p.out_s);
  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    inv[i] = rcp_approx(l[i]);  // l >= 1 (the row max contributes ex2(0) = 1)
    if (lane % 4 == 0) p.lse[row_first + r0 + 8 * i] = m[i] + __log2f(l[i]);
  }
#pragma unroll
  for (int j8 = 0; j8 < D / 8; ++j8) {
    const int col = j8 * 8 + cq;
    const float2 oc = *reinterpret_cast<const float2*>(oc_row + col);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t at = static_cast<int64_t>(row_first + r0 + 8 * i) * D + col;
      const float s0 = o[j8 * 4 + i * 2 + 0] * inv[i];
      const float s1 = o[j8 * 4 + i * 2 + 1] * inv[i];
      float2 w = oc;
      if (gate != nullptr) {
        const float2 g = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(gate + at));
        w.x *= g.x;
        w.y *= g.y;
      }
      const bool real = r0 + 8 * i < valid_rows;  // pad query rows: zero
      *reinterpret_cast<__nv_bfloat162*>(out + at) =
          real ? __floats2bfloat162_rn(s0 + w.x, s1 + w.y) : __floats2bfloat162_rn(0.f, 0.f);
      if (out_s != nullptr)
        *reinterpret_cast<__nv_bfloat162*>(out_s + at) =
            real ? __floats2bfloat162_rn(s0, s1) : __floats2bfloat162_rn(0.f, 0.f);
    }
  }
}

// grid: ceil(BH * N / kConsumers) CTAs of kThreads; consecutive CTAs take consecutive query blocks of one head,
// so their K/V tiles tend to be L2-resident together.
template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    vsa_fwd_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const FwdArgs p) {
  using C = Cfg<D>;
  extern __shared__ uint8_t smem_raw[];
  __shared__ Barriers bars;
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int wg = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;
  const int tiles = static_cast<int>(p.bh) * p.n;

  if (threadIdx.x == 0) {
    for (int c = 0; c < kConsumers; ++c) {
      mbar_init(&bars.q_full[c], 1);
      for (int s = 0; s < kStages; ++s) {
        mbar_init(&bars.k_full[c][s], 1);
        mbar_init(&bars.v_full[c][s], 1);
        mbar_init(&bars.empty[c][s], 128);
      }
    }
    mbar_fence_init();
    tma_prefetch_desc(&tm_q);
    tma_prefetch_desc(&tm_k);
    tma_prefetch_desc(&tm_v);
  }
  __syncthreads();

  if (wg == 0) {
    regs_dealloc<kProducerRegs>();
    const int c = tid / 32;  // warp c of the producer warpgroup feeds consumer c
    const int tile = static_cast<int>(blockIdx.x) * kConsumers + c;
    if (c < kConsumers && tid % 32 == 0 && tile < tiles)
      produce<D>(&tm_q, &tm_k, &tm_v, p, bars, smem + c * C::kConsumerBytes, c, tile);
  } else {
    regs_alloc<kConsumerRegs>();
    const int c = wg - 1;
    const int tile = static_cast<int>(blockIdx.x) * kConsumers + c;
    if (tile < tiles) consume<D>(p, bars, smem + c * C::kConsumerBytes, c, tile, tid);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------------------------
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// [rows, d] bf16 row-major -> map with [64 rows, 64 columns] boxes, 128-byte swizzle (the wgmma SW128 layout).
bool make_map(CUtensorMap* map, const void* base, uint64_t rows, int d) {
  auto encode = encode_fn();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(d), rows};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(d) * 2};  // bytes, dimension 1
  const cuuint32_t box[2] = {64, kBlock};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int D>
cudaError_t launch(const FwdArgs& a, cudaStream_t stream) {
  using C = Cfg<D>;
  const uint64_t rows = static_cast<uint64_t>(a.bh) * a.n * kBlock;
  CUtensorMap tm_q, tm_k, tm_v;
  if (!make_map(&tm_q, a.q, rows, D) || !make_map(&tm_k, a.k, rows, D) || !make_map(&tm_v, a.v, rows, D))
    return encode_fn() == nullptr ? cudaErrorNotSupported : cudaErrorInvalidValue;
  cudaError_t err = cudaFuncSetAttribute(vsa_fwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles = a.bh * a.n;
  const unsigned grid = static_cast<unsigned>((tiles + kConsumers - 1) / kConsumers);
  vsa_fwd_kernel<D><<<grid, kThreads, C::kSmemBytes, stream>>>(tm_q, tm_k, tm_v, a);
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace

cudaError_t fwd_sm90(const FwdArgs& a, cudaStream_t stream) {
  const uint64_t rows = static_cast<uint64_t>(a.bh) * a.n * kBlock;
  if (a.bh <= 0 || a.n <= 0 || a.maxk <= 0 || rows >= (1ull << 31)) return cudaErrorInvalidValue;  // TMA int32 rows
  if (!aligned16(a.q) || !aligned16(a.k) || !aligned16(a.v)) return cudaErrorInvalidValue;
  if (a.head_dim == 128) return launch<128>(a, stream);
  if (a.head_dim == 64) return launch<64>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace vsa_sm90
