// Torch binding of the hypenet CUDA kernels: operator schemas (namespace hypenet_cuda), CUDA
// implementations and the `hypenet._C` Python module whose import registers them.
//
// The public ops `hypenet::*` are Python custom ops that validate their inputs and call
// `torch.ops.hypenet_cuda.*`; the checks here are a last line of defence against a device fault,
// not the user-facing validation.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

#include "common/params.h"
#include "common/static_switch.h"
#include "lightning/lightning_attn_step.h"

namespace hypenet {
namespace {

ElemType elem_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kHalf:
      return ElemType::kFloat16;
    case at::kFloat:
      return ElemType::kFloat32;
    default:
      TORCH_CHECK(false, "hypenet_cuda: unsupported dtype ", t.scalar_type(),
                  " (expected bfloat16, float16 or float32)");
  }
}

void check_cuda_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "hypenet_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "hypenet_cuda: ", name, " is on ", t.device(), " but q is on ",
              device);
}

// q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H] fp32; state [N, H, K, V] fp32 contiguous,
// updated in place; state_indices [B] int32/int64. Returns o [B, T, H, V] in q's dtype.
at::Tensor lightning_attn_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& log_decay, const at::Tensor& state,
                               const at::Tensor& state_indices, double scale) {
  const at::Device device = q.device();
  check_cuda_on(q, "q", device);
  check_cuda_on(k, "k", device);
  check_cuda_on(v, "v", device);
  check_cuda_on(log_decay, "log_decay", device);
  check_cuda_on(state, "state", device);
  check_cuda_on(state_indices, "state_indices", device);

  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "hypenet_cuda.lightning_attn_step: q, k, v must be 4-d [B, T, H, D], got ", q.sizes(),
              ", ", k.sizes(), ", ", v.sizes());
  const int64_t batch = q.size(0), seqlen = q.size(1), heads = q.size(2), head_dim_k = q.size(3);
  const int64_t head_dim_v = v.size(3);
  TORCH_CHECK(k.sizes() == q.sizes(), "hypenet_cuda.lightning_attn_step: k ", k.sizes(),
              " must match q ", q.sizes());
  TORCH_CHECK(v.size(0) == batch && v.size(1) == seqlen && v.size(2) == heads,
              "hypenet_cuda.lightning_attn_step: v ", v.sizes(), " must be [B, T, H, V] with q ",
              q.sizes());
  TORCH_CHECK(head_dim_k == head_dim_v && (head_dim_k == 64 || head_dim_k == 128),
              "hypenet_cuda.lightning_attn_step: needs K == V in {64, 128}, got K=", head_dim_k,
              " V=", head_dim_v);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "hypenet_cuda.lightning_attn_step: q, k, v must share a dtype, got ", q.scalar_type(),
              ", ", k.scalar_type(), ", ", v.scalar_type());
  const ElemType elem = elem_type_of(q);

  TORCH_CHECK(log_decay.scalar_type() == at::kFloat && log_decay.dim() == 1 &&
                  log_decay.size(0) == heads && log_decay.is_contiguous(),
              "hypenet_cuda.lightning_attn_step: log_decay must be contiguous float32 [H=", heads,
              "], got ", log_decay.scalar_type(), " ", log_decay.sizes());
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 4 && state.size(1) == heads &&
                  state.size(2) == head_dim_k && state.size(3) == head_dim_v,
              "hypenet_cuda.lightning_attn_step: state must be float32 [N, H=", heads, ", K=",
              head_dim_k, ", V=", head_dim_v, "], got ", state.scalar_type(), " ", state.sizes());
  // The kernel moves the state in 16-byte vectors.
  TORCH_CHECK(state.is_contiguous() && reinterpret_cast<uintptr_t>(state.data_ptr()) % 16 == 0,
              "hypenet_cuda.lightning_attn_step: state must be contiguous and 16-byte aligned");
  TORCH_CHECK((state_indices.scalar_type() == at::kInt || state_indices.scalar_type() == at::kLong) &&
                  state_indices.dim() == 1 && state_indices.size(0) == batch,
              "hypenet_cuda.lightning_attn_step: state_indices must be int32/int64 [B=",
              batch, "], got ", state_indices.scalar_type(), " ", state_indices.sizes());
  TORCH_CHECK(state.size(0) <= INT_MAX && batch * heads * 4 <= INT_MAX && seqlen <= INT_MAX,
              "hypenet_cuda.lightning_attn_step: sizes too large for one launch");

  const c10::cuda::CUDAGuard device_guard(device);
  at::Tensor o = at::empty({batch, seqlen, heads, head_dim_v}, q.options());

  LightningStepParams params{};
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.log_decay = log_decay.data_ptr<float>();
  params.state = state.data_ptr<float>();
  params.state_indices = state_indices.data_ptr();
  params.o = o.data_ptr();
  params.q_batch_stride = q.stride(0);
  params.q_time_stride = q.stride(1);
  params.q_head_stride = q.stride(2);
  params.q_dim_stride = q.stride(3);
  params.k_batch_stride = k.stride(0);
  params.k_time_stride = k.stride(1);
  params.k_head_stride = k.stride(2);
  params.k_dim_stride = k.stride(3);
  params.v_batch_stride = v.stride(0);
  params.v_time_stride = v.stride(1);
  params.v_head_stride = v.stride(2);
  params.v_dim_stride = v.stride(3);
  params.o_batch_stride = o.stride(0);
  params.o_time_stride = o.stride(1);
  params.o_head_stride = o.stride(2);
  params.state_slot_stride = state.stride(0);
  params.state_head_stride = state.stride(1);
  params.state_row_stride = state.stride(2);
  params.state_indices_stride = state_indices.stride(0);
  params.batch = static_cast<int>(batch);
  params.seqlen = static_cast<int>(seqlen);
  params.heads = static_cast<int>(heads);
  params.num_slots = static_cast<int>(state.size(0));
  params.scale = static_cast<float>(scale);
  params.indices_are_int64 = state_indices.scalar_type() == at::kLong;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  HYPENET_ELEM_TYPE_SWITCH(elem, [&] {
    HYPENET_HEADDIM_SWITCH(head_dim_k, [&] { run_lightning_attn_step<elem_t, kHeadDim>(params, stream); });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o;
}

}  // namespace
}  // namespace hypenet

TORCH_LIBRARY(hypenet_cuda, m) {
  m.def(
      "lightning_attn_step(Tensor q, Tensor k, Tensor v, Tensor log_decay, Tensor(a!) state, "
      "Tensor state_indices, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hypenet_cuda, CUDA, m) { m.impl("lightning_attn_step", &hypenet::lightning_attn_step); }

// `import hypenet._C` loads this library, which runs the registrations above; the module itself
// holds nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
