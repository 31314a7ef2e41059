"""Context-parallel attention over sequence-sharded tensors (docs/design.md, "Sequence sharding"). Process
groups are passed explicitly; importing this module changes no global state."""

from ._step import attend_chunk, new_accumulator, plan_chunk
from .context_parallel import ContextParallel
from .ring import ring_attention
from .ulysses import ulysses_attention
from .unified import unified_attention

__all__ = ["ContextParallel", "attend_chunk", "new_accumulator", "plan_chunk", "ring_attention",
           "ulysses_attention",
           "unified_attention"]
