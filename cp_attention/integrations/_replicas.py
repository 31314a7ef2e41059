"""Replicas of one transformer on a CFG axis and a data axis: the forward that `parallelize_pipeline` puts in
place of a diffusers transformer's, so that a pipeline's own code runs unchanged on every rank.

CFG axis (degree 2). diffusers pipelines make two transformer calls per denoising step, the conditional one
inside `transformer.cache_context("cond")` and the unconditional one inside `cache_context("uncond")`, and
combine the two predictions after the second call. Replica 0 computes the "cond" call and replica 1 the
"uncond" call; each returns, for the call it skips, a placeholder of the right shape (NaN-filled), and at the
"uncond" call the replicas exchange their predictions, writing each into the other's placeholder in place,
before the pipeline reads either. So both passes run at once, each on half of the ranks, and one exchange
per step moves one prediction each way. The placeholder's shape is learned from the first call of each input
signature, which both replicas compute (the first step of a new resolution runs both passes on both halves).

Data axis (degree d). Every tensor argument whose first dimension is the batch (hidden_states' first
dimension), and every list argument with one entry per batch element, is split with tensor_split into d
shares (names ending in "_ids" are positions, never split); replica r computes share r and the outputs are
gathered back in order, so every rank returns the whole batch.

Both axes are inference-only: the placeholders are filled in place, outside autograd.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math

import torch
import torch.distributed as dist

from cp_attention.distributed._agreement import exchange_device
from cp_attention.distributed.context_parallel import _gather_uneven

_OP = "cp_attention.integrations.diffusers.parallelize_pipeline"
COND, UNCOND = "cond", "uncond"


def map_tensors(obj, fn, leaf=torch.Tensor):
    """obj with fn applied to every `leaf` (a tensor) in it, through tuples, lists, dicts and diffusers
    BaseOutputs (OrderedDict dataclasses); anything else is returned as it is."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(x, fn, leaf) for x in obj)
    if dataclasses.is_dataclass(obj) and isinstance(obj, dict):
        return type(obj)(**{k: map_tensors(v, fn, leaf) for k, v in obj.items()})
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn, leaf)) for k, v in obj.items())
    return obj


def tensors_of(obj) -> list[torch.Tensor]:
    found = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return found


def _signature_key(value):
    """What decides the output's shape, dtype and structure: every tensor's shape, dtype and device
    (through lists, tuples and dicts), and every other argument's value (shortened)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature_key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature_key(v) for v in value))
    return repr(value)[:256]


def _placeholder(skeleton):
    """A fresh output of the skeleton's structure, shapes and dtypes, NaN-filled (a value nobody may read)."""
    def make(meta):
        t = torch.empty(meta.shape, dtype=meta.dtype, device=meta.device_of)
        return t.fill_(math.nan) if t.is_floating_point() else t.zero_()
    return map_tensors(skeleton, make, leaf=_Meta)


