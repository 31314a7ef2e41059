"""cp_attention: exact, LSE-returning attention kernels for context-parallel diffusion transformers, for
inference and training. Ops live under ``torch.ops.cp_attention``; see ``cp_attention.ops`` for the list."""

from . import ops
from ._C import build_info
from .attention import (
    auto_backend,
    available_backends,
    cpu_auto_choices,
    flash_attn,
    flash_attn_acc_,
    flash_attn_bwd,
    merge_attn_states,
    merge_attn_states_,
)
from .distributed import ContextParallel, ring_attention, ulysses_attention, unified_attention
from .planner import plan
from .sdpa_drop_in import sdpa, use_as_sdpa

__all__ = ["ContextParallel", "auto_backend", "available_backends", "build_info", "cpu_auto_choices",
           "flash_attn", "flash_attn_acc_", "flash_attn_bwd", "merge_attn_states", "merge_attn_states_",
           "ops", "plan", "ring_attention", "sdpa", "ulysses_attention", "unified_attention", "use_as_sdpa"]
__version__ = "0.1.0"
