"""ContextParallel: one object that holds a (data x) ring x ulysses DeviceMesh and routes attention to ring,
Ulysses or Unified attention, with the helpers that split a global sequence into this rank's chunk and put
the chunks back together, in one order (chunk g = torch.tensor_split(x, P, dim)[g] on mesh
rank g = ring_rank * ulysses_degree + ulysses_rank; docs/design.md, "Sequence sharding"). A data axis
outside them holds independent replicas: each runs its own share of a batch (split_batch / gather_batch),
context-parallel inside."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._agreement import check_mode, exchange_device
from .ring import ring_attention
from .ulysses import ulysses_attention
from .unified import unified_attention

_OP = "cp_attention.ContextParallel"
MESH_DIMS = ("ring", "ulysses")
MESH_DIMS_3D = ("data", "ring", "ulysses")


def _degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_OP}: {name} must be an int >= 1, got {value!r}")
    return value


def _default_device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


class ContextParallel:
    """Context parallelism over a mesh of shape (ring_degree, ulysses_degree), dims ("ring", "ulysses"),
    or (data_degree, ring_degree, ulysses_degree), dims ("data", "ring", "ulysses"): replicas on a data axis.

    Args:
        ring_degree, ulysses_degree: the context-parallel shape: the ranks that share one sequence.
            Defaults: 1 each, or the given mesh's shape.
        data_degree: how many independent replicas (data or CFG parallelism: each runs its share of a batch,
            split_batch / gather_batch); default 1, or the given mesh's. data_degree * ring_degree *
            ulysses_degree must equal the world size when the mesh is built here. The replicas' ranks are
            consecutive: replica d holds global ranks [d * R * U, (d + 1) * R * U).
        mesh: an existing torch.distributed DeviceMesh with dim names ("ring", "ulysses") or ("data", "ring",
            "ulysses"); when None one is built over the whole world with init_device_mesh (a collective:
            every rank must construct ContextParallel together, after init_process_group).
        device_type: the mesh's device type when it is built here; default "cuda" under NCCL, else "cpu".
        backend: the default flash_attn backend of `attention` ("auto": the fastest measured one).
        check: the default agreement check of `attention`: "once" per signature or "always".

    `attention(q, k, v, **kw)` runs ring attention on an (R x 1) mesh, Ulysses on (1 x U), Unified
    otherwise (1 x 1 is the ring over one rank: plain attention). q, k, v are this rank's chunks; see
    `cp_attention.ring_attention` for shapes and keywords (scale, causal, kv_mask, return_lse, backend,
    seq_lens, check).
    """

    def __init__(self, ring_degree: int | None = None, ulysses_degree: int | None = None, mesh=None, *,
                 data_degree: int | None = None, device_type: str | None = None, backend: str = "auto",
                 check: str = "once"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{_OP}: torch.distributed is not initialised; call "
                               f"torch.distributed.init_process_group first")
        if mesh is None:
            Dd = _degree("data_degree", 1 if data_degree is None else data_degree)
            R = _degree("ring_degree", 1 if ring_degree is None else ring_degree)
            U = _degree("ulysses_degree", 1 if ulysses_degree is None else ulysses_degree)
            world = dist.get_world_size()
            if Dd * R * U != world:
                raise ValueError(f"{_OP}: data_degree * ring_degree * ulysses_degree must equal the world "
                                 f"size {world}, got data_degree={Dd}, ring_degree={R}, ulysses_degree={U}")
            from torch.distributed.device_mesh import init_device_mesh

            shape, dims = ((R, U), MESH_DIMS) if Dd == 1 else ((Dd, R, U), MESH_DIMS_3D)
            mesh = init_device_mesh(device_type or _default_device_type(), shape, mesh_dim_names=dims)
        else:
            names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
            if names not in (MESH_DIMS, MESH_DIMS_3D) or getattr(mesh, "ndim", None) != len(names):
                raise ValueError(f"{_OP}: mesh must be a DeviceMesh with mesh_dim_names {MESH_DIMS} or "
                                 f"{MESH_DIMS_3D}, got ndim={getattr(mesh, 'ndim', None)}, "
                                 f"mesh_dim_names={names or None}")
            Dd = mesh.size(0) if names == MESH_DIMS_3D else 1
            R, U = mesh.size(names.index("ring")), mesh.size(names.index("ulysses"))
            for name, given, have in (("data_degree", data_degree, Dd), ("ring_degree", ring_degree, R),
                                      ("ulysses_degree", ulysses_degree, U)):
                if given is not None and _degree(name, given) != have:
                    raise ValueError(f"{_OP}: {name}={given} does not match the mesh's shape "
                                     f"{tuple(mesh.shape)} {names}")
        if not isinstance(backend, str):
            raise ValueError(f"{_OP}: backend must be a backend name (str), got {type(backend).__name__}")
        self.backend, self.check = backend, check_mode(_OP, check)
        self.mesh = mesh
        self.ring_degree, self.ulysses_degree = R, U
        self.ring_group = mesh.get_group("ring")
        self.ulysses_group = mesh.get_group("ulysses")
        self.ring_rank = mesh.get_local_rank("ring")
        self.ulysses_rank = mesh.get_local_rank("ulysses")
        self.data_degree = Dd
        # One replica: no data group to talk over.
        self.data_group = mesh.get_group("data") if Dd > 1 else None
        self.data_rank = mesh.get_local_rank("data") if Dd > 1 else 0
        self.plan = None  # the planner's Plan, when built by ContextParallel.auto

    @classmethod
    def auto(cls, seq_len: int, heads: int, head_dim: int, *, kv_heads: int | None = None, batch: int = 1,
             causal: bool = False, dtype=torch.bfloat16, hardware=None, train: bool = False,
             cfg: bool = False, device_type: str | None = None, backend: str = "auto",
             check: str = "once") -> ContextParallel:
        """The layout cp_attention.plan predicts fastest for the whole world (every rank calls it, after
        init_process_group, with the same arguments): data x ring x ulysses and the placement, built as a
        mesh. The shape arguments are plan()'s; hardware: a profile name, a HardwareProfile or a .json file
        (default: the built-in profile of the CUDA device's name; required on CPUs, where
        `python -m cp_attention.profile` measures one). The chosen Plan is the result's `.plan`."""
        from cp_attention.planner import default_hardware, placement_mesh, plan

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{_OP}.auto: torch.distributed is not initialised; call "
                               f"torch.distributed.init_process_group first")
        best = plan(dist.get_world_size(), seq_len=seq_len, heads=heads, head_dim=head_dim, kv_heads=kv_heads,
                    batch=batch, causal=causal, dtype=dtype, train=train, cfg=cfg,
                    hardware=default_hardware() if hardware is None else hardware)[0]
        cp = cls(mesh=placement_mesh(best, device_type or _default_device_type()), backend=backend,
                 check=check)
        cp.plan = best
        return cp

    @property
    def world_size(self) -> int:
        """The ranks that share one sequence (ring_degree * ulysses_degree); the data axis is outside it."""
        return self.ring_degree * self.ulysses_degree

    @property
    def rank(self) -> int:
        """This rank's place in the mesh, hence which sequence chunk it holds."""
        return self.ring_rank * self.ulysses_degree + self.ulysses_rank

    @property
    def mode(self) -> str:
        if self.ulysses_degree == 1:
            return "ring"
        return "ulysses" if self.ring_degree == 1 else "unified"

    def __repr__(self) -> str:
        data = f"data_degree={self.data_degree}, " if self.data_degree > 1 else ""
        return (f"ContextParallel({data}ring_degree={self.ring_degree}, "
                f"ulysses_degree={self.ulysses_degree}, mode={self.mode!r}, rank={self.rank})")

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs):
        """Exact attention over the global sequence whose chunk this rank holds; a collective over the mesh.
        q [B, S_r, H, D], k/v [B, S_r, Hkv, D], keywords scale, causal, kv_mask ([B, S_r] or
        [B, 1, 1, S_r], True = attend), return_lse, backend and check (default: the object's), and
        seq_lens: the global length (an int; `shard` splits it that way) or every mesh rank's length, in
        mesh-rank order; stated, a call agreed before moves only its data. Returns out [B, S_r, H, D] (and
        lse [B, H, S_r] float32, natural log, over every key of the global sequence)."""
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("check", self.check)
        if self.mode == "ring":
            return ring_attention(q, k, v, group=self.ring_group, **kwargs)
        if self.mode == "ulysses":
            return ulysses_attention(q, k, v, group=self.ulysses_group, **kwargs)
        return unified_attention(q, k, v, ring_group=self.ring_group, ulysses_group=self.ulysses_group,
                                 **kwargs)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's chunk of a global tensor: torch.tensor_split(x, world_size, dim)[rank] (a view; the
        chunks differ in length by at most one). Every rank passes the same global x."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{_OP}.shard: x must be a torch.Tensor, got {type(x).__name__}")
        return torch.tensor_split(x, self.world_size, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of shard: concatenates every rank's chunk along dim in mesh-rank order (chunks may differ
        in length along dim; every other dim must match). A collective over the mesh; returns the global
        tensor on every rank. Differentiable: the backward hands this rank the slice of the gradient that
        lies over its own chunk (every rank computes the same function of the gathered tensor, so each
        chunk's gradient is read where the chunk lives; nothing is summed across ranks)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{_OP}.gather: x must be a torch.Tensor, got {type(x).__name__}")
        dim = dim % x.dim() if x.dim() else 0
        # Within the row first (its chunks are consecutive), then the rows in ring order.
        return _Gather.apply(x, dim, self.ulysses_group, self.ring_group)

    def split_batch(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This replica's share of a global batch: torch.tensor_split(x, data_degree, dim)[data_rank] (a view;
        shares differ in size by at most one, and may be empty). Every rank passes the same global x; the
        ranks of one replica get the same share, which they then split along the sequence with shard."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{_OP}.split_batch: x must be a torch.Tensor, got {type(x).__name__}")
        return torch.tensor_split(x, self.data_degree, dim=dim)[self.data_rank]

    def gather_batch(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Inverse of split_batch: the replicas' shares concatenated along dim in data-rank order (sizes may
        differ along dim; every other dim must match). A collective over the data axis; differentiable like
        gather (the backward hands this replica the slice over its own share)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{_OP}.gather_batch: x must be a torch.Tensor, got {type(x).__name__}")
        if self.data_group is None:
            return x
        dim = dim % x.dim() if x.dim() else 0
        return _Gather.apply(x, dim, self.data_group)


