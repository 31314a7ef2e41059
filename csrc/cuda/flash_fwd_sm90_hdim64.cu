// Hopper (wgmma) flash-attention forward at head dim 64 (see flash_fwd_launch.h).
#include "cuda/flash_fwd_launch_impl.cuh"

CP_ATTENTION_INSTANTIATE_FWD_SM90(64)
