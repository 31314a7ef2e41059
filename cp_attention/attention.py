"""Public attention API: one entry point over every implementation (backend) of the forward pass."""

from __future__ import annotations

import math
import warnings

import torch

from . import _C, ops, triton_kernels
from . import kernel_variants as kv
from ._checks import check_acc_state, check_attn_inputs, check_bwd_inputs
from .aten_backend import (
    ATEN_KERNELS,
    AtenAttention,
    LseWithoutGrad,
    aten_attention,
    aten_attention_bwd,
    merge_states_torch,
)

# Our own kernels, by the device type they run on.
_OWN_BACKENDS = {"cpu": "cpu", "cuda": "cuda"}
# Own kernels that "auto" does not pick first: on an H200 our CUDA kernel passed the GPU tests that ran, at
# 0.4x torch's cuDNN kernel (bf16, D 128, S >= 4k; benchmarks/results/flash_fwd-nvidia-h200-*.json), so
# torch's kernels stay the default on GPUs.
_NOT_AUTO = {"cuda"}
# The Triton kernels: on CUDA tensors, and on CPU tensors under Triton's interpreter (a test vehicle).
TRITON = "triton"
_MERGE_BACKENDS = ("auto", TRITON)
# Every backend name flash_attn takes, for its error message.
_ALL_BACKENDS = sorted({*_OWN_BACKENDS.values(), *kv.BACKENDS, "aten", *ATEN_KERNELS})


@torch._dynamo.assume_constant_result
def _triton_runs_on(device_type: str) -> bool:
    """Whether the Triton backend runs on this device type; fixed for a process, so torch.compile may take
    it as a constant (the lookup reads the environment and tries an import, which it cannot trace)."""
    return triton_kernels.available_on(device_type)


# Host time matters here: a ring step on a GPU can take less than the Python around its launch, so what
# does not change within a process is looked up once. Kernels register when the library loads and stay.
_KERNEL_FOUND: dict[tuple[str, str], bool] = {}
_BACKENDS_FOUND: dict[tuple[str, int | None, bool], tuple[str, ...]] = {}
_IMAGE_FITS: dict[int, bool] = {}  # CUDA device index -> whether our CUDA kernels load on it


