"""Where the tests run: every attention backend on every device we have.

A test that takes a `target` argument runs once per backend of `cp_attention.available_backends("cpu")` on
CPU tensors, and once per backend of `available_backends("cuda")` on CUDA tensors. A test that takes a
`device` argument (ops without a backend choice) runs on "cpu" and on "cuda". A test that takes a
`merge_target` argument runs once per merge backend of each device: "auto" (the compiled C++/CUDA kernel)
and "triton" wherever the "triton" attention backend is available. CUDA cases carry the `gpu` marker
(`pytest -m gpu` selects them) and are skipped, with the reason given, only when no CUDA device is present.
A new backend therefore gets the whole suite without touching the tests.

The "triton" backend is available on CUDA when triton imports, and on the CPU only when TRITON_INTERPRET=1
is set before the run (Triton's interpreter: slow, so `make test` runs a subset of it in a subprocess, see
tests/test_triton.py; `TRITON_INTERPRET=1 pytest tests/test_flash_attn.py -k triton` runs a whole suite).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NamedTuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so test files can `import reference`

import cp_attention  # noqa: E402
from cp_attention.aten_backend import ATEN_KERNELS  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device on this machine"


class Target(NamedTuple):
    device: str
    backend: str
    # Our CPU kernels come in one copy per vector ISA, the widest the CPU has chosen at run time
    # (csrc/cpu/dispatch.cpp). A target naming a narrower copy runs its test with the kernels limited to that
    # copy (the autouse fixture `cpu_isa_limit`), so this machine tests every copy it can execute.
    cpu_isa: str = ""

    def __str__(self):
        return f"{self.device}-{self.backend}" + (f"[{self.cpu_isa}]" if self.cpu_isa else "")


def runnable_cpu_isas() -> list[str]:
    """The ISA copies of our CPU kernels this CPU can run: the one dispatch picks and those below it."""
    info = cp_attention.build_info()
    built = list(info["cpu_isas"])
    return built[: built.index(info["cpu_isa"]) + 1]


def narrower_cpu_isas() -> list[str]:
    """The ISA copies of our CPU kernels below the one this CPU runs, all of which it can run too."""
    return runnable_cpu_isas()[:-1]


def cpu_targets() -> list[Target]:
    targets = []
    for b in cp_attention.available_backends("cpu"):
        targets.append(Target("cpu", b))
        if b == "cpu":
            targets += [Target("cpu", b, isa) for isa in narrower_cpu_isas()]
    return targets


def cuda_targets() -> list[Target]:
    return [Target("cuda", b) for b in cp_attention.available_backends("cuda")] if HAS_CUDA else []


def _target_params():
    params = [pytest.param(t, id=str(t)) for t in cpu_targets()]
    if HAS_CUDA:
        params += [pytest.param(t, id=str(t), marks=pytest.mark.gpu) for t in cuda_targets()]
    else:
        skip = [pytest.mark.gpu, pytest.mark.skip(reason=NO_CUDA)]
        params.append(pytest.param(None, id="cuda", marks=skip))
    return params


def kernel_kind(target: Target) -> str:
    """Whose kernel computes the target's results, as tests/reference.py's checks take it (reference.KERNELS):
    "torch" for torch's own kernels ("aten" and the aten_* kernels), "interpreted" for our Triton kernels
    on CPU tensors (Triton's interpreter), "ours" for the rest. Merge targets ("auto", "triton") too."""
    if target.backend == "aten" or target.backend in ATEN_KERNELS:
        return "torch"
    if target.backend == "triton" and target.device == "cpu":
        return "interpreted"
    return "ours"


def merge_backends(device: str) -> list[str]:
    """The merge_attn_states backends that run on `device`."""
    return ["auto"] + (["triton"] if "triton" in cp_attention.available_backends(device) else [])


def _merge_target_params():
    cpu = [Target("cpu", b) for b in merge_backends("cpu")] + [Target("cpu", "auto", isa)
                                                             for isa in narrower_cpu_isas()]
    params = [pytest.param(t, id=str(t)) for t in cpu]
    if HAS_CUDA:
        params += [pytest.param(Target("cuda", b), id=f"cuda-{b}", marks=pytest.mark.gpu)
                   for b in merge_backends("cuda")]
    else:
        skip = [pytest.mark.gpu, pytest.mark.skip(reason=NO_CUDA)]
        params.append(pytest.param(None, id="cuda", marks=skip))
    return params


def _device_params():
    marks = [pytest.mark.gpu] + ([] if HAS_CUDA else [pytest.mark.skip(reason=NO_CUDA)])
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=marks)]


