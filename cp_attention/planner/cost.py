"""The planner's cost model: one attention call (forward, or forward and backward) per layout, on a
hardware profile (planner.hardware), and `plan`, which ranks every layout of a world size.

A layout is data_degree x ring_degree x ulysses_degree = world size, on the mesh ("data", "ring",
"ulysses") that cp_attention.ContextParallel and diffusers build: ranks are numbered with the Ulysses index
innermost ("ulysses-inner": a Ulysses group is U consecutive ranks, a ring strides over them), or, as an
alternative placement a custom mesh can give, with the ring innermost ("ring-inner"). A group uses the
innermost link level whose span holds all its ranks (HardwareProfile.link_for); the plan reports which.

Per rank, for global sequence S, H query and Hkv key/value heads of dim D, batch B (2B with CFG), element
size e, on a replica of R x U ranks handling b = ceil(B / data_degree) of the batch:
- heads: the busiest rank holds hq = ceil(H / U) query heads and hkv = ceil(max(Hkv, U) / U) kv heads
  (a kv head read by several ranks' query heads is copied to each, as ulysses_attention does);
- Ulysses: one all-to-all of q, k, v before and one of the output after; each rank holds b S / (R U)
  positions of every head and sends the (U - 1) / U of them that other ranks' heads need: q, k, v bytes
  b S/(RU) D e (hq + 2 hkv) U (U - 1)/U, output bytes b S/(RU) D e hq U (U - 1)/U; each all-to-all costs
  the link's latency plus bytes / bandwidth; with the profile's copy_gbs, the packing before and the
  unpacking after each (every byte of the rank's q, k, v and output read and written on both sides);
- kernel: ring step of Sq = Sk = S / R positions, flops 4 b hq Sq Sk D, at the profile's rate for (dtype,
  D) times the tile-fill factors Sq/(Sq + h) Sk/(Sk + h) (h = kernel_half_len), plus kernel_overhead_us;
- ring: R steps (causal: R - 0.5 steps on the busiest rank, the last one, under contiguous sharding;
  chunks wholly in the future are skipped) and R - 1 hops of K and V (b S/R hkv D e 2 bytes), each hiding
  behind its step up to `overlap` of the step's time;
- every synchronisation point (an all-to-all, a ring hop) adds the profile's sync_us;
- training adds the backward: 2.5x the forward's kernel work, the Ulysses all-to-alls again (gradients),
  and ring hops that carry K, V and the float32 dK, dV accumulators;
- memory: the working buffers a call adds per rank: Ulysses' head-sharded q, k, v and output (send and
  receive), the ring's two foreign K/V chunks in flight and its float32 output accumulator.
Not modelled: the rest of the transformer (linear layers; the CLI adds an estimate per model), stragglers,
contention between concurrent groups on one link.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .hardware import HardwareProfile
from .profiles import get_profile

_OP = "cp_attention.plan"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Backward kernel work relative to the forward (the FlashAttention-2 paper's ratio of 2.5: five matmuls
# against two, with the recomputation of P).
BWD_FLOPS = 2.5
PLACEMENTS = ("ulysses-inner", "ring-inner")


@dataclasses.dataclass(frozen=True)
class Plan:
    """One layout and its predicted cost for one attention call (forward, or forward and backward with
    train=True), per rank; times in milliseconds, memory in bytes.

    ulysses_degree, ring_degree, data_degree: the layout (their product is the world size).
    placement: "ulysses-inner" (Ulysses groups are consecutive ranks: cp_attention.ContextParallel's and
        diffusers' mesh) or "ring-inner" (ring groups are consecutive ranks: a custom mesh).
    time_ms = compute_ms + comm_ms: compute_ms the busiest rank's kernel time, comm_ms the all-to-all time
        plus what of the ring hops does not hide behind compute.
    memory_bytes: working memory the call adds per rank (see the module docstring).
    ulysses_link, ring_link: the link level each group uses (None where the degree is 1).
    groups: the ranks of this rank 0's Ulysses group and ring group, as placed.
    """
    ulysses_degree: int
    ring_degree: int
    data_degree: int
    placement: str
    time_ms: float
    compute_ms: float
    comm_ms: float
    memory_bytes: int
    ulysses_link: str | None
    ring_link: str | None
    groups: dict
    details: dict

    @property
    def layout(self) -> str:
        return f"{self.data_degree}x{self.ring_degree}x{self.ulysses_degree}"


@dataclasses.dataclass(frozen=True)
class Workload:
    seq_len: int
    heads: int
    head_dim: int
    kv_heads: int
    batch: int
    causal: bool
    dtype: str
    train: bool


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"{_OP}: dtype must be one of torch.float32, torch.bfloat16, torch.float16, "
                         f"got {dtype!r}")
    return name


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_OP}: {name} must be an int >= 1, got {value!r}")
    return value


def _kernel_ms(p: HardwareProfile, w: Workload, b: int, hq: int, sq: float, sk: float) -> float:
    """One kernel call of b x hq heads, sq queries and sk keys."""
    if sq <= 0 or sk <= 0:
        return 0.0
    h = p.kernel_half_len
    rate = p.attention_rate(w.dtype, w.head_dim) * 1e12 * (sq / (sq + h)) * (sk / (sk + h))
    return p.kernel_overhead_us * 1e-3 + 4.0 * b * hq * sq * sk * w.head_dim / rate * 1e3


def _link_ms(link, nbytes: float, messages: int = 1) -> float:
    if nbytes <= 0:
        return 0.0
    return messages * link.latency_us * 1e-3 + nbytes / (link.bandwidth_gbs * 1e9) * 1e3


def _group_ranks(placement: str, R: int, U: int) -> tuple[list[int], list[int], int, int]:
    """(rank 0's Ulysses group, its ring group, the Ulysses group's device extent, the ring's)."""
    if placement == "ulysses-inner":
        return list(range(U)), list(range(0, R * U, U)), U, (R - 1) * U + 1
    return list(range(0, R * U, R)), list(range(R)), (U - 1) * R + 1, R


def estimate(w: Workload, p: HardwareProfile, data: int, R: int, U: int, placement: str) -> Plan:
    """The cost of one attention call of workload w on profile p in layout data x R x U (see the module
    docstring for the model)."""
    e = DTYPE_BYTES[w.dtype]
    b = math.ceil(w.batch / data)
    hq = math.ceil(w.heads / U)
    hkv = math.ceil(max(w.kv_heads, U) / U) if U > 1 else w.kv_heads
    S = w.seq_len
    local = S / (R * U)  # positions each rank holds outside attention
    sq = S / R  # positions of a ring step, after the Ulysses exchange

    # Ulysses: q, k, v leave in one all-to-all, the output in another; (U - 1) / U of each rank's data moves.
    u_ranks, r_ranks, u_extent, r_extent = _group_ranks(placement, R, U)
    u_link = p.link_for(u_extent) if U > 1 else None
    r_link = p.link_for(r_extent) if R > 1 else None
    a2a_ms, pack_ms, syncs = 0.0, 0.0, 0
    if U > 1:
        moving = (U - 1) / U
        qkv = b * local * w.head_dim * e * (hq + 2 * hkv) * U * moving
        out = b * local * w.head_dim * e * hq * U * moving
        a2a_ms = _link_ms(u_link, qkv) + _link_ms(u_link, out)
        syncs += 2
        if p.copy_gbs:  # packed before and unpacked after each all-to-all: read and write, both sides
            whole = b * local * w.head_dim * e * (2 * hq + 2 * hkv) * U
            pack_ms = 2 * 2 * whole / (p.copy_gbs * 1e9) * 1e3
        if w.train:  # dout in, dq, dk, dv out: the same bytes again
            a2a_ms += _link_ms(u_link, out) + _link_ms(u_link, qkv)
            pack_ms *= 2
            syncs += 2

    # Ring: R steps of sq x sq; the busiest rank under causal contiguous sharding is the last.
    step_ms = _kernel_ms(p, w, b, hq, sq, sq)
    steps = (R - 0.5) if w.causal else R
    fwd_ms = steps * step_ms
    compute_ms = fwd_ms * (1 + (BWD_FLOPS if w.train else 0.0))
    hop_bytes = b * sq * hkv * w.head_dim * e * 2
    exposed_ms, hop_ms = 0.0, 0.0
    if R > 1:
        hop_ms = _link_ms(r_link, hop_bytes)
        exposed_ms = (R - 1) * max(0.0, hop_ms - p.overlap * step_ms)
        syncs += R - 1
        if w.train:  # K, V again and the float32 dK, dV accumulators, behind the backward steps
            bwd_hop = _link_ms(r_link, hop_bytes + b * sq * hkv * w.head_dim * 4 * 2)
            exposed_ms += (R - 1) * max(0.0, bwd_hop - p.overlap * BWD_FLOPS * step_ms)
            syncs += R - 1
    sync_ms = syncs * p.sync_us * 1e-3
    comm_ms = a2a_ms + pack_ms + exposed_ms + sync_ms

    memory = 0
    if U > 1:
        memory += 2 * b * sq * w.head_dim * e * (2 * hq + 2 * hkv)  # q, k, v and out, sent and received
    if R > 1:
        memory += 2 * hop_bytes + b * sq * hq * w.head_dim * 4  # two foreign K/V chunks, float32 out
    details = dict(a2a_ms=a2a_ms, pack_ms=pack_ms, sync_ms=sync_ms, syncs=syncs, ring_exposed_ms=exposed_ms,
                   ring_hop_ms=hop_ms, step_ms=step_ms,
                   steps=steps, heads_per_rank=hq, kv_heads_per_rank=hkv, batch_per_replica=b)
    return Plan(ulysses_degree=U, ring_degree=R, data_degree=data, placement=placement,
                time_ms=compute_ms + comm_ms, compute_ms=compute_ms, comm_ms=comm_ms,
                memory_bytes=int(memory),
                ulysses_link=u_link.name if u_link else None, ring_link=r_link.name if r_link else None,
                groups=dict(ulysses=u_ranks, ring=r_ranks), details=details)


def layouts(world_size: int, heads: int, batch: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(data, ring, ulysses) with data * ring * ulysses = world_size, data <= batch, ulysses <= heads (every
    rank holds at least one query head) and ring * ulysses <= seq_len (every rank at least one position)."""
    out = []
    for data in range(1, world_size + 1):
        if world_size % data or data > batch:
            continue
        cp = world_size // data
        for U in range(1, cp + 1):
            if cp % U == 0 and U <= heads and cp <= seq_len:
                out.append((data, cp // U, U))
    return out


def plan(world_size: int, *, seq_len: int, heads: int, head_dim: int, kv_heads: int | None = None,
         batch: int = 1, causal: bool = False, dtype=torch.bfloat16, hardware="h100-sxm",
         train: bool = False, cfg: bool = False) -> list[Plan]:
    """Every layout of `world_size` ranks for one attention call, best (fastest) first.

    seq_len: the global sequence (tokens; image and text together for a joint-attention DiT). heads,
    kv_heads (default heads; must divide heads), head_dim: the attention's shape. batch: sequences per call;
    cfg=True doubles it (a conditional and an unconditional pass), and data_degree can split either. causal,
    dtype (torch.float32, bfloat16 or float16), train (forward and backward): what runs. hardware: a built-in
    profile name (cp_attention.planner.PROFILE_NAMES), a HardwareProfile, or a .json file saved by
    `python -m cp_attention.profile`.

    Returns a list of Plan (layout, placement, predicted time, compute and communication, memory per rank);
    each layout appears once per placement where placement matters (both degrees > 1). Raises ValueError
    naming the argument for bad input, and when no layout exists.
    """
    for name, value in (("world_size", world_size), ("seq_len", seq_len), ("heads", heads),
                        ("head_dim", head_dim), ("batch", batch)):
        _positive_int(name, value)
    kv_heads = heads if kv_heads is None else _positive_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"{_OP}: kv_heads must divide heads, got heads={heads}, kv_heads={kv_heads}")
    profile = get_profile(hardware)
    w = Workload(seq_len, heads, head_dim, kv_heads, batch * (2 if cfg else 1), bool(causal),
                 _dtype_name(dtype), bool(train))
    found = layouts(world_size, heads, w.batch, seq_len)
    if not found:
        raise ValueError(f"{_OP}: no layout of world_size={world_size} fits seq_len={seq_len} (every rank "
                         f"needs at least one position of the sequence or one sequence of the batch)")
    plans = []
    for data, R, U in found:
        for placement in PLACEMENTS if R > 1 and U > 1 else PLACEMENTS[:1]:
            plans.append(estimate(w, profile, data, R, U, placement))
    return sorted(plans, key=lambda p: (p.time_ms, p.memory_bytes, p.ring_degree, p.placement))


def placement_mesh(p: Plan, device_type: str):
    """The torch DeviceMesh of a plan's layout over the world: dims ("ring", "ulysses"), or ("data", "ring",
    "ulysses") with data_degree > 1, as cp_attention.ContextParallel takes it. Global ranks are placed as
    the plan says: "ulysses-inner" puts a Ulysses group on consecutive ranks, "ring-inner" a ring group.
    A collective (every rank builds it)."""
    from torch.distributed.device_mesh import DeviceMesh

    D, R, U = p.data_degree, p.ring_degree, p.ulysses_degree
    ranks = torch.arange(D * R * U)
    ranks = ranks.reshape(D, U, R).transpose(1, 2) if p.placement == "ring-inner" else ranks.reshape(D, R, U)
    if D == 1:
        return DeviceMesh(device_type, ranks[0].contiguous(), mesh_dim_names=("ring", "ulysses"))
    return DeviceMesh(device_type, ranks.contiguous(), mesh_dim_names=("data", "ring", "ulysses"))
