// Video Sparse Attention, fine-stage FORWARD for Hopper (sm_90a): block-sparse flash attention over 64x64 blocks,
// with the K/V tiles that two neighbouring query blocks both select loaded once for both.
//
// Correctness: tests/gpu/test_vsa_cuda.py; ptxas resources: BUILD_NOTES.md here; speed: benchmarks/NOTES.md.
//
// Contract (same as `_fwd_kernel` in diffusers_dist_attn/vsa/triton_kernels.py), per (batch*head bh, query block
// qb) with S = 64 N tokens per head:
//   for t < q2k_num[bh, qb]:  kb = q2k_idx[bh, qb, t];  keys/values = rows kb*64 .. kb*64+63 of K[bh], V[bh]
//   logits = Q_blk K_kb^T * scale, key slots >= block_sizes[kb] masked to -inf; online softmax (base 2)
//   out_s = softmax(...) V;  out = out_s + out_c[bh, qb, :] (* gate);  lse = m + log2(l) (base 2, of s*scale*log2e)
// All 64 query rows of a block are computed (pad query rows too, as the Triton kernel does). Key blocks are
// visited in ascending index order (the softmax does not depend on the order; the lists need not be sorted).
//
// CTA layout (384 threads = 3 warpgroups, one CTA per SM: __launch_bounds__(384, 1)), one CTA per query-block
// pair (bh, 2j) and (bh, 2j + 1) of one head -- neighbouring cubes, whose lists overlap on real video:
//   all threads first mark both lists in two shared bitmaps over the N key blocks; the CTA then walks the
//   *union* of the lists in ascending order (the same walk in every role, `UnionWalk`).
//   warpgroup 0 = producer: one thread streams both Q tiles and, per union entry, the K/V tile once through TMA
//                 (cp.async.bulk.tensor, SWIZZLE_128B) into a kStages-deep ring that both consumers read.
//                 setmaxnreg.dec to kProducerRegs registers.
//   warpgroups 1, 2 = consumers: consumer c owns query block 2j + c (64 rows): S = Q K^T with wgmma m64n64k16
//                 (A, B from shared memory), online softmax in registers, O += P V with wgmma m64n{D}k16 (P from
//                 registers, V from shared memory, transposed) -- for the union entries in its own list only.
//                 setmaxnreg.inc to kConsumerRegs registers.
// Shared memory: Q0, Q1 [64, D] + kStages x (K [64, D] + V [64, D]) in bf16, every [64, D] tile stored as D/64
// "halves" of [64 rows][64 columns] = 8 KB (128-byte rows, 128B-swizzled by TMA), 1024-byte aligned; then the
// two bitmaps (N bits each). D = 128: 160 KB of tiles; D = 64: 80 KB.
//
// Synchronisation (all mbarriers, stage s = union position u % kStages, phase (u / kStages) & 1):
//   q_full[c]    producer expect_tx(Q bytes) + TMA completion            -> consumer c waits (parity 0)
//   k_full[s]    producer expect_tx(K bytes) + TMA completion            -> every consumer waits, in union order,
//                                                                          also for entries it skips, so that no
//                                                                          consumer runs a phase ahead of the ring
//   v_full[s]    producer expect_tx(V bytes) + TMA completion            -> a consumer that uses the entry waits
//   empty[s]     256 arrivals: each consumer thread once per union entry, after its P V wgmma retired (or at
//                once, after k_full, for an entry it skips)              -> producer waits before reusing stage s
//
// Not done (in order of expected value): sharing across a 2-CTA cluster with TMA multicast (4 query blocks),
// intra-warpgroup overlap of softmax with the next S = Q K^T (FA3-style), a persistent grid, TMA stores of O,
// fp16 inputs, the backward (Triton's is used).

#include <cuda_bf16.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include "sm90_ptx.cuh"
#include "vsa_fwd_sm90.h"

