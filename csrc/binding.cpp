// Torch binding of the hypenet CUDA kernels: operator schemas (namespace hypenet_cuda), CUDA
// implementations and the `hypenet._C` Python module whose import registers them.
//
// The public ops `hypenet::*` are Python custom ops that validate their inputs and call
// `torch.ops.hypenet_cuda.*`; the checks here are a last line of defence against a device fault,
// not the user-facing validation.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "common/params.h"
#include "common/static_switch.h"
#include "lightning/lightning_attn_step.h"
#include "lightning/lightning_chunk_scan.h"

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

using NamedTensor = std::pair<const at::Tensor*, const char*>;

// t must be a CUDA tensor on `device`, the device of the argument named `reference`.
void check_cuda_on(const at::Tensor& t, const char* name, const at::Device& device, const char* reference) {
  TORCH_CHECK(t.is_cuda(), "hypenet_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "hypenet_cuda: ", name, " is on ", t.device(), " but ", reference, " is on ",
              device);
}

// Every tensor must be a CUDA tensor on the device of the first one, which is returned.
at::Device check_on_one_cuda_device(std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  const at::Device device = first.first->device();
  for (const auto& [t, name] : tensors) check_cuda_on(*t, name, device, first.second);
  return device;
}

// q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H] fp32; state [N, H, K, V] fp32 contiguous,
// updated in place; state_indices [B] int32/int64. Returns o [B, T, H, V] in q's dtype.
at::Tensor lightning_attn_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& log_decay, const at::Tensor& state,
                               const at::Tensor& state_indices, double scale) {
  const at::Device device = check_on_one_cuda_device(
      {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&log_decay, "log_decay"}, {&state, "state"},
       {&state_indices, "state_indices"}});

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