class _Meta:
    """Shape, dtype and device of one output tensor, without its data."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device_of = t.shape, t.dtype, t.device


def _skeleton(result):
    return map_tensors(result, _Meta)


def _broadcast_into(t: torch.Tensor, src: int, group) -> None:
    """t from global rank src over group, written into t in place (through a buffer if t is not
    contiguous)."""
    if t.is_contiguous():
        dist.broadcast(t, src=src, group=group)
        return
    buf = t.contiguous()
    dist.broadcast(buf, src=src, group=group)
    if dist.get_rank() != src:
        t.copy_(buf)


@dataclasses.dataclass
class Axes:
    """A replica's place on the CFG and data axes (the degrees, this rank's index and the groups)."""
    cfg_degree: int
    cfg_rank: int
    cfg_group: object
    data_degree: int
    data_rank: int
    data_group: object


class ReplicaForward:
    """The forward put in place of `module.forward` (see the module docstring). `module.cache_context` is
    shadowed too, to learn which call ("cond" or "uncond") is running."""

    def __init__(self, module: torch.nn.Module, axes: Axes):
        self.module, self.axes = module, axes
        self.inner = module.forward  # diffusers' hooks (context parallelism) put theirs on the instance
        self._own_forward = "forward" in module.__dict__
        self.signature = inspect.signature(type(module).forward)
        self.context: str | None = None
        self.pending = None  # the "cond" result awaiting its "uncond" partner
        self.skeletons: list[dict] = [{}, {}]  # per role: input signature -> output skeleton
        self._class_cache_context = getattr(type(module), "cache_context", None)

    # -- installed on the module ----------------------------------------------------------------------------

    def install(self) -> None:
        self.module.forward = self
        if self.axes.cfg_degree > 1:
            if self._class_cache_context is None:
                raise ValueError(f"{_OP}: cfg_degree=2 needs a diffusers model with cache_context (which its "
                                 f"pipelines use to mark the conditional and unconditional calls); "
                                 f"{type(self.module).__name__} has none")
            self.module.cache_context = self.cache_context

    def uninstall(self) -> None:
        self.module.__dict__.pop("cache_context", None)
        if self._own_forward:
            self.module.forward = self.inner
        else:
            self.module.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        with self._class_cache_context(self.module, name, **kwargs):
            previous, self.context = self.context, name
            try:
                yield
            finally:
                self.context = previous

    def check_done(self) -> None:
        """Raises when a "cond" call is still waiting for its "uncond" partner (called where a pipeline
        ends); every rank sees the same calls, so every rank raises."""
        if self.pending is not None:
            self.pending = None
            raise RuntimeError(self._unpaired("the pipeline call ended"))

    def _unpaired(self, what: str) -> str:
        return (f"{_OP}: with cfg_degree=2 every conditional transformer call (cache_context('cond')) must "
                f"be followed by its unconditional one (cache_context('uncond')), but {what} first. Run the "
                f"pipeline with classifier-free guidance on (e.g. true_cfg_scale > 1 and a negative prompt, "
                f"or guidance_scale > 1, as the pipeline defines it), or use cfg_degree=1. The outputs of "
                f"this call are not valid.")

    # -- the call -------------------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(self.module, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self.signature.parameters)))  # self
        if self.axes.cfg_degree == 1:
            return self._compute(arguments)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            raise RuntimeError(f"{_OP}: CFG parallelism is inference-only (predictions are exchanged "
                               f"outside autograd); run the pipeline under torch.no_grad(), as diffusers "
                               f"pipelines do")
        role = {COND: 0, UNCOND: 1}.get(self.context)
        if role is None:
            raise ValueError(f"{_OP}: with cfg_degree=2 every transformer call must run inside the "
                             f"pipeline's cache_context('cond') or cache_context('uncond'), got context "
                             f"{self.context!r}. "
                             f"Pipelines that batch both passes into one call get the same split with "
                             f"data_degree=2 and cfg_degree=1.")
        if role == 0 and self.pending is not None:
            self.pending = None
            raise RuntimeError(self._unpaired("another conditional call came"))
        if role == 1 and self.pending is None:
            raise RuntimeError(f"{_OP}: an unconditional transformer call (cache_context('uncond')) came "
                               f"without a conditional one before it; with cfg_degree=2 the pipeline must "
                               f"call cond then uncond in each step")
        key = _signature_key(arguments)
        skeleton = self.skeletons[role].get(key)
        if self.axes.cfg_rank == role or skeleton is None:
            result = self._compute(arguments)
            self.skeletons[role].setdefault(key, _skeleton(result))
        else:
            result = _placeholder(skeleton)
        if role == 0:
            self.pending = result
            return result
        cond, self.pending = self.pending, None
        self._exchange(cond, result)
        return result

    def _exchange(self, cond, uncond) -> None:
        """cond's tensors from replica 0 and uncond's from replica 1, into the other replica's in place."""
        group = self.axes.cfg_group
        src = [dist.get_global_rank(group, r) for r in range(2)]
        for role, result in enumerate((cond, uncond)):
            for t in tensors_of(result):
                _broadcast_into(t, src[role], group)

    def _compute(self, arguments: dict):
        """The wrapped forward on this replica's share of the batch, gathered back to the whole batch."""
        ax = self.axes
        if ax.data_degree == 1:
            return self.inner(**_flatten_var_keywords(self.signature, arguments))
        batch = _batch_size(arguments)
        if batch < ax.data_degree:
            raise ValueError(f"{_OP}: data_degree={ax.data_degree} needs a batch of at least "
                             f"{ax.data_degree} per transformer call (one element per replica), got {batch}")
        share = {name: _split(name, value, batch, ax.data_degree, ax.data_rank)
                 for name, value in arguments.items()}
        result = self.inner(**_flatten_var_keywords(self.signature, share))
        n, r = divmod(batch, ax.data_degree)
        local = n + (ax.data_rank < r)  # tensor_split's size of share data_rank
        # Which outputs carry the batch: agreed over the data group, so that every rank joins the same
        # gathers (an output without a batch dimension may match one rank's share by chance).
        outputs = tensors_of(result)
        flags = torch.tensor([int(t.dim() >= 1 and t.shape[0] == local) for t in outputs] + [len(outputs)],
                             dtype=torch.int64, device=exchange_device(ax.data_group))
        both = torch.cat([flags, -flags])  # one MIN gives the minimum and (negated) the maximum
        dist.all_reduce(both, op=dist.ReduceOp.MIN, group=ax.data_group)
        low, high = both[:len(flags)], -both[len(flags):]
        if low[-1] != high[-1]:
            raise RuntimeError(f"{_OP}: the data replicas' transformer outputs hold different numbers of "
                               f"tensors ({int(low[-1])} to {int(high[-1])})")
        if not bool(low[:-1].all()):
            raise ValueError(f"{_OP}: with data_degree > 1 every tensor the transformer returns must carry "
                             f"the batch in its first dimension (so that the replicas' shares can be "
                             f"gathered); output tensors of shapes {[tuple(t.shape) for t in outputs]} on a "
                             f"share of {local}")
        gathered = iter([_gather_uneven(t, 0, ax.data_group)[0] for t in outputs])
        return map_tensors(result, lambda t: next(gathered))


def _flatten_var_keywords(signature: inspect.Signature, arguments: dict) -> dict:
    """Bound arguments back into keywords: a **kwargs parameter's dict is spread out."""
    out = {}
    for name, value in arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _batch_size(arguments: dict) -> int:
    first = next((v for v in arguments.values() if isinstance(v, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        raise ValueError(f"{_OP}: data parallelism splits the batch of the transformer's first tensor "
                         f"argument (hidden_states), and this call has none with a batch dimension")
    return first.shape[0]


def _split(name: str, value, batch: int, degree: int, index: int):
    """Share `index` of one argument: a tensor whose first dimension is the batch is split; lists and tuples
    holding tensors are split element by element (ControlNet's per-layer residuals); other lists with one
    entry per batch element are sliced; everything else (and names ending in "_ids") is whole."""
    if name.endswith("_ids"):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            return torch.tensor_split(value, degree)[index]
        return value
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_split(name, v, batch, degree, index) for v in value)
    if isinstance(value, (list, tuple)) and len(value) == batch:
        n, r = divmod(batch, degree)
        start = index * n + min(index, r)
        return type(value)(value[start:start + n + (index < r)])
    return value