namespace vsa_sm90 {
namespace {

constexpr int kBlock = 64;                   // tokens per block (rows of a tile)
constexpr int kStages = 4;                   // shared K/V ring depth
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
  static constexpr int kTileBytes = kHalfBytes * kHalves;                      // one [64, D] bf16 tile
  static constexpr int kRingOffset = kConsumers * kTileBytes;                  // after Q0, Q1
  static constexpr int kTilesBytes = kRingOffset + 2 * kStages * kTileBytes;  // + ring of (K, V)
  static constexpr int kAcc = D / 2;                                          // O: 64 x D fp32 over 128 threads
};

struct Barriers {
  uint64_t q_full[kConsumers];
  uint64_t k_full[kStages];
  uint64_t v_full[kStages];
  uint64_t empty[kStages];
};

// The union of the two query blocks' key lists in ascending block order, read from the shared bitmaps
// `bits[c][word]` (bit b of word w = key block 32 w + b is in consumer c's list). Every role runs the same walk.
struct UnionWalk {
  const uint32_t* bits0;
  const uint32_t* bits1;
  int words;
  int word = -1;
  uint32_t rest = 0;   // union bits of `word` not visited yet
  uint32_t mine0 = 0;  // consumer 0's bits of `word`
  uint32_t mine1 = 0;