class _Gather(torch.autograd.Function):
    """all-gathers x along dim over each group in turn (innermost first): the result of one group is what
    the next one gathers. Backward: the slice of the gradient over this rank's own x."""

    @staticmethod
    def forward(ctx, x, dim, *groups):
        full, start = x, 0
        for group in groups:
            full, offset = _gather_uneven(full, dim, group)
            start += offset  # where this rank's block starts, in the coordinates of the new result
        ctx.dim, ctx.start, ctx.length, ctx.n_groups = dim, start, x.shape[dim], len(groups)
        return full

    @staticmethod
    def backward(ctx, grad):
        return (grad.narrow(ctx.dim, ctx.start, ctx.length), None) + (None,) * ctx.n_groups


def _gather_uneven(x: torch.Tensor, dim: int, group) -> tuple[torch.Tensor, int]:
    """all_gather of tensors whose sizes along dim may differ across the group's ranks, concatenated in
    group-rank order; and where this rank's chunk starts along dim. Lengths are exchanged first; chunks
    are padded to the longest for the collective."""
    n = dist.get_world_size(group)
    if n == 1:
        return x, 0
    sizes = torch.tensor(list(x.shape), dtype=torch.int64, device=exchange_device(group))
    all_sizes = [torch.empty_like(sizes) for _ in range(n)]
    dist.all_gather(all_sizes, sizes, group=group)
    shapes = [s.tolist() for s in all_sizes]
    other = [s[:dim] + s[dim + 1:] for s in shapes]
    if any(o != other[0] for o in other):
        raise ValueError(f"{_OP}.gather: every rank's chunk must match outside dim {dim}, "
                         f"got shapes {shapes}")
    lengths = [s[dim] for s in shapes]
    longest = max(lengths)
    padded = x
    if x.shape[dim] < longest:
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(padded.contiguous()) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    full = torch.cat([p.narrow(dim, 0, n_r) for p, n_r in zip(parts, lengths)], dim=dim)
    return full, sum(lengths[:dist.get_rank(group)])


__all__ = ["ContextParallel"]