@pytest.fixture(autouse=True)
def cpu_isa_limit(request):
    """Limits our CPU kernels to the ISA copy a `target` or `merge_target` parameter names, for one test."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    target = params.get("target") or params.get("merge_target")
    isa = target.cpu_isa if isinstance(target, Target) else ""
    if not isa:
        yield
        return
    with cpu_isa(isa):
        yield


@contextlib.contextmanager
def cpu_isa(isa: str):
    """Our CPU kernels held to one ISA copy (a name from build_info()["cpu_isas"]) inside the block."""
    from cp_attention import _C

    _C._limit_cpu_isa(isa)
    try:
        yield
    finally:
        _C._limit_cpu_isa("")


def pytest_generate_tests(metafunc):
    # Plain parametrization (not fixtures), so hypothesis-driven tests can take these arguments too.
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", _target_params())
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _device_params())
    if "merge_target" in metafunc.fixturenames:
        metafunc.parametrize("merge_target", _merge_target_params())


# torch's own CUDA kernels each cover part of the contract; tests hand them only what they document
# supporting. Our kernels, and "aten" (which picks a kernel per input), must take everything.
def unsupported_reason(target: Target, dtype: torch.dtype, D: int, Sq: int, Sk: int, causal: bool,
                       has_mask: bool) -> str | None:
    if target.device != "cuda":
        return None
    half = dtype in (torch.float16, torch.bfloat16)
    if target.backend == "aten_flash":
        if not half or has_mask or (causal and Sq != Sk) or D % 8:
            return "aten_flash: half precision, D % 8 == 0, no kv_mask, causal only with Sq == Sk"
    if target.backend == "aten_cudnn":
        if not half or D % 8 or D > 128:
            return "aten_cudnn: half precision, D % 8 == 0, D <= 128"
    if target.backend == "aten_efficient" and D % 8:
        return "aten_efficient: D % 8 == 0"
    return None


def skip_unsupported(target: Target, q: torch.Tensor, Sk: int, causal: bool, has_mask: bool):
    reason = unsupported_reason(target, q.dtype, q.shape[-1], q.shape[1], Sk, causal, has_mask)
    if reason is not None:
        pytest.skip(reason)


def randn(*shape, dtype=torch.float32, device="cpu", gen=None, scale=1.0):
    """Normal samples drawn in float32 on the CPU (identical across devices for one seed), then cast."""
    x = torch.randn(*shape, generator=gen) * scale
    return x.to(device=device, dtype=dtype)


def make_kv_mask(B: int, Sk: int, gen: torch.Generator, device="cpu", empty_batch: bool = True):
    """Random key-padding mask [B, Sk] (about 70% True). With empty_batch, the last batch (when B > 1) hides
    every key, so its rows must come out as out 0 / lse -inf."""
    mask = torch.rand(B, Sk, generator=gen) < 0.7
    if Sk > 0:
        mask[:, torch.randint(0, Sk, (1,), generator=gen)] = True  # most batches keep at least one key
    if empty_batch and B > 1:
        mask[-1] = False
    return mask.to(device)


def toy_hardware(fast_span: int = 4):
    """A synthetic HardwareProfile with round numbers for the planner's tests: `fast_span` devices on a
    fast link (100 GB/s, 5 us), a slow network beyond (10 GB/s, 20 us)."""
    import math

    from cp_attention.planner import HardwareProfile, Link

    return HardwareProfile(
        name="toy", device="toy accelerator", attention_tflops={"bfloat16": {64: 100.0, 128: 200.0}},
        kernel_half_len=100.0, kernel_overhead_us=10.0, gemm_tflops={"bfloat16": 300.0}, memory_gb=80.0,
        devices_per_node=fast_span, overlap=0.5, sources=("test",),
        links=(Link("fast", fast_span, 100.0, 5.0), Link("slow", math.inf, 10.0, 20.0)))