def _has_kernel(op: torch._ops.OpOverload, device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False
    name = op.name()
    found = _KERNEL_FOUND.get((name, key))
    if found is None:
        found = _KERNEL_FOUND[(name, key)] = torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    return found


def _cuda_index(device: torch.device) -> int | None:
    """The index of a CUDA device, or None where torch sees no CUDA device (nothing runs there to judge)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def _probe_kernel_image(index: int) -> bool:
    return bool(_C.cuda_kernel_image_fits(index))


def _device_name(index: int) -> str:
    try:
        props = torch.cuda.get_device_properties(index)
    except (RuntimeError, AssertionError):
        return "a device torch cannot describe"
    return f"{props.name}, sm_{props.major}{props.minor}"


def _cuda_image_fits(index: int) -> bool:
    """Whether our CUDA kernels load on CUDA device `index` (asked of the runtime once per device). Where they
    do not, one warning says so: "auto" then takes Triton's kernels or torch's on that device."""
    fits = _IMAGE_FITS.get(index)
    if fits is None:
        fits = _IMAGE_FITS[index] = _probe_kernel_image(index)
        if not fits:
            info = _C.build_info()
            warnings.warn(
                f"cp_attention: this build's CUDA kernels (machine code for {info['cuda_archs']!r}, PTX for "
                f"{info['cuda_ptx']!r}) have no image that loads on CUDA device {index} "
                f"({_device_name(index)}); attention and merges with backend 'auto' use Triton's or torch's "
                "kernels there. Rebuild with CP_ATTENTION_CUDA_ARCHS naming this device's architecture to "
                "run ours.", RuntimeWarning, stacklevel=3)
    return fits


@torch._dynamo.assume_constant_result
def _own_kernels_run(op_name: str, device_type: str, index: int | None) -> bool:
    """Whether our compiled kernel of this op runs on the device: the build registered one for its type,
    and on CUDA an image of the build loads on the device. Fixed for a process (a constant to
    torch.compile)."""
    device = torch.device(device_type, index)
    if not _has_kernel(getattr(torch.ops.cp_attention, op_name).default, device):
        return False
    if device_type == "cuda":
        index = _cuda_index(device)
        return index is None or _cuda_image_fits(index)
    return True


def _own_runs(op_name: str, device: torch.device) -> bool:
    return _own_kernels_run(op_name, device.type, device.index)


# "auto" on the CPU: our kernel ("cpu") or torch's ("aten"), whichever ran faster on this machine, timed
# once per process, dtype and mode (forward, or forward and backward when training) on a probe shape.
# CPUs differ too much (ISA, cores, caches) for a choice made elsewhere to hold.
_CPU_AUTO: dict[tuple[str, bool], dict] = {}
_CPU_PROBE = (1, 512, 4, 64)  # B, S, H, D: a few ms per call, big enough that per-call overhead is minor
_CPU_PROBE_ROUNDS = 5
_CPU_AUTO_MARGIN = 1.15  # torch's kernel must be this many times faster to be chosen


def _cpu_probe_ms(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, train: bool) -> float:
    import time

    with torch.enable_grad() if train else torch.no_grad():
        t0 = time.perf_counter()
        out, lse = flash_attn(q, k, v, return_lse=True, backend=backend)
        if train:
            torch.autograd.backward([out, lse], [torch.ones_like(out), torch.ones_like(lse)])
        return (time.perf_counter() - t0) * 1e3


@torch._dynamo.assume_constant_result
def _cpu_auto(dtype_name: str, train: bool) -> str:
    key = (dtype_name, train)
    if key not in _CPU_AUTO:
        names = available_backends("cpu")
        candidates = [b for b in ("cpu", "aten") if b in names]
        gen = torch.Generator().manual_seed(0)
        B, S, H, D = _CPU_PROBE
        dtype = getattr(torch, dtype_name)
        q, k, v = (torch.randn(B, S, H, D, generator=gen).to(dtype).requires_grad_(train) for _ in range(3))
        times = {b: [] for b in candidates}
        for r in range(_CPU_PROBE_ROUNDS + 1):  # the first round warms up, untimed
            for b in candidates:  # taking turns, so machine noise favours neither
                ms = _cpu_probe_ms(b, q, k, v, train)
                if r:
                    times[b].append(ms)
        medians = {b: sorted(t)[len(t) // 2] for b, t in times.items()}
        # Ours unless torch's is clearly faster: a near tie must not flip from process to process (ranks of
        # one job would run different kernels).
        chosen = "cpu"
        if "aten" in medians and medians["aten"] * _CPU_AUTO_MARGIN < medians.get("cpu", float("inf")):
            chosen = "aten"
        _CPU_AUTO[key] = {"backend": chosen, "probe_ms": medians, "margin": _CPU_AUTO_MARGIN,
                          "probe_shape": dict(zip("BSHD", _CPU_PROBE))}
    return _CPU_AUTO[key]["backend"]


def auto_backend(device: torch.device | str, dtype: torch.dtype = torch.float32, train: bool = False) -> str:
    """The backend "auto" runs for inputs of `dtype` on `device` (train: inputs that require grad, so the
    backward counts too). On the CPU, for float32 inputs "cpu" or "aten", whichever is faster here: measured
    once per process and mode, taking turns on a [1, 512, 4, 64] probe; ours unless torch's is 15% faster,
    so that a near tie cannot come out differently in the ranks of one job (cpu_auto_choices() shows the
    timings). Half-precision inputs always get "cpu": torch's CPU kernels round their LSE beyond the bound.
    On other devices, the first of available_backends."""
    device = torch.device(device)
    names = available_backends(device)
    if device.type == "cpu" and "cpu" in names and "aten" in names:
        if dtype in (torch.float16, torch.bfloat16):
            # torch's CPU kernels round a half-precision LSE (and its backward's gradients) beyond the
            # contract's bound (docs/design.md, "LSE"), so for these inputs only ours qualifies.
            return "cpu"
        return _cpu_auto(str(dtype).removeprefix("torch."), bool(train))
    return names[0]


def cpu_auto_choices() -> dict:
    """What "auto" measured on the CPU so far:
    {(dtype name, train): {"backend", "probe_ms", "probe_shape"}}."""
    return {key: dict(value) for key, value in _CPU_AUTO.items()}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device`, fastest first where that is known ahead: on GPUs "aten", whose
    cuDNN and flash kernels outran ours on an H200, then our CUDA kernel, and "auto" takes the first; on the
    CPU "auto" times the first two, "cpu" and "aten" (auto_backend).

    "cuda" and "triton" run the kernels cp_attention.kernel_variants.DEFAULTS names, which a GPU run has
    shown right; the opt-in backends of unproven kernels ("cuda_sm90", "triton_tma") are never listed.
    "triton" is listed on CUDA when triton imports, and on the CPU only when TRITON_INTERPRET=1 is set (the
    interpreter is far too slow for real work: it is there so the test suites can run the Triton kernels).
    "cuda" is left out on a CUDA device that no image of this build's kernels fits (with one warning).
    """
    device = torch.device(device)
    index = _cuda_index(device) if device.type == "cuda" else None
    # The interpreter setting is part of the key: Triton reads it when its kernels are first imported.
    key = (device.type, index, triton_kernels.interpret_requested())
    if key not in _BACKENDS_FOUND:
        _BACKENDS_FOUND[key] = tuple(_find_backends(torch.device(device.type, index)))
    return list(_BACKENDS_FOUND[key])


def _find_backends(device: torch.device) -> list[str]:
    names = []
    own = _OWN_BACKENDS.get(device.type)
    has_own = own is not None and _own_runs("flash_attn_fwd", device)
    if has_own and own not in _NOT_AUTO:
        names.append(own)
    names.append("aten")
    if has_own and own in _NOT_AUTO:
        names.append(own)
    if device.type == "cpu":
        names.append("aten_cpu_flash")
    elif device.type == "cuda":
        names += [n for n in ATEN_KERNELS if n != "aten_cpu_flash"]
    if _triton_runs_on(device.type):
        names.append(TRITON)
    return names


def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
               causal: bool = False, kv_mask: torch.Tensor | None = None, return_lse: bool = False,
               backend: str = "auto"):
    """Exact attention that can return its log-sum-exp, so partial results over key chunks merge exactly.

    Args:
        q: [B, Sq, H, D] float32, float16 or bfloat16; any strides with the last dimension contiguous.
        k, v: [B, Sk, Hkv, D], q's dtype and device; H % Hkv == 0 (GQA: query head h reads kv head
            h // (H // Hkv)). D from 1 to 256.
        scale: multiplies q.k; defaults to 1 / sqrt(D).
        causal: query i sees key j iff j <= i + Sk - Sq (bottom-right aligned).
        kv_mask: bool [B, Sk], True = attend (a key-padding mask).
        return_lse: also return the LSE.
        backend: "auto" (fastest available for the device and inputs: auto_backend), "cpu" (our C++ kernel,
            the widest ISA copy this CPU has: AMX, AVX-512, AVX2 or generic), "cuda" (our
            CUDA kernel that a GPU run has shown right: float16/bfloat16 on tensor cores by mma.sync, float32
            on a simple kernel), "triton" (our Triton kernel with its pointer-load tiles: CUDA, or the CPU
            under TRITON_INTERPRET=1), "aten" (torch's best LSE-returning kernel, normalized to this
            contract), or one torch kernel: "aten_cpu_flash", "aten_flash", "aten_cudnn", "aten_efficient".
            Opt-in, not yet run on a GPU: "cuda_sm90" (the Hopper wgmma kernels, TMA-fed where q, k and v
            allow, where the device and head dim allow, else mma.sync) and "triton_tma" (the autotuner may
            pick TMA tiles on sm_90 and newer). cp_attention.kernel_variants records what is proven.

    Returns:
        out [B, Sq, H, D] in q's dtype, contiguous; with return_lse also lse [B, H, Sq] float32,
        lse[b, h, i] = log(sum_j exp(scale * <q[b, i, h], k[b, j, h // (H // Hkv)]>)) over the visible keys
        (natural log). A row that sees no key gets out 0 and lse -inf. With backends "cpu" and "aten" on CPU
        tensors both are differentiable with respect to q, k and v (docs/design.md, "Backward"); on CUDA,
        "auto" picks "aten" for inputs that require grad, which differentiates out only (a loss that uses
        the lse raises at backward). Our CUDA and Triton kernels are forward-only.
    """
    op = "cp_attention.flash_attn"
    check_attn_inputs(op, q, k, v, kv_mask)
    if backend == "auto":
        backend = auto_backend(q.device, q.dtype, _needs_grad(q, k, v))
        if backend not in _DIFFERENTIABLE and _needs_grad(q, k, v):
            backend = "aten"  # our GPU kernels have no backward yet: torch's kernels and autograd train
    if backend == "cpu":
        _check_own_device(op, backend, "cpu", q.device)
        kv.log_choice(op, backend, "cpu", "default", q)
        out, lse = ops.flash_attn_fwd(q, k, v, scale, causal, kv_mask)
    elif backend in kv.BACKENDS:
        engine, kernel = kv.resolve(backend)
        if engine == "cuda":
            _check_own_device(op, backend, "cuda", q.device)
            kv.log_choice(op, backend, engine, kernel, q)
            out, lse = ops.flash_attn_fwd(q, k, v, scale, causal, kv_mask, kernel)
        else:
            _check_triton_device(op, q.device, backend)
            kv.log_choice(op, backend, engine, kernel, q)
            out, lse = ops.triton_flash_attn_fwd(q, k, v, scale, causal, kv_mask, kernel)
    elif backend == "aten" or backend in ATEN_KERNELS:
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        if not _needs_grad(q, k, v):
            out, lse = aten_attention(q, k, v, s, causal, kv_mask, kernel=backend)
        elif q.device.type == "cpu":
            out, lse = AtenAttention.apply(q, k, v, s, bool(causal), kv_mask, backend)
        else:  # torch's autograd differentiates out; the lse must not pass for differentiable
            out, lse = aten_attention(q, k, v, s, causal, kv_mask, kernel=backend)
            lse = LseWithoutGrad.apply(lse, q)
    else:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of {_ALL_BACKENDS}")
    return (out, lse) if return_lse else out


