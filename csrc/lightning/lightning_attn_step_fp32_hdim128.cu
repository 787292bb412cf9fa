// One instantiation per file keeps builds parallel and lets a build drop head dims or dtypes.
#include "lightning_attn_step_kernel.cuh"

template void hypenet::run_lightning_attn_step<float, 128>(const hypenet::LightningStepParams&, cudaStream_t);