  // Next entry: false at the end; else `block` and `users` (bit c: consumer c's list has it).
  __device__ __forceinline__ bool next(int& block, uint32_t& users) {
    while (rest == 0) {
      if (++word >= words) return false;
      mine0 = bits0[word];
      mine1 = bits1[word];
      rest = mine0 | mine1;
    }
    const int bit = __ffs(rest) - 1;
    rest &= rest - 1;
    block = word * 32 + bit;
    users = ((mine0 >> bit) & 1u) | (((mine1 >> bit) & 1u) << 1);
    return true;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// producer: one thread issues all TMA loads of the CTA
// ---------------------------------------------------------------------------------------------------------------
template <int D>
__device__ __forceinline__ void produce(const CUtensorMap* tm_q, const CUtensorMap* tm_k, const CUtensorMap* tm_v,
                                        const FwdArgs& p, Barriers& bars, uint8_t* smem, UnionWalk walk, int bh,
                                        int qb0) {
  using C = Cfg<D>;
  const int row_base = bh * p.n * kBlock;  // first row of this head in the [BH*S, D] view (host: BH*S < 2^31)
  for (int c = 0; c < kConsumers && qb0 + c < p.n; ++c) {
    mbar_arrive_expect_tx(&bars.q_full[c], C::kTileBytes);
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h)
      tma_load_2d(smem + c * C::kTileBytes + h * kHalfBytes, tm_q, &bars.q_full[c], h * 64,
                  row_base + (qb0 + c) * kBlock);
  }
  int block;
  uint32_t users;
  for (int u = 0; walk.next(block, users); ++u) {
    const int s = u % kStages;
    const uint32_t phase = (u / kStages) & 1;
    const int row = row_base + block * kBlock;
    uint8_t* k_dst = smem + C::kRingOffset + C::kTileBytes * (2 * s);
    uint8_t* v_dst = k_dst + C::kTileBytes;
    mbar_wait(&bars.empty[s], phase ^ 1);  // first pass through the ring: returns at once
    mbar_arrive_expect_tx(&bars.k_full[s], C::kTileBytes);
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h) tma_load_2d(k_dst + h * kHalfBytes, tm_k, &bars.k_full[s], h * 64, row);
    mbar_arrive_expect_tx(&bars.v_full[s], C::kTileBytes);
#pragma unroll
    for (int h = 0; h < C::kHalves; ++h) tma_load_2d(v_dst + h * kHalfBytes, tm_v, &bars.v_full[s], h * 64, row);
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo = the lower column
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------------------------------------
// consumer: one warpgroup, one 64-row query tile (or none: `tile` < 0 only keeps the ring's arrivals going)
// ---------------------------------------------------------------------------------------------------------------
// Accumulator fragment of wgmma m64nNk16 (fp32) for thread tid of the warpgroup (warp w = tid / 32, lane l):
//   d[j8 * 4 + i * 2 + e]  =  D[row = 16 w + l / 4 + 8 i][col = 8 j8 + 2 (l % 4) + e],  i, e in {0, 1}
// so each thread holds 2 rows (r0, r0 + 8) and each row is spread over the 4 lanes of a quad.
template <int D>
__device__ __forceinline__ void consume(const FwdArgs& p, Barriers& bars, uint8_t* smem, UnionWalk walk, int c,
                                        int tile, int tid) {
  using C = Cfg<D>;
  const int warp = tid / 32, lane = tid % 32;
  const int r0 = warp * 16 + lane / 4;
  const int cq = (lane % 4) * 2;
  const float qk_scale = p.scale * kLog2e;
  const uint32_t q_addr = smem_u32(smem + c * C::kTileBytes);
  const uint32_t ring_addr = smem_u32(smem + C::kRingOffset);

  float o[C::kAcc];
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};  // per-thread partial row sums (reduced over the quad at the end)

  if (tile >= 0) mbar_wait(&bars.q_full[c], 0);
  int block;
  uint32_t users;
  for (int u = 0; walk.next(block, users); ++u) {
    const int s = u % kStages;
    const uint32_t phase = (u / kStages) & 1;
    mbar_wait(&bars.k_full[s], phase);
    if (!((users >> c) & 1u)) {  // the other consumer's entry: release the stage at once
      mbar_arrive(&bars.empty[s]);
      continue;
    }
    const int valid = p.block_sizes[block];  // real keys in this key block
    const uint32_t k_addr = ring_addr + C::kTileBytes * (2 * s);
    const uint32_t v_addr = k_addr + C::kTileBytes;

    // ---- S[64 x 64] = Q[64 x D] K^T: D/16 k-steps; step kk reads columns 16 kk.. of half kk / 4
    float sc[32];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk / 4) * kHalfBytes + (kk % 4) * 32;
      wgmma_ss_m64n64k16(sc, make_desc_sw128(q_addr + off, 16, 1024), make_desc_sw128(k_addr + off, 16, 1024),
                         kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(sc);

    // ---- online softmax (base 2); pad keys (col >= valid) -> -inf
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
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      alpha[i] = ex2(m[i] - mx[i]);  // first step: ex2(-inf) = 0 (valid >= 1, so mx is finite)
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
    for (int j8 = 0; j8 < D / 8; ++j8)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        o[j8 * 4 + i * 2 + 0] *= alpha[i];
        o[j8 * 4 + i * 2 + 1] *= alpha[i];
      }

    // ---- P (bf16) as wgmma A fragments: k-step kk covers keys 16 kk .. 16 kk + 15 = accumulator chunks 2kk, 2kk+1
    uint32_t a[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      a[kk][0] = pack_bf16(sc[(2 * kk) * 4 + 0], sc[(2 * kk) * 4 + 1]);          // row r0,     keys 16kk + cq
      a[kk][1] = pack_bf16(sc[(2 * kk) * 4 + 2], sc[(2 * kk) * 4 + 3]);          // row r0 + 8, keys 16kk + cq
      a[kk][2] = pack_bf16(sc[(2 * kk + 1) * 4 + 0], sc[(2 * kk + 1) * 4 + 1]);  // row r0,     keys 16kk + 8 + cq
      a[kk][3] = pack_bf16(sc[(2 * kk + 1) * 4 + 2], sc[(2 * kk + 1) * 4 + 3]);  // row r0 + 8, keys 16kk + 8 + cq
    }

    // ---- O[64 x D] += P[64 x 64] V[64 x D]: 4 k-steps of 16 keys = 16 rows (2 KB) of each V half
    mbar_wait(&bars.v_full[s], phase);
    fence_regs(o);
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
    wgmma_wait<0>();
    fence_regs(o);
    mbar_arrive(&bars.empty[s]);  // this thread no longer reads stage s
  }
  if (tile < 0) return;

