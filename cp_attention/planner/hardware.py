"""Hardware profiles for the planner: what one accelerator computes and how its links move bytes.

A profile is plain data (JSON round-trips through `to_dict` / `from_dict`): the attention kernel's rate by
dtype and head dim, the rate of the rest of a transformer (dense matmuls), and the machine's link levels
from the innermost (NVLink, a PCIe switch) outwards (socket, node network). A group of ranks uses the
innermost level whose span holds every rank of the group (ranks are numbered consecutively over devices:
rank r on device r, node r // devices_per_node).
"""

from __future__ import annotations

import dataclasses
import json
import math


@dataclasses.dataclass(frozen=True)
class Link:
    """One level of the interconnect.

    name: what it is ("nvlink", "pcie-switch", "socket", "upi", "infiniband", "ethernet", "loopback").
    span: how many consecutive devices it connects (8 for an 8-GPU NVLink domain; math.inf for the
        network between nodes).
    bandwidth_gbs: achievable bandwidth per device, one direction, GB/s (1e9 bytes/s), for large messages
        of a collective whose ranks all send at once.
    latency_us: the fixed cost of one message (one ring hop, one all-to-all round), microseconds.
    """
    name: str
    span: float
    bandwidth_gbs: float
    latency_us: float


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """What the cost model needs to know about a machine.

    name: the profile's name ("h100-sxm").
    device: the accelerator, in words.
    attention_tflops: {dtype name: {head_dim: TFLOP/s}}: the attention forward kernel's rate on large
        shapes (4 * B * H * Sq * Sk * D flops per call, non-causal), e.g. {"bfloat16": {64: 330, 128: 480}}.
    kernel_half_len: the per-call key length (and query length) at which the kernel runs at half its rate:
        small ring steps fill the tiles and the device less well. Rate = peak * Sq / (Sq + h) * Sk / (Sk + h).
    kernel_overhead_us: the fixed cost of one kernel call (launch, merge of the partial result).
    gemm_tflops: {dtype name: TFLOP/s}: the rate of the rest of a transformer layer (its matmuls, and the
        elementwise work between them, counted as matmul FLOPs): what the CLI's step estimate divides by.
    memory_gb: device memory, GB.
    devices_per_node: devices in one node.
    links: the link levels, innermost first, spans increasing; the last spans every device (math.inf).
    overlap: how much of a ring hop hides behind the step's compute, as a fraction of the step's time
        (0 to 1): a hop costs max(0, hop - overlap * step).
    sources: where the numbers come from.
    copy_gbs: memory bandwidth of the copies that pack and unpack Ulysses' all-to-all buffers, and of the
        separate float32 merges of ring implementations that do not merge inside the kernel, GB/s of bytes
        read plus written; None: not modelled.
    sync_us: the extra cost of one synchronisation point (an all-to-all, a ring hop) beyond its transfer:
        ranks that reach it at different times, descheduled ranks where they share cores; 0 by default.
    launch_us: the exposed cost of one operation that an uncompiled (eager) attention implementation
        launches around its collectives, us: host dispatch and launch, and the stream waits between them.
        Applies to implementations whose operations cost.IMPLEMENTATIONS counts (eager_ops), with
        compiled=False; 0 by default.
    """
    name: str
    device: str
    attention_tflops: dict
    kernel_half_len: float
    kernel_overhead_us: float
    gemm_tflops: dict
    memory_gb: float
    devices_per_node: int
    links: tuple
    overlap: float = 0.9
    sources: tuple = ()
    copy_gbs: float | None = None
    sync_us: float = 0.0
    launch_us: float = 0.0

    def __post_init__(self):
        if not self.links:
            raise ValueError(f"profile {self.name!r}: links must name at least one level")
        spans = [link.span for link in self.links]
        if any(a >= b for a, b in zip(spans, spans[1:])) or \
                not math.isinf(spans[-1]) and spans[-1] < self.devices_per_node:
            raise ValueError(f"profile {self.name!r}: link spans must increase strictly and the last must "
                             f"cover a node (or be inf), got {spans}")
        bad = [link.name for link in self.links if not (link.bandwidth_gbs > 0 and link.latency_us >= 0)]
        if bad or not 0 <= self.overlap <= 1 or not self.kernel_half_len >= 0 or not self.sync_us >= 0 \
                or not self.launch_us >= 0 or self.copy_gbs is not None and not self.copy_gbs > 0:
            raise ValueError(f"profile {self.name!r}: link bandwidths must be > 0 and latencies >= 0 "
                             f"(links {bad}), overlap in [0, 1] (got {self.overlap}), kernel_half_len >= 0, "
                             f"sync_us >= 0 (got {self.sync_us}), launch_us >= 0 (got {self.launch_us}), "
                             f"copy_gbs None or > 0 (got {self.copy_gbs})")

    def attention_rate(self, dtype: str, head_dim: int) -> float:
        """TFLOP/s of the attention kernel for dtype and head_dim: interpolated linearly between the listed
        head dims, the largest's above them, and scaled by head_dim / smallest below them (a smaller head
        dim does less work per byte)."""
        table = self.attention_tflops.get(dtype) or self.attention_tflops.get("bfloat16") \
            or next(iter(self.attention_tflops.values()))
        dims = sorted(int(d) for d in table)
        if head_dim <= dims[0]:
            return table_value(table, dims[0]) * head_dim / dims[0]
        below = max(d for d in dims if d <= head_dim)
        above = min((d for d in dims if d >= head_dim), default=below)
        if above == below:
            return table_value(table, below)
        t = (head_dim - below) / (above - below)
        return (1 - t) * table_value(table, below) + t * table_value(table, above)

    def gemm_rate(self, dtype: str) -> float:
        return self.gemm_tflops.get(dtype) or self.gemm_tflops.get("bfloat16") \
            or next(iter(self.gemm_tflops.values()))

    def link_for(self, extent: int) -> Link:
        """The innermost link level whose span holds `extent` consecutive devices."""
        for link in self.links:
            if extent <= link.span:
                return link
        return self.links[-1]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["links"] = [dict(dataclasses.asdict(link), span="inf" if math.isinf(link.span) else link.span)
                      for link in self.links]
        d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "profile") -> HardwareProfile:
        try:
            links = tuple(Link(name=str(x["name"]), span=math.inf if x["span"] in ("inf", None) else
                               float(x["span"]), bandwidth_gbs=float(x["bandwidth_gbs"]),
                               latency_us=float(x["latency_us"])) for x in d["links"])
            return cls(name=str(d["name"]), device=str(d.get("device", d["name"])),
                       attention_tflops={str(k): {int(h): float(r) for h, r in v.items()}
                                         for k, v in d["attention_tflops"].items()},
                       kernel_half_len=float(d["kernel_half_len"]),
                       kernel_overhead_us=float(d["kernel_overhead_us"]),
                       gemm_tflops={str(k): float(v) for k, v in d["gemm_tflops"].items()},
                       memory_gb=float(d["memory_gb"]), devices_per_node=int(d["devices_per_node"]),
                       links=links, overlap=float(d.get("overlap", 0.9)), sources=tuple(d.get("sources", ())),
                       copy_gbs=None if d.get("copy_gbs") is None else float(d["copy_gbs"]),
                       sync_us=float(d.get("sync_us", 0.0)), launch_us=float(d.get("launch_us", 0.0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{where}: not a hardware profile ({type(e).__name__}: {e}); expected the keys "
                             f"name, attention_tflops, kernel_half_len, kernel_overhead_us, gemm_tflops, "
                             f"memory_gb, devices_per_node, links") from None

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> HardwareProfile:
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the profile file does not parse as JSON ({e})") from None
        except OSError as e:
            raise ValueError(f"{path}: the profile file cannot be read ({e})") from None
        return cls.from_dict(data, where=path)


def table_value(table: dict, head_dim: int) -> float:
    return float(table.get(head_dim, table.get(str(head_dim))))
