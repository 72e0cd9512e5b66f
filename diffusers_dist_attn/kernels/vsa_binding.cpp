// Python binding of the sm_90a VSA forward (vsa_fwd_sm90.cu), built on first use by
// diffusers_dist_attn/vsa/cuda_build.py (torch.utils.cpp_extension.load); see README.md in this folder.
//
// sparse_fwd(q, k, v, gate?, out_c, q2k_idx, q2k_num, block_sizes, scale, out, out_s?, lse) writes `out`, `out_s`
// (when given) and `lse` in place; the caller allocates them (so tests can poison them first). Shapes as in
// `triton_kernels.sparse_fwd`: q, k, v, gate, out, out_s bf16 [B, H, 64N, D]; out_c fp32 [B, H, N, D]; q2k_idx int32
// [B, H, N, maxk]; q2k_num int32 [B, H, N, 3] (ends of the size-class groups); block_sizes int32 [N]; lse fp32 [B, H, 64N].

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "vsa_fwd_sm90.h"

namespace {

void check(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.is_cuda(), "vsa_fwd_sm90: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "vsa_fwd_sm90: ", name, " has dtype ", t.scalar_type(), ", expected ",
              dtype);
  TORCH_CHECK(t.is_contiguous(), "vsa_fwd_sm90: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "vsa_fwd_sm90: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

void sparse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& gate,
                const at::Tensor& out_c, const at::Tensor& q2k_idx, const at::Tensor& q2k_num,
                const at::Tensor& block_sizes, double scale, at::Tensor out, const std::optional<at::Tensor>& out_s,
                at::Tensor lse) {
  TORCH_CHECK(q.dim() == 4, "vsa_fwd_sm90: q must be [B, H, 64N, D]");
  const int64_t b = q.size(0), h = q.size(1), s = q.size(2), d = q.size(3);
  TORCH_CHECK(s % 64 == 0 && s > 0, "vsa_fwd_sm90: sequence length ", s, " is not a positive multiple of 64");
  TORCH_CHECK(d == 64 || d == 128, "vsa_fwd_sm90: head_dim ", d, " not supported (64 or 128)");
  const int64_t n = s / 64;
  TORCH_CHECK(q2k_idx.dim() == 4, "vsa_fwd_sm90: q2k_idx must be [B, H, N, maxk]");
  const int64_t maxk = q2k_idx.size(3);
  const auto bf16 = at::kBFloat16;
  check(q, bf16, {b, h, s, d}, "q");
  check(k, bf16, {b, h, s, d}, "k");
  check(v, bf16, {b, h, s, d}, "v");
  if (gate.has_value()) check(*gate, bf16, {b, h, s, d}, "gate");
  check(out_c, at::kFloat, {b, h, n, d}, "out_c");
  check(q2k_idx, at::kInt, {b, h, n, maxk}, "q2k_idx");
  check(q2k_num, at::kInt, {b, h, n, 3}, "q2k_num");
  check(block_sizes, at::kInt, {n}, "block_sizes");
  check(out, bf16, {b, h, s, d}, "out");
  if (out_s.has_value()) check(*out_s, bf16, {b, h, s, d}, "out_s");
  check(lse, at::kFloat, {b, h, s}, "lse");
  TORCH_CHECK(b * h * s < (int64_t(1) << 31), "vsa_fwd_sm90: B*H*S must be < 2^31 (TMA coordinates are int32)");

  const c10::cuda::CUDAGuard guard(q.device());
  vsa_sm90::FwdArgs args{};
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.gate = gate.has_value() ? gate->data_ptr() : nullptr;
  args.out_c = out_c.data_ptr<float>();
  args.q2k_idx = q2k_idx.data_ptr<int32_t>();
  args.q2k_num = q2k_num.data_ptr<int32_t>();
  args.block_sizes = block_sizes.data_ptr<int32_t>();
  args.out = out.data_ptr();
  args.out_s = out_s.has_value() ? out_s->data_ptr() : nullptr;
  args.lse = lse.data_ptr<float>();
  args.bh = b * h;
  args.n = static_cast<int32_t>(n);
  args.maxk = static_cast<int32_t>(maxk);
  args.head_dim = static_cast<int32_t>(d);
  args.scale = static_cast<float>(scale);
  const cudaError_t err = vsa_sm90::fwd_sm90(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "vsa_fwd_sm90 launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "diffusers_dist_attn VSA fine-stage forward for sm_90a (wgmma + TMA)";
  m.def("sparse_fwd", &sparse_fwd, "VSA fine-stage forward (sm_90a): writes out, out_s (optional) and lse",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("gate"), pybind11::arg("out_c"),
        pybind11::arg("q2k_idx"), pybind11::arg("q2k_num"), pybind11::arg("block_sizes"), pybind11::arg("scale"),
        pybind11::arg("out"), pybind11::arg("out_s"), pybind11::arg("lse"));
}