// The output stage of the chunked scan over an equal-length batch (lightning_chunk_scan.h).
// a, b [B, T, H, D]; c [B, T, H, D] bf16 contiguous, D in {64, 128}; log_decay [H] fp32;
// start_state [B * num_segs or B, H, D, D] fp32 (any strides); final_state [B, H, D, D] fp32 and
// out [B, T, H, D] bf16 contiguous are written.
void lightning_chunk_scan(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& log_decay,
                          const std::optional<at::Tensor>& start_state, const std::optional<at::Tensor>& final_state,
                          const at::Tensor& out, int64_t seg_len, int64_t num_segs, double scale,
                          double state_in_scale, double state_out_scale, bool reverse, bool start_per_segment) {
  const at::Device device =
      check_on_one_cuda_device({{&a, "a"}, {&b, "b"}, {&c, "c"}, {&out, "out"}, {&log_decay, "log_decay"}});
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device.index());
  TORCH_CHECK(props->major == 9 && props->minor == 0,
              "hypenet_cuda.lightning_chunk_scan: the kernel issues Hopper warpgroup MMAs (sm_90a), but ", device,
              " is sm_", props->major, props->minor);
  TORCH_CHECK(a.dim() == 4 && a.sizes() == b.sizes() && a.sizes() == c.sizes() && a.sizes() == out.sizes(),
              "hypenet_cuda.lightning_chunk_scan: a, b, c, out must be [B, T, H, D] of one shape, got ", a.sizes(),
              ", ", b.sizes(), ", ", c.sizes(), ", ", out.sizes());
  const int64_t batch = a.size(0), seqlen = a.size(1), heads = a.size(2), head_dim = a.size(3);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "hypenet_cuda.lightning_chunk_scan: D must be 64 or 128, got ",
              head_dim);
  for (const auto& [t, name] :
       {NamedTensor{&a, "a"}, NamedTensor{&b, "b"}, NamedTensor{&c, "c"}, NamedTensor{&out, "out"}}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous(), "hypenet_cuda.lightning_chunk_scan: ", name,
                " must be contiguous bfloat16, got ", t->scalar_type(), t->is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "hypenet_cuda.lightning_chunk_scan: ", name,
                "'s data pointer must be 16-byte aligned (the kernel copies 16-byte vectors)");
  }
  TORCH_CHECK(log_decay.scalar_type() == at::kFloat && log_decay.dim() == 1 && log_decay.size(0) == heads &&
                  log_decay.is_contiguous(),
              "hypenet_cuda.lightning_chunk_scan: log_decay must be contiguous float32 [H=", heads, "], got ",
              log_decay.scalar_type(), " ", log_decay.sizes());
  TORCH_CHECK(seg_len > 0 && seg_len % 64 == 0 && seg_len <= INT_MAX,
              "hypenet_cuda.lightning_chunk_scan: seg_len must be a positive multiple of 64, got ", seg_len);
  const int64_t expected_segs = seqlen > 0 ? (seqlen + seg_len - 1) / seg_len : 1;
  TORCH_CHECK(num_segs == expected_segs, "hypenet_cuda.lightning_chunk_scan: num_segs must be ceil(T / seg_len) = ",
              expected_segs, ", got ", num_segs);
  auto check_state = [&](const at::Tensor& t, const char* name, int64_t rows) {
    check_cuda_on(t, name, device, "a");
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 4 && t.size(0) == rows && t.size(1) == heads &&
                    t.size(2) == head_dim && t.size(3) == head_dim,
                "hypenet_cuda.lightning_chunk_scan: ", name, " must be float32 [", rows, ", ", heads, ", ", head_dim,
                ", ", head_dim, "], got ", t.scalar_type(), " ", t.sizes());
  };
  if (start_state.has_value()) check_state(*start_state, "start_state", start_per_segment ? batch * num_segs : batch);
  if (final_state.has_value()) check_state(*final_state, "final_state", batch);
  const int64_t num_programs = batch * num_segs * heads;
  TORCH_CHECK(seqlen <= INT_MAX && num_programs <= INT_MAX && heads <= INT_MAX,
              "hypenet_cuda.lightning_chunk_scan: sizes too large for one launch");

  const c10::cuda::CUDAGuard device_guard(device);
  LightningScanParams params{};
  params.a = a.data_ptr();
  params.b = b.data_ptr();
  params.c = c.data_ptr();
  params.out = out.data_ptr();
  params.log_decay = log_decay.data_ptr<float>();
  if (start_state.has_value()) {
    params.start_state = start_state->data_ptr<float>();
    params.start_stride_n = start_state->stride(0);
    params.start_stride_h = start_state->stride(1);
    params.start_stride_a = start_state->stride(2);
    params.start_stride_c = start_state->stride(3);
  }
  if (final_state.has_value()) {
    params.final_state = final_state->data_ptr<float>();
    params.final_stride_n = final_state->stride(0);
    params.final_stride_h = final_state->stride(1);
    params.final_stride_a = final_state->stride(2);
    params.final_stride_c = final_state->stride(3);
  }
  params.seqlen = static_cast<int>(seqlen);
  params.heads = static_cast<int>(heads);
  params.seg_len = static_cast<int>(seg_len);
  params.num_segs = static_cast<int>(num_segs);
  params.num_programs = num_programs;
  params.scale = static_cast<float>(scale);
  params.state_in_scale = static_cast<float>(state_in_scale);
  params.state_out_scale = static_cast<float>(state_out_scale);
  params.start_per_segment = start_per_segment;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  HYPENET_HEADDIM_SWITCH(head_dim, [&] {
    if (reverse) {
      run_lightning_chunk_scan<kHeadDim, true>(params, stream);
    } else {
      run_lightning_chunk_scan<kHeadDim, false>(params, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace hypenet

TORCH_LIBRARY(hypenet_cuda, m) {
  m.def(
      "lightning_attn_step(Tensor q, Tensor k, Tensor v, Tensor log_decay, Tensor(a!) state, "
      "Tensor state_indices, float scale) -> Tensor");
  m.def(
      "lightning_chunk_scan(Tensor a, Tensor b, Tensor c, Tensor log_decay, Tensor? start_state, "
      "Tensor(a!)? final_state, Tensor(b!) out, int seg_len, int num_segs, float scale, float state_in_scale, "
      "float state_out_scale, bool reverse, bool start_per_segment) -> ()");
}

TORCH_LIBRARY_IMPL(hypenet_cuda, CUDA, m) {
  m.impl("lightning_attn_step", &hypenet::lightning_attn_step);
  m.impl("lightning_chunk_scan", &hypenet::lightning_chunk_scan);
}

// `import hypenet._C` loads this library, which runs the registrations above; the module itself
// holds nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