# Backends whose forward backpropagates (through out and lse) wherever they run.
_DIFFERENTIABLE = ("cpu", "aten", "aten_cpu_flash")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, *, scale: float | None = None, causal: bool = False,
                   kv_mask: torch.Tensor | None = None, dlse: torch.Tensor | None = None,
                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of flash_attn's (out, lse) with respect to q, k and v, from the forward's inputs and
    outputs (docs/design.md, "Backward"); no Sq x Sk matrix is kept.

    dout, out: [B, Sq, H, D] in q's dtype, last dim contiguous; lse, dlse: [B, H, Sq] float32 (dlse None: no
    gradient reaches the lse). q, k, v, scale, causal and kv_mask as in flash_attn. With float32 inputs the
    lse and out may be those over a superset of these keys: the gradients are then this key chunk's share
    (a ring step; for float16/bfloat16 inputs our kernel takes every key of the row, docs/design.md,
    "Backward").
    backend: "auto" or "cpu" (our C++ kernel), or "aten" / "aten_cpu_flash" (torch's CPU flash backward);
    CPU tensors only.

    Returns (dq [B, Sq, H, D], dk, dv [B, Sk, Hkv, D]) in q's dtype; with GQA dk and dv are summed over the
    query heads of each kv head. Rows that see no key contribute nothing."""
    op = "cp_attention.flash_attn_bwd"
    if backend in ("auto", "cpu"):
        return ops.flash_attn_bwd(dout, q, k, v, out, lse, scale, causal, kv_mask, dlse)
    if backend in ("aten", "aten_cpu_flash"):
        check_bwd_inputs(op, dout, q, k, v, out, lse, kv_mask, dlse)
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return aten_attention_bwd(dout, q, k, v, out, lse, s, causal, kv_mask, dlse)
    raise ValueError(f"{op}: backend {backend!r} has no backward; expected 'auto', 'cpu', 'aten' or "
                     "'aten_cpu_flash' (CPU tensors)")


def _check_own_device(op: str, backend: str, device_type: str, device: torch.device) -> None:
    """Our compiled kernels run on their own device type, and on CUDA only where an image of them fits."""
    if device.type != device_type:
        raise ValueError(f"{op}: backend {backend!r} runs on {device_type} tensors, got q on {device}")
    if device_type == "cuda" and not _own_runs("flash_attn_fwd", device):
        raise RuntimeError(f"{op}: backend {backend!r} cannot run on {device}: this build has no CUDA kernel "
                           "that loads on it (see the warning above, or build_info()); use 'auto', 'triton' "
                           "or 'aten', or rebuild for this device")


def _check_triton_device(op: str, device: torch.device, backend: str = TRITON):
    if not _triton_runs_on(device.type):
        if device.type not in ("cpu", "cuda"):
            why = "Triton kernels run on CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)"
        elif not triton_kernels.triton_importable():
            why = "triton is not importable here"
        else:
            why = "Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
        raise ValueError(f"{op}: backend {backend!r} cannot run on {device}: {why}")


def _merge_engine(op: str, backend: str, out: torch.Tensor) -> str:
    """Which merge runs: "own" (the library's compiled C++/CUDA kernel), "triton", or "torch" (plain torch
    ops: "auto" on a device where neither of our kernels runs, e.g. a GPU no image of the build fits)."""
    if backend not in _MERGE_BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {list(_MERGE_BACKENDS)}")
    if not isinstance(out, torch.Tensor):
        return "own"  # the op's own checks name the bad argument
    if backend == TRITON:
        _check_triton_device(op, out.device)
        return TRITON
    if out.device.type == "cuda" and not _own_runs("merge_attn_states", out.device):
        return TRITON if _triton_runs_on("cuda") else "torch"
    return "own"


def _log_merge(op: str, backend: str, engine: str, out) -> None:
    if isinstance(out, torch.Tensor):
        kv.log_choice(op, backend, out.device.type if engine == "own" else engine, "merge", out)


def merge_attn_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                      *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Merges partial attention states over disjoint key sets A and B into the state over A and B.

    out_a, out_b: [B, S, H, D] float32/float16/bfloat16, any strides; lse_a, lse_b: [B, H, S] float32, any
    strides. With m = max(lse_a, lse_b): lse = m + log(exp(lse_a - m) + exp(lse_b - m)) and
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse), computed in float32. A side with lse -inf
    contributes nothing (its out is not read into the sum); both -inf gives out 0, lse -inf.

    backend: "auto" (the library's C++/CUDA kernel for the device; on a GPU that no image of the build fits,
    the Triton kernel, else plain torch ops) or "triton".

    Returns (out [B, S, H, D] contiguous, dtype promoted from out_a and out_b; lse [B, H, S] float32).
    """
    op = "cp_attention.merge_attn_states"
    engine = _merge_engine(op, backend, out_a)
    _log_merge(op, backend, engine, out_a)
    if engine == TRITON:
        return ops.triton_merge_attn_states(out_a, lse_a, out_b, lse_b)
    if engine == "torch":
        return merge_states_torch(op, out_a, lse_a, out_b, lse_b)
    return ops.merge_attn_states(out_a, lse_a, out_b, lse_b)


def merge_attn_states_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                       lse_b: torch.Tensor, *, backend: str = "auto") -> None:
    """In-place merge_attn_states: (out, lse) <- merge((out, lse), (out_b, lse_b)).

    out [B, S, H, D] (a float32 accumulator is recommended for half-precision chunks), lse [B, H, S]
    float32; out_b/lse_b as in merge_attn_states. Any strides. backend: as in merge_attn_states.
    """
    op = "cp_attention.merge_attn_states_"
    engine = _merge_engine(op, backend, out)
    _log_merge(op, backend, engine, out)
    if engine == TRITON:
        ops.triton_merge_attn_states_(out, lse, out_b, lse_b)
    elif engine == "torch":
        merge_states_torch(op, out, lse, out_b, lse_b, into=(out, lse))
    else:
        ops.merge_attn_states_(out, lse, out_b, lse_b)


