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

// What both chunked-scan ops check: a, b, c, out [B, T, H, D] bf16 contiguous and 16-byte aligned, D in
// {64, 128}, log_decay [H] fp32, on one Hopper GPU. Returns the device.
at::Device check_scan_operands(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                               const at::Tensor& out, const at::Tensor& log_decay) {
  const at::Device device =
      check_on_one_cuda_device({{&a, "a"}, {&b, "b"}, {&c, "c"}, {&out, "out"}, {&log_decay, "log_decay"}});
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device.index());
  TORCH_CHECK(props->major == 9 && props->minor == 0, op,
              ": the kernel issues Hopper warpgroup MMAs (sm_90a), but ", device, " is sm_", props->major,
              props->minor);
  TORCH_CHECK(a.dim() == 4 && a.sizes() == b.sizes() && a.sizes() == c.sizes() && a.sizes() == out.sizes(), op,
              ": a, b, c, out must be [B, T, H, D] of one shape, got ", a.sizes(), ", ", b.sizes(), ", ", c.sizes(),
              ", ", out.sizes());
  TORCH_CHECK(a.size(3) == 64 || a.size(3) == 128, op, ": D must be 64 or 128, got ", a.size(3));
  for (const auto& [t, name] :
       {NamedTensor{&a, "a"}, NamedTensor{&b, "b"}, NamedTensor{&c, "c"}, NamedTensor{&out, "out"}}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous(), op, ": ", name,
                " must be contiguous bfloat16, got ", t->scalar_type(), t->is_contiguous() ? "" : " (not contiguous)");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op, ": ", name,
                "'s data pointer must be 16-byte aligned (the kernel copies 16-byte vectors)");
  }
  TORCH_CHECK(log_decay.scalar_type() == at::kFloat && log_decay.dim() == 1 && log_decay.size(0) == a.size(2) &&
                  log_decay.is_contiguous(),
              op, ": log_decay must be contiguous float32 [H=", a.size(2), "], got ", log_decay.scalar_type(), " ",
              log_decay.sizes());
  TORCH_CHECK(a.size(1) <= INT_MAX && a.size(2) <= INT_MAX, op, ": sizes too large for one launch");
  return device;
}

// The view of an fp32 state tensor [rows, H, D, D] (any strides) on `device`; absent: a null view.
StateView state_view(const char* op, const std::optional<at::Tensor>& t, const char* name, const at::Device& device,
                     int64_t rows, const at::Tensor& a) {
  if (!t.has_value()) return StateView{};
  check_cuda_on(*t, name, device, "a");
  const int64_t heads = a.size(2), head_dim = a.size(3);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->size(0) == rows && t->size(1) == heads &&
                  t->size(2) == head_dim && t->size(3) == head_dim,
              op, ": ", name, " must be float32 [", rows, ", ", heads, ", ", head_dim, ", ", head_dim, "], got ",
              t->scalar_type(), " ", t->sizes());
  return StateView{t->data_ptr<float>(), t->stride(0), t->stride(1), t->stride(2), t->stride(3)};
}

