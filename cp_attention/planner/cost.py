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
- Ulysses: an all-to-all of q, k, v before and one of the output after; each rank holds b S / (R U)
  positions of every head and sends the (U - 1) / U of them that other ranks' heads need: q, k, v bytes
  b S/(RU) D e (hq + 2 hkv) U (U - 1)/U, output bytes b S/(RU) D e hq U (U - 1)/U; each all-to-all costs
  the link's latency plus bytes / bandwidth; with the profile's copy_gbs, the packing before and the
  unpacking after each (every byte of the rank's q, k, v and output read and written on both sides);
- kernel: ring step of Sq = Sk = S / R positions, flops 4 b hq Sq Sk D, at the profile's rate for (dtype,
  D) times the tile-fill factors Sq/(Sq + h) Sk/(Sk + h) (h = kernel_half_len), plus kernel_overhead_us;
- ring: R steps (causal: R - 0.5 steps on the busiest rank, the last one, under contiguous sharding;
  chunks wholly in the future are skipped) and R - 1 hops of K and V (b S/R hkv D e 2 bytes), each hiding
  behind its step up to `overlap` of the step's time;
- every synchronisation point (an all-to-all, a ring hop, an all-gather) adds the profile's sync_us;
- the implementation (IMPLEMENTATIONS; cp_attention's own by default) decides how many all-to-alls a
  Ulysses call makes (q, k, v packed into one, or one each), how K/V travel around the ring (P2P hops behind
  the steps, or one all-gather of the ring group's K/V before them, not overlapped), whether each ring step
  after the first pays a separate float32 merge of its output (merge_bytes per output element at copy_gbs),
  and, run uncompiled (compiled=False), how many operations it launches around its collectives (eager_ops,
  each costing the profile's launch_us);
- training adds the backward: 2.5x the forward's kernel work, the Ulysses all-to-alls again (gradients),
  and ring hops that carry K, V and the float32 dK, dV accumulators (an all-gather ring: K, V gathered
  again and the float32 dK, dV partial sums sent back, not overlapped);
- memory: the working buffers a call adds per rank: Ulysses' head-sharded q, k, v and output (send and
  receive), the ring's two foreign K/V chunks in flight (an all-gather ring: all R chunks) and its float32
  output accumulator (a separate merge: two more float32 outputs for its temporaries).
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
# Bytes per output element that one separate float32 merge of a ring step moves: out.to(float32) (read 2,
# write 4), prev - out (read 8, write 4), sigmoid(lse - prev_lse) * that (read 4, write 4; the lse terms are
# D times smaller), prev - product (read 8, write 4); as ring-flash-attention's and diffusers' merges do.
UNFUSED_MERGE_BYTES = 38.0


@dataclasses.dataclass(frozen=True)
class Implementation:
    """How one context-parallel attention implementation runs a call, as its code reads.

    ring: "p2p" (K/V hop from rank to rank, each hop behind the step before it) or "allgather" (each rank
        gathers the ring group's whole K and V first, not overlapped, then loops over the chunks).
    ulysses_a2a: all-to-alls per Ulysses call (2: q, k, v packed into one, then the output; 4: q, k, v and
        the output one each); the same bytes move either way, each costs a latency and a sync point.
    merge_bytes: bytes per output element moved by a separate merge after every ring step but the first
        (0: the kernel accumulates into the float32 output itself).
    eager_ops: operations launched per attention call, beyond a single-device SDPA call, when run
        uncompiled: (Ulysses call, per ring step, per ring call, per unified call in place of the ring
        call's), counted with a dispatch-mode op counter (views left out); None: not counted.
    """
    name: str
    ring: str
    ulysses_a2a: int
    merge_bytes: float
    eager_ops: tuple | None = None

    def launched_ops(self, R: int, U: int) -> int:
        """Operations an uncompiled call launches on a replica of R x U ranks (0 where not counted)."""
        if self.eager_ops is None or R * U == 1:
            return 0
        ulysses, per_step, ring_call, unified_call = self.eager_ops
        if R == 1:
            return ulysses
        return per_step * R + (unified_call if U > 1 else ring_call)


IMPLEMENTATIONS = {impl.name: impl for impl in (
    # cp_attention (ring.py, ulysses.py): P2P hops (batch_isend_irecv) behind fused attend-and-merge steps
    # (flash_attn_acc_); q, k, v leave in one all-to-all; a few custom ops per call, whose host time
    # kernel_overhead_us covers.
    Implementation("cp_attention", ring="p2p", ulysses_a2a=2, merge_bytes=0.0),
    # xDiT's USP (xFuserLongContextAttention over yunchang: use_pack_qkv=False, ring-flash-attention's ring):
    # P2P hops, a separate float32 merge per step (_update_out_and_lse), q, k, v one all-to-all each.
    Implementation("xdit", ring="p2p", ulysses_a2a=4, merge_bytes=UNFUSED_MERGE_BYTES),
    # diffusers' context parallelism (attention_dispatch.py, rotate_method="allgather", convert_to_fp32):
    # TemplatedRingAttention all-gathers the ring group's K/V and merges each chunk in float32;
    # TemplatedUlyssesAttention / SeqAllToAllDim exchange q, k, v and the output one by one. eager_ops
    # counted on diffusers 0.42.1's FLUX transformer over a fake process group, beyond plain SDPA
    # (benchmarks/calibrate_planner.py --count-ops): 22 per Ulysses call, 15 per ring step less 5 per ring
    # call, 15 per ring step plus 12 per unified call (55 at ring 4, 42 at Ulysses 2 x ring 2, 22 at
    # Ulysses 4; at 8 ranks 115, 72, 42 and 22 for ring 8, 4 x 2, 2 x 4 and Ulysses 8).
    Implementation("diffusers", ring="allgather", ulysses_a2a=4, merge_bytes=UNFUSED_MERGE_BYTES,
                   eager_ops=(22, 15, -5, 12)),
)}


@dataclasses.dataclass(frozen=True)
class Plan:
    """One layout and its predicted cost for one attention call (forward, or forward and backward with
    train=True), per rank; times in milliseconds, memory in bytes.

    ulysses_degree, ring_degree, data_degree: the layout (their product is the world size).
    placement: "ulysses-inner" (Ulysses groups are consecutive ranks: cp_attention.ContextParallel's and
        diffusers' mesh) or "ring-inner" (ring groups are consecutive ranks: a custom mesh).
    time_ms = compute_ms + comm_ms: compute_ms the busiest rank's kernel time, comm_ms the rest: the
        all-to-alls and their packing, what of the ring hops does not hide behind compute (or the ring's
        all-gather), separate merges, synchronisation points and, uncompiled, launched operations.
    memory_bytes: working memory the call adds per rank (see the module docstring).
    ulysses_link, ring_link: the link level each group uses (None where the degree is 1).
    groups: the ranks of this rank 0's Ulysses group and ring group, as placed.
    details: the terms (ms unless named otherwise): a2a_ms, pack_ms, sync_ms, syncs, ring_exposed_ms (P2P
        hops not hidden), gather_ms (an all-gather ring's collective), merge_ms (separate merges),
        eager_ms (launched operations, compiled=False), ring_hop_ms, step_ms, steps, heads_per_rank,
        kv_heads_per_rank, batch_per_replica, implementation.
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
    implementation: str = "cp_attention"
    compiled: bool = False


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


def _ulysses_terms(w: Workload, p: HardwareProfile, impl: Implementation, link, b: int, local: float, hq: int,
                   hkv: int, U: int) -> tuple[float, float, int]:
    """(all-to-all ms, packing ms, sync points) of one Ulysses call: (U - 1) / U of each rank's q, k, v and
    output moves, in impl.ulysses_a2a all-to-alls (q, k, v packed into one, or one each)."""
    if U == 1:
        return 0.0, 0.0, 0
    moving = (U - 1) / U
    qkv = b * local * w.head_dim * DTYPE_BYTES[w.dtype] * (hq + 2 * hkv) * U * moving
    out = b * local * w.head_dim * DTYPE_BYTES[w.dtype] * hq * U * moving
    messages = impl.ulysses_a2a
    a2a_ms = _link_ms(link, qkv, messages - 1) + _link_ms(link, out)
    pack_ms = 0.0
    if p.copy_gbs:  # packed before and unpacked after each all-to-all: read and write, both sides
        whole = b * local * w.head_dim * DTYPE_BYTES[w.dtype] * (2 * hq + 2 * hkv) * U
        pack_ms = 2 * 2 * whole / (p.copy_gbs * 1e9) * 1e3
    if w.train:  # dout in, dq, dk, dv out: the same bytes again
        return 2 * a2a_ms, 2 * pack_ms, 2 * messages
    return a2a_ms, pack_ms, messages


def _ring_comm(w: Workload, p: HardwareProfile, impl: Implementation, link, R: int, hop_bytes: float,
               acc_bytes: float, step_ms: float) -> tuple[float, float, float, int]:
    """(one hop ms, P2P hop time not hidden behind the steps, all-gather ms, sync points) of the ring's K/V
    traffic. hop_bytes: one K/V chunk; acc_bytes: its float32 dK, dV accumulators (training)."""
    if R == 1:
        return 0.0, 0.0, 0.0, 0
    hop_ms = _link_ms(link, hop_bytes)
    if impl.ring == "allgather":  # every foreign chunk arrives in one collective before the first step
        gather_ms = _link_ms(link, (R - 1) * hop_bytes)
        if w.train:  # gathered again for the backward; dK, dV partial sums reduce-scattered back
            gather_ms += _link_ms(link, (R - 1) * hop_bytes) + _link_ms(link, (R - 1) * acc_bytes)
            return hop_ms, 0.0, gather_ms, 3
        return hop_ms, 0.0, gather_ms, 1
    exposed_ms = (R - 1) * max(0.0, hop_ms - p.overlap * step_ms)
    if w.train:  # K, V again and the float32 dK, dV accumulators, behind the backward steps
        bwd_hop = _link_ms(link, hop_bytes + acc_bytes)
        exposed_ms += (R - 1) * max(0.0, bwd_hop - p.overlap * BWD_FLOPS * step_ms)
        return hop_ms, exposed_ms, 0.0, 2 * (R - 1)
    return hop_ms, exposed_ms, 0.0, R - 1


def _merge_ms(p: HardwareProfile, impl: Implementation, R: int, out_elements: float) -> float:
    """Separate float32 merges: one after every ring step but the first, impl.merge_bytes per element of
    the rank's output, at copy_gbs (0 where the profile has none)."""
    if R == 1 or not impl.merge_bytes or not p.copy_gbs:
        return 0.0
    return (R - 1) * out_elements * impl.merge_bytes / (p.copy_gbs * 1e9) * 1e3


def _eager_ms(w: Workload, p: HardwareProfile, impl: Implementation, R: int, U: int) -> float:
    """Operations an uncompiled call launches around its collectives, launch_us each (the backward about
    as many again)."""
    if w.compiled:
        return 0.0
    return impl.launched_ops(R, U) * p.launch_us * 1e-3 * (2 if w.train else 1)


def estimate(w: Workload, p: HardwareProfile, data: int, R: int, U: int, placement: str) -> Plan:
    """The cost of one attention call of workload w on profile p in layout data x R x U (see the module
    docstring for the model)."""
    impl = IMPLEMENTATIONS[w.implementation]
    e = DTYPE_BYTES[w.dtype]
    b = math.ceil(w.batch / data)
    hq = math.ceil(w.heads / U)
    hkv = math.ceil(max(w.kv_heads, U) / U) if U > 1 else w.kv_heads
    S = w.seq_len
    local = S / (R * U)  # positions each rank holds outside attention
    sq = S / R  # positions of a ring step, after the Ulysses exchange

    u_ranks, r_ranks, u_extent, r_extent = _group_ranks(placement, R, U)
    u_link = p.link_for(u_extent) if U > 1 else None
    r_link = p.link_for(r_extent) if R > 1 else None
    a2a_ms, pack_ms, syncs = _ulysses_terms(w, p, impl, u_link, b, local, hq, hkv, U)

    # Ring: R steps of sq x sq; the busiest rank under causal contiguous sharding is the last.
    step_ms = _kernel_ms(p, w, b, hq, sq, sq)
    steps = (R - 0.5) if w.causal else R
    compute_ms = steps * step_ms * (1 + (BWD_FLOPS if w.train else 0.0))
    hop_bytes = b * sq * hkv * w.head_dim * e * 2
    acc_bytes = b * sq * hkv * w.head_dim * 4 * 2
    hop_ms, exposed_ms, gather_ms, ring_syncs = _ring_comm(w, p, impl, r_link, R, hop_bytes, acc_bytes,
                                                           step_ms)
    syncs += ring_syncs
    merge_ms = _merge_ms(p, impl, R, b * sq * hq * w.head_dim)
    eager_ms = _eager_ms(w, p, impl, R, U)
    sync_ms = syncs * p.sync_us * 1e-3
    comm_ms = a2a_ms + pack_ms + exposed_ms + gather_ms + merge_ms + eager_ms + sync_ms

    memory = 0
    if U > 1:
        memory += 2 * b * sq * w.head_dim * e * (2 * hq + 2 * hkv)  # q, k, v and out, sent and received
    if R > 1:
        chunks = R if impl.ring == "allgather" else 2  # foreign K/V chunks held at once
        temporaries = 2 if impl.merge_bytes else 0  # float32 outputs a separate merge holds besides the sum
        memory += chunks * hop_bytes + (1 + temporaries) * b * sq * hq * w.head_dim * 4
    details = dict(a2a_ms=a2a_ms, pack_ms=pack_ms, sync_ms=sync_ms, syncs=syncs, ring_exposed_ms=exposed_ms,
                   gather_ms=gather_ms, merge_ms=merge_ms, eager_ms=eager_ms, ring_hop_ms=hop_ms,
                   step_ms=step_ms, steps=steps, heads_per_rank=hq, kv_heads_per_rank=hkv,
                   batch_per_replica=b, implementation=impl.name)
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
         train: bool = False, cfg: bool = False, implementation: str = "cp_attention",
         compiled: bool = False) -> list[Plan]:
    """Every layout of `world_size` ranks for one attention call, best (fastest) first.

    seq_len: the global sequence (tokens; image and text together for a joint-attention DiT). heads,
    kv_heads (default heads; must divide heads), head_dim: the attention's shape. batch: sequences per call;
    cfg=True doubles it (a conditional and an unconditional pass), and data_degree can split either. causal,
    dtype (torch.float32, bfloat16 or float16), train (forward and backward): what runs. hardware: a built-in
    profile name (cp_attention.planner.PROFILE_NAMES), a HardwareProfile, or a .json file saved by
    `python -m cp_attention.profile`. implementation: whose attention runs the layouts (IMPLEMENTATIONS:
    "cp_attention", this library's; "xdit"; "diffusers"). compiled: the model runs under torch.compile; False
    (PyTorch's default) adds the operations an implementation launches around its collectives where
    IMPLEMENTATIONS counts them (diffusers').

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
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{_OP}: implementation must be one of {', '.join(IMPLEMENTATIONS)}, got "
                         f"{implementation!r}")
    profile = get_profile(hardware)
    w = Workload(seq_len, heads, head_dim, kv_heads, batch * (2 if cfg else 1), bool(causal),
                 _dtype_name(dtype), bool(train), implementation, bool(compiled))
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
