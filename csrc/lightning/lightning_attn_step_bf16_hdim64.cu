// One instantiation per file keeps builds parallel and lets a build drop head dims or dtypes.
#include "lightning_attn_step_kernel.cuh"

template void hypenet::run_lightning_attn_step<__nv_bfloat16, 64>(const hypenet::LightningStepParams&, cudaStream_t);