  // ---- epilogue: out_s = O / l; out = out_s + out_c (* gate); lse = m + log2(l)
  const int row_first = tile * kBlock;  // first row of the tile in the [BH*S, D] view (tile = bh * N + qb)
  const float* oc_row = p.out_c + static_cast<int64_t>(tile) * D;
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
      *reinterpret_cast<__nv_bfloat162*>(out + at) = __floats2bfloat162_rn(s0 + w.x, s1 + w.y);
      if (out_s != nullptr) *reinterpret_cast<__nv_bfloat162*>(out_s + at) = __floats2bfloat162_rn(s0, s1);
    }
  }
}

// grid: BH * ceil(N / 2) CTAs of kThreads, CTA x -> head x / ceil(N / 2), query blocks 2 (x % ceil(N / 2)) + {0, 1};
// consecutive CTAs take consecutive query blocks of one head, so their K/V tiles tend to be L2-resident together.
template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    vsa_fwd_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const FwdArgs p) {
  using C = Cfg<D>;
  extern __shared__ uint8_t smem_raw[];
  __shared__ Barriers bars;
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint32_t* bits = reinterpret_cast<uint32_t*>(smem + C::kTilesBytes);  // [kConsumers][words]
  const int words = (p.n + 31) / 32;
  const int pairs = (p.n + 1) / 2;
  const int bh = static_cast<int>(blockIdx.x) / pairs;
  const int qb0 = (static_cast<int>(blockIdx.x) - bh * pairs) * 2;
  const int wg = threadIdx.x / 128;
  const int tid = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    for (int c = 0; c < kConsumers; ++c) mbar_init(&bars.q_full[c], 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&bars.k_full[s], 1);
      mbar_init(&bars.v_full[s], 1);
      mbar_init(&bars.empty[s], 128 * kConsumers);
    }
    mbar_fence_init();
    tma_prefetch_desc(&tm_q);
    tma_prefetch_desc(&tm_k);
    tma_prefetch_desc(&tm_v);
  }
  for (int i = threadIdx.x; i < kConsumers * words; i += kThreads) bits[i] = 0u;
  __syncthreads();
  for (int i = threadIdx.x; i < kConsumers * p.maxk; i += kThreads) {
    const int c = i / p.maxk, t = i - c * p.maxk;
    const int tile = bh * p.n + qb0 + c;
    if (qb0 + c < p.n && t < p.q2k_num[tile]) {
      const int block = p.q2k_idx[static_cast<int64_t>(tile) * p.maxk + t];
      atomicOr(&bits[c * words + block / 32], 1u << (block % 32));
    }
  }
  __syncthreads();
  const UnionWalk walk{bits, bits + words, words};

  if (wg == 0) {
    regs_dealloc<kProducerRegs>();
    if (tid == 0) produce<D>(&tm_q, &tm_k, &tm_v, p, bars, smem, walk, bh, qb0);
  } else {
    regs_alloc<kConsumerRegs>();
    const int c = wg - 1;
    consume<D>(p, bars, smem, walk, c, qb0 + c < p.n ? bh * p.n + qb0 + c : -1, tid);
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
  // tiles + the two bitmaps + slack to align the base to 1024 B (the 128-byte swizzle); Hopper allows 227 KB
  const int smem_bytes = C::kTilesBytes + kConsumers * ((a.n + 31) / 32) * 4 + 1024;
  if (smem_bytes > 227 * 1024) return cudaErrorInvalidValue;
  cudaError_t err = cudaFuncSetAttribute(vsa_fwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  const int64_t ctas = a.bh * ((a.n + 1) / 2);
  vsa_fwd_kernel<D><<<static_cast<unsigned>(ctas), kThreads, smem_bytes, stream>>>(tm_q, tm_k, tm_v, a);
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
