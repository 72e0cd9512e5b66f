// Host interface of the VSA fine-stage forward for sm_90a (vsa_fwd_sm90.cu). Plain C++: no torch headers,
// so the .cu also compiles on its own (tests/test_cuda_compile.py) and the torch binding (vsa_binding.cpp) only
// fills this struct.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace vsa_sm90 {

// All tensors contiguous. BH = batch * heads, N = number of 64-token blocks, S = 64 * N, D = head_dim (64 or 128).
struct FwdArgs {
  const void* q;             // bf16 [BH, S, D]
  const void* k;             // bf16 [BH, S, D]
  const void* v;             // bf16 [BH, S, D]
  const void* gate;          // bf16 [BH, S, D] or nullptr (then out = out_s + out_c)
  const float* out_c;        // fp32 [BH, N, D]: coarse-stage output per query block
  const int32_t* q2k_idx;    // int32 [BH, N, maxk]: selected key blocks per query block (first q2k_num[.., 2] valid)
  const int32_t* q2k_num;    // int32 [BH, N, 3]: ends of the lists' size-class groups (the last = list length)
  const int32_t* block_sizes;  // int32 [N]: real tokens per block (1..64); key slots >= block_sizes[j] are masked
  void* out;                 // bf16 [BH, S, D]: out_s + out_c[block] (* gate)
  void* out_s;               // bf16 [BH, S, D] or nullptr: the sparse-attention part alone (saved for backward)
  float* lse;                // fp32 [BH, S]: base-2 log-sum-exp of s * scale * log2(e) over the selected keys
  int64_t bh;
  int32_t n;
  int32_t maxk;
  int32_t head_dim;
  float scale;               // softmax scale (not yet multiplied by log2 e)
};

// Launches the forward on `stream`. Returns cudaSuccess, or the first error (unsupported head_dim/alignment
// give cudaErrorInvalidValue; a missing driver entry point for cuTensorMapEncodeTiled cudaErrorNotSupported).
cudaError_t fwd_sm90(const FwdArgs& args, cudaStream_t stream);

}  // namespace vsa_sm90
