// One instantiation per file keeps builds parallel.
#include "lightning_chunk_scan_kernel.cuh"

template void hypenet::run_lightning_chunk_scan<128, false>(const hypenet::LightningScanParams&, cudaStream_t);
