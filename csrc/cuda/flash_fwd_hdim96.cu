// Tensor-core flash-attention forward for head dims up to 96 (see flash_fwd_launch.h).
#include "cuda/flash_fwd_launch_impl.cuh"

CP_ATTENTION_INSTANTIATE_FWD_TC(96)