def flash_attn_acc_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, *,
                    scale: float | None = None, causal: bool = False, kv_mask: torch.Tensor | None = None,
                    backend: str = "auto") -> None:
    """One ring step: attends q to the K/V chunk (k, v) and merges the result into the running state
    (out, lse) in place, i.e. (out, lse) <- merge((out, lse), flash_attn(q, k, v, return_lse=True)).

    q, k, v, scale, causal, kv_mask and backend as in flash_attn (causal is the chunk's own bottom-right
    rule). out: [B, Sq, H, D] in q's dtype or float32 (recommended for half inputs), last dim contiguous,
    other strides free (a row slice of a bigger accumulator works); lse: [B, H, Sq] float32, any strides.
    Start from out 0 and lse -inf (attention over no key); rows that see no key of this chunk keep their
    state. Our own kernels ("cpu", "cuda", "cuda_sm90", "triton", "triton_tma", or "auto" where it picks
    one) merge in the kernel's epilogue (ops flash_attn_fwd_acc_ / triton_flash_attn_fwd_acc_), so the
    partial result never goes to memory; torch's kernels run the forward, then the merge of
    merge_attn_states_ (backend "auto"). out and lse must not share memory with q, k, v or kv_mask.
    """
    op = "cp_attention.flash_attn_acc_"
    check_attn_inputs(op, q, k, v, kv_mask)
    check_acc_state(op, q, out, lse)
    if backend == "auto":
        backend = auto_backend(q.device, q.dtype)
    engine, kernel = kv.resolve(backend) if backend in kv.BACKENDS else (backend, "default")
    if engine in _OWN_BACKENDS and q.device.type == engine and _own_runs("flash_attn_fwd_acc_", q.device):
        kv.log_choice(op, backend, engine, kernel, q)
        ops.flash_attn_fwd_acc_(q, k, v, out, lse, scale, causal, kv_mask, kernel)
        return
    if engine == TRITON:
        _check_triton_device(op, q.device, backend)
        kv.log_choice(op, backend, engine, kernel, q)
        ops.triton_flash_attn_fwd_acc_(q, k, v, out, lse, scale, causal, kv_mask, kernel)
        return
    part_out, part_lse = flash_attn(q, k, v, scale=scale, causal=causal, kv_mask=kv_mask, return_lse=True,
                                    backend=backend)
    merge_attn_states_(out, lse, part_out, part_lse)