void launch_scan(LightningScanParams& params, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                 const at::Tensor& out, const at::Tensor& log_decay, double scale, double state_in_scale,
                 double state_out_scale, bool reverse) {
  params.a = a.data_ptr();
  params.b = b.data_ptr();
  params.c = c.data_ptr();
  params.out = out.data_ptr();
  params.log_decay = log_decay.data_ptr<float>();
  params.seqlen = static_cast<int>(a.size(1));
  params.heads = static_cast<int>(a.size(2));
  params.scale = static_cast<float>(scale);
  params.state_in_scale = static_cast<float>(state_in_scale);
  params.state_out_scale = static_cast<float>(state_out_scale);

  const c10::cuda::CUDAGuard device_guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  HYPENET_HEADDIM_SWITCH(a.size(3), [&] {
    if (reverse) {
      run_lightning_chunk_scan<kHeadDim, true>(params, stream);
    } else {
      run_lightning_chunk_scan<kHeadDim, false>(params, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The output stage of the chunked scan over an equal-length batch (lightning_chunk_scan.h).
// a, b, c, out as check_scan_operands; start_state [B * num_segs or B, H, D, D] fp32 (any strides);
// final_state [B, H, D, D] fp32 is written.
void lightning_chunk_scan(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor& log_decay,
                          const std::optional<at::Tensor>& start_state, const std::optional<at::Tensor>& final_state,
                          const at::Tensor& out, int64_t seg_len, int64_t num_segs, double scale,
                          double state_in_scale, double state_out_scale, bool reverse, bool start_per_segment) {
  constexpr const char* kOp = "hypenet_cuda.lightning_chunk_scan";
  const at::Device device = check_scan_operands(kOp, a, b, c, out, log_decay);
  const int64_t batch = a.size(0), seqlen = a.size(1), heads = a.size(2);
  TORCH_CHECK(seg_len > 0 && seg_len % 64 == 0 && seg_len <= INT_MAX, kOp,
              ": seg_len must be a positive multiple of 64, got ", seg_len);
  const int64_t expected_segs = seqlen > 0 ? (seqlen + seg_len - 1) / seg_len : 1;
  TORCH_CHECK(num_segs == expected_segs, kOp, ": num_segs must be ceil(T / seg_len) = ", expected_segs, ", got ",
              num_segs);
  LightningScanParams params{};
  params.start_state =
      state_view(kOp, start_state, "start_state", device, start_per_segment ? batch * num_segs : batch, a);
  params.final_state = state_view(kOp, final_state, "final_state", device, batch, a);
  params.num_programs = batch * num_segs * heads;
  TORCH_CHECK(params.num_programs <= INT_MAX, kOp, ": sizes too large for one launch");
  params.seg_len = static_cast<int>(seg_len);
  params.num_segs = static_cast<int>(num_segs);
  params.start_per_segment = start_per_segment;
  launch_scan(params, a, b, c, out, log_decay, scale, state_in_scale, state_out_scale, reverse);
}

// The output stage of the chunked scan over a packed batch (lightning_chunk_scan.h, LightningScanParams):
// a, b, c, out [1, T, H, D] as check_scan_operands; chunk_table [chunks, 4] and range_table [ranges + 1]
// int32 contiguous, as triton_ops/lightning/chunk.py builds them (their contents are not checked here);
// range_states [ranges + 1, H, D, D], initial_state and final_state [N, H, D, D] fp32 (any strides).
void lightning_chunk_scan_packed(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                 const at::Tensor& log_decay, const std::optional<at::Tensor>& range_states,
                                 const std::optional<at::Tensor>& initial_state,
                                 const std::optional<at::Tensor>& final_state, const at::Tensor& out,
                                 const at::Tensor& chunk_table, const at::Tensor& range_table, double scale,
                                 double state_in_scale, double state_out_scale, bool reverse) {
  constexpr const char* kOp = "hypenet_cuda.lightning_chunk_scan_packed";
  const at::Device device = check_scan_operands(kOp, a, b, c, out, log_decay);
  TORCH_CHECK(a.size(0) == 1, kOp, ": a packed batch is one row (B == 1), got B = ", a.size(0));
  for (const auto& [t, name] : {NamedTensor{&chunk_table, "chunk_table"}, NamedTensor{&range_table, "range_table"}}) {
    check_cuda_on(*t, name, device, "a");
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), kOp, ": ", name,
                " must be contiguous int32, got ", t->scalar_type(), t->is_contiguous() ? "" : " (not contiguous)");
  }
  TORCH_CHECK(chunk_table.dim() == 2 && chunk_table.size(1) == 4, kOp, ": chunk_table must be [chunks, 4], got ",
              chunk_table.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(chunk_table.data_ptr()) % 16 == 0, kOp,
              ": chunk_table's data pointer must be 16-byte aligned (the kernel copies one 16-byte entry at a time)");
  TORCH_CHECK(range_table.dim() == 1 && range_table.size(0) >= 2, kOp,
              ": range_table must be [ranges + 1] with ranges >= 1, got ", range_table.sizes());
  const int64_t ranges = range_table.size(0) - 1;
  const int64_t sequences = initial_state.has_value() ? initial_state->size(0)
                            : final_state.has_value() ? final_state->size(0)
                                                      : 0;
  LightningScanParams params{};
  params.start_state = state_view(kOp, range_states, "range_states", device, ranges + 1, a);
  params.initial_state = state_view(kOp, initial_state, "initial_state", device, sequences, a);
  params.final_state = state_view(kOp, final_state, "final_state", device, sequences, a);
  params.chunk_table = chunk_table.data_ptr<int>();
  params.range_table = range_table.data_ptr<int>();
  params.num_programs = ranges * a.size(2);
  TORCH_CHECK(params.num_programs <= INT_MAX, kOp, ": sizes too large for one launch");
  launch_scan(params, a, b, c, out, log_decay, scale, state_in_scale, state_out_scale, reverse);
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
  m.def(
      "lightning_chunk_scan_packed(Tensor a, Tensor b, Tensor c, Tensor log_decay, Tensor? range_states, "
      "Tensor? initial_state, Tensor(a!)? final_state, Tensor(b!) out, Tensor chunk_table, Tensor range_table, "
      "float scale, float state_in_scale, float state_out_scale, bool reverse) -> ()");
}

TORCH_LIBRARY_IMPL(hypenet_cuda, CUDA, m) {
  m.impl("lightning_attn_step", &hypenet::lightning_attn_step);
  m.impl("lightning_chunk_scan", &hypenet::lightning_chunk_scan);
  m.impl("lightning_chunk_scan_packed", &hypenet::lightning_chunk_scan_packed);
}

// `import hypenet._C` loads this library, which runs the registrations above; the module itself
// holds nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
