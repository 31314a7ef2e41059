"""cp_attention as a diffusers attention backend, context parallelism included.

    import cp_attention.integrations.diffusers as cpd
    cpd.register()                                     # once per process; backend=, check= optional
    transformer.set_attention_backend("cp_attention")  # our kernels, single process
    cpd.enable_parallelism(transformer, ContextParallelConfig(ring_degree=2, ulysses_degree=2))
    # or, loading: cpd.from_pretrained(FluxTransformer2DModel, path, ContextParallelConfig(ulysses_degree=4))

With a `ContextParallelConfig`, diffusers' hooks split the sequence (its model's `_cp_plan`) and the
backend runs cp_attention's ring (peer-to-peer K/V rotation), Ulysses or Unified attention on the process
groups of diffusers' own meshes (`_ring_mesh`, `_ulysses_mesh`). Outside diffusers' "anything" modes its
hooks split every sequence evenly (they assert it), so every rank's shard is as long as this one's: the
backend states those lengths, and a call whose signature was agreed before moves only its data. In the
"anything" modes the lengths are exchanged on every call. `register(backend=..., check=...)` picks the
kernel backend and the agreement check ("always" also reports shards that break the even split on every
rank; with "once" such a misuse can leave a rank waiting once a matching signature was agreed).

How it plugs in: diffusers (0.40 to 0.42) dispatches attention through a private registry keyed by the
closed string enum `AttentionBackendName`. `register()` adds one member, CP_ATTENTION = "cp_attention", to
that enum (the existing members are untouched) and registers the backend function with
`supports_context_parallel=True`, the way diffusers registers its own. This touches private API, so the
diffusers version is checked first: outside SUPPORTED_VERSIONS, `register()` raises UnsupportedDiffusers.

CPU-only machines: diffusers 0.42's `enable_parallelism` (through `ModelMixin._resolve_parallel_config`)
places each rank on `torch.device(accelerator_type, rank % torch.accelerator.device_count())`, a division
by zero where no accelerator exists (0.40 and 0.41 asked the device module, which counts the CPU as one
device). `no_accelerator_workaround()` makes `torch.accelerator.device_count()` answer 1 while it is active,
only when it would answer 0; `enable_parallelism(transformer, config)` here wraps diffusers' call in it.
Nothing is changed at import or left changed afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re

import torch

from cp_attention.attention import flash_attn
from cp_attention.distributed import ring_attention, ulysses_attention, unified_attention
from cp_attention.distributed._agreement import check_mode
from cp_attention.sdpa_drop_in import Unsupported, plan_bshd, sdpa

BACKEND_NAME = "cp_attention"
ENUM_NAME = "CP_ATTENTION"
# (major, minor) versions whose private attention-dispatch API this module was written against; tested on
# TESTED_VERSION.
SUPPORTED_VERSIONS = ((0, 40), (0, 41), (0, 42))
TESTED_VERSION = "0.42.1"
_OP = "cp_attention.integrations.diffusers"


class UnsupportedDiffusers(RuntimeError):
    """The installed diffusers is missing or is a version this integration does not support."""


def _supported_text() -> str:
    return ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VERSIONS) + f" (tested on {TESTED_VERSION})"


def check_version(version: str | None = None) -> str:
    """Returns the installed diffusers version (or checks `version`); raises UnsupportedDiffusers naming
    the supported versions when it is outside them or cannot be read."""
    if version is None:
        try:
            import diffusers
        except ImportError as e:
            raise UnsupportedDiffusers(f"{_OP}: diffusers is not installed; supported versions: "
                                       f"{_supported_text()}") from e
        version = getattr(diffusers, "__version__", "unknown")
    m = re.match(r"^(\d+)\.(\d+)", str(version))
    if m is None or (int(m.group(1)), int(m.group(2))) not in SUPPORTED_VERSIONS:
        raise UnsupportedDiffusers(f"{_OP}: diffusers {version} is not supported (the backend uses "
                                   f"diffusers' private attention registry); supported versions: "
                                   f"{_supported_text()}")
    return str(version)


def _add_enum_member(enum_cls, name: str, value: str):
    """Adds `name = value` to a closed (str, Enum) class and returns the member; returns the existing member
    when `value` is already there. Only the member tables gain an entry: nothing else of the enum changes."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    if name in enum_cls._member_map_:
        raise UnsupportedDiffusers(f"{_OP}: {enum_cls.__name__}.{name} already exists with another value "
                                   f"({enum_cls._member_map_[name].value!r})")
    member = str.__new__(enum_cls, value)  # a str-mixin member is the string itself, like diffusers' own
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_cls
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    # type.__setattr__: the enum metaclass guards member attributes, and this one is new.
    type.__setattr__(enum_cls, name, member)
    return member


def register(backend: str = "auto", check: str = "once"):
    """Adds the "cp_attention" backend to diffusers' attention dispatch and returns its AttentionBackendName
    member. Raises UnsupportedDiffusers for a diffusers outside SUPPORTED_VERSIONS.

    backend: the flash_attn backend every call uses ("auto": the fastest measured one for the device; e.g.
        "aten" keeps torch's kernels under our context parallelism). check: the context-parallel agreement
        check, "once" per signature or "always" (see cp_attention.ring_attention). A second call with the
        same options changes nothing; with other options it replaces the first's.
    """
    check_version()
    if not isinstance(backend, str):
        raise ValueError(f"{_OP}.register: backend must be a backend name (str), got "
                         f"{type(backend).__name__}")
    check_mode(f"{_OP}.register", check)
    from diffusers.models import attention_dispatch as ad

    registry = ad._AttentionBackendRegistry
    member = _add_enum_member(ad.AttentionBackendName, ENUM_NAME, BACKEND_NAME)
    fn = attention_backend if (backend, check) == ("auto", "once") else functools.partial(
        attention_backend, backend=backend, check=check)
    current = registry._backends.get(member)
    if _options(current) != (backend, check):
        # Constraints as diffusers' native backend declares them; they run when DIFFUSERS_ATTN_CHECKS is set.
        registry.register(member, constraints=[ad._check_device, ad._check_shape],
                          supports_context_parallel=True)(fn)
    return member


def _options(fn) -> tuple[str, str] | None:
    if fn is attention_backend:
        return "auto", "once"
    if isinstance(fn, functools.partial) and fn.func is attention_backend:
        return fn.keywords.get("backend", "auto"), fn.keywords.get("check", "once")
    return None


def _backend_error(why) -> ValueError:
    return ValueError(f"{_OP}: the cp_attention backend cannot run these arguments: {why}")


def attention_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                      _parallel_config=None, *, backend: str = "auto", check: str = "once"):
    """The function diffusers' dispatch_attention_fn calls for backend "cp_attention".

    Args:
        query: [B, S_q, H, D] (BSHD, diffusers' layout), float32, float16 or bfloat16, last dim contiguous.
        key, value: [B, S_k, Hkv, D]; Hkv != H needs enable_gqa (H % Hkv == 0).
        attn_mask: None or a bool key-padding mask (True = attend): [B, S_k], [B, 1, 1, S_k] (Qwen-Image's
            joint mask) or anything else broadcastable to [B, 1, 1, S_k].
        dropout_p: 0 (inference). is_causal: causal over the sequence; under context parallelism over the
            global sequence. scale: defaults to 1 / sqrt(D).
        return_lse: also return the LSE, in diffusers' layout [B, S_q, H] float32 (natural log of the sum
            of exp(scale * q.k) over the visible keys; -inf for a query that sees none).
        _parallel_config: diffusers' ParallelConfig, or None. With a context_parallel_config, q, k, v (and
            the mask) are this rank's sequence shards and attention covers the global sequence: ring
            attention when only ring_degree > 1, Ulysses when only ulysses_degree > 1, Unified when both,
            on the groups of its _ring_mesh and _ulysses_mesh.
        backend, check: set by register(); diffusers never passes them.

    Returns:
        out [B, S_q, H, D] in query's dtype (and lse [B, S_q, H] float32 with return_lse).

    Without context parallelism, arguments our kernels do not cover run torch's SDPA (warning once per
    reason) unless the LSE is asked for; under context parallelism, and for the LSE, they raise ValueError.
    """
    B = query.shape[0] if isinstance(query, torch.Tensor) else None
    if (isinstance(attn_mask, torch.Tensor) and isinstance(key, torch.Tensor) and attn_mask.dim() == 2
            and tuple(attn_mask.shape) == (B, key.shape[1])):
        attn_mask = attn_mask[:, None, None, :]  # diffusers' [B, S_k] convention, as its native backend
    cp_config = getattr(_parallel_config, "context_parallel_config", None)

    if cp_config is None:
        if not return_lse:
            out = sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask,
                       dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa, backend=backend)
            return out.transpose(1, 2)
        try:
            kv_mask = plan_bshd(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, local=True)
        except Unsupported as why:
            raise _backend_error(why) from None
        out, lse = flash_attn(query, key, value, scale=scale, causal=is_causal, kv_mask=kv_mask,
                              return_lse=True, backend=backend)
        return out, lse.transpose(1, 2).contiguous()

    try:
        kv_mask = plan_bshd(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, local=False)
    except Unsupported as why:
        raise _backend_error(why) from None
    R, U = cp_config.ring_degree, cp_config.ulysses_degree
    kw = dict(scale=scale, causal=is_causal, kv_mask=kv_mask, return_lse=return_lse, backend=backend,
              check=check, seq_lens=_equal_shards(cp_config, query, R * U if R > 1 and U > 1 else max(R, U)))
    try:
        if R > 1 and U > 1:
            result = unified_attention(query, key, value, ring_group=cp_config._ring_mesh.get_group(),
                                       ulysses_group=cp_config._ulysses_mesh.get_group(), **kw)
        elif R > 1:
            result = ring_attention(query, key, value, group=cp_config._ring_mesh.get_group(), **kw)
        else:
            result = ulysses_attention(query, key, value, group=cp_config._ulysses_mesh.get_group(), **kw)
    except ValueError as e:
        if kw["seq_lens"] is None or "actual sequence lengths" not in str(e):
            raise
        flag = "ring_anything" if U == 1 else "ulysses_anything" if R == 1 else None
        how = (f"set {flag}=True in the ContextParallelConfig" if flag else
               "diffusers has no mode for uneven shards on a 2D mesh")
        raise ValueError(f"{_OP}: the ranks' sequence shards differ in length, while diffusers' context "
                         f"parallelism splits every sequence evenly unless told otherwise; {how} "
                         f"({e})") from e
    if not return_lse:
        return result
    out, lse = result
    return out, lse.transpose(1, 2).contiguous()


def _equal_shards(cp_config, query, world: int):
    """The ranks' lengths when diffusers' hooks guarantee them: outside its "anything" modes every split
    sequence must divide evenly (its sharder asserts it), so every rank holds as many positions as this one
    and no exchange is needed to learn them. In those modes: None (exchanged on every call)."""
    if getattr(cp_config, "ulysses_anything", False) or getattr(cp_config, "ring_anything", False):
        return None
    if not isinstance(query, torch.Tensor) or query.dim() != 4:
        return None  # the attention's own checks name the problem
    return [query.shape[1]] * world


@contextlib.contextmanager
def no_accelerator_workaround():
    """While active, and only on a machine without an accelerator, torch.accelerator.device_count()
    answers 1 instead of 0, so that diffusers 0.42's `rank % torch.accelerator.device_count()` (in
    ModelMixin._resolve_parallel_config, run by enable_parallelism and by from_pretrained(...,
    parallel_config=...)) places every rank on the CPU instead of dividing by zero. Restored on exit."""
    accelerator = torch.accelerator
    original = accelerator.device_count
    if original() > 0:
        yield
        return
    accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        accelerator.device_count = original


def from_pretrained(model_cls, path, config, **kwargs):
    """`model_cls.from_pretrained(path, parallel_config=..., **kwargs)` with context parallelism on the
    cp_attention backend: registers the backend, loads under no_accelerator_workaround (CPU-only machines),
    and sets the loaded model's attention backend to "cp_attention". `config`: a ContextParallelConfig or a
    diffusers ParallelConfig. A ContextParallelConfig is wrapped in ParallelConfig(context_parallel_config=
    ...) first: diffusers 0.42.1's from_pretrained reads `.tensor_parallel_config` from what it is given,
    so a bare ContextParallelConfig raises AttributeError there. Returns the model; a collective (every rank
    of the world calls it, after init_process_group)."""
    register()
    try:
        from diffusers import ContextParallelConfig, ParallelConfig
    except ImportError:  # an older diffusers: its from_pretrained takes the ContextParallelConfig itself
        ContextParallelConfig = ParallelConfig = None
    if ParallelConfig is not None and isinstance(config, ContextParallelConfig):
        config = ParallelConfig(context_parallel_config=config)
    with no_accelerator_workaround():
        model = model_cls.from_pretrained(path, parallel_config=config, **kwargs)
    model.set_attention_backend(BACKEND_NAME)
    return model


def enable_parallelism(transformer, config, cp_plan=None):
    """transformer.enable_parallelism(config=config, cp_plan=cp_plan), made to work without an accelerator
    (see no_accelerator_workaround); registers the cp_attention backend first so that it can be the
    transformer's backend. On machines with an accelerator it is exactly diffusers' call.

    On a CPU-only machine with a CUDA build of torch, the uneven-sequence modes (`ring_anything`,
    `ulysses_anything`) also need the process group created as `init_process_group("cpu:gloo")`: diffusers
    picks the device of its size exchange from that backend name and otherwise asks for a CUDA tensor."""
    register()
    with no_accelerator_workaround():
        transformer.enable_parallelism(config=config, cp_plan=cp_plan)
    return transformer


# The mesh of parallelize_pipeline: replicas on the CFG and data axes (outermost), each context-parallel
# inside.
PIPELINE_MESH_DIMS = ("cfg", "data", "ring", "ulysses")
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


@dataclasses.dataclass
class PipelineParallel:
    """What parallelize_pipeline set up: the degrees, this rank's place, the mesh (dims PIPELINE_MESH_DIMS,
    shape (cfg_degree, data_degree, ring_degree, ulysses_degree)) and the transformers it changed."""
    cfg_degree: int
    data_degree: int
    ring_degree: int
    ulysses_degree: int
    mesh: object
    transformers: tuple[str, ...]
    plan: object = None  # the planner's Plan, with layout="auto"

    @property
    def cfg_rank(self) -> int:
        return self.mesh.get_local_rank("cfg")

    @property
    def data_rank(self) -> int:
        return self.mesh.get_local_rank("data")


def parallelize_pipeline(pipe, *, ring_degree: int = 1, ulysses_degree: int = 1, cfg_degree: int = 1,
                         data_degree: int = 1, ring_anything: bool = False, ulysses_anything: bool = False,
                         backend: str = "auto", check: str = "once", device_type: str | None = None,
                         components: tuple[str, ...] | None = None, layout: str | None = None,
                         seq_len: int | None = None, batch: int = 1, cfg: bool = False,
                         hardware=None) -> PipelineParallel:
    """Makes a diffusers pipeline run over every rank of the world, unchanged in how it is called: `pipe(...)`
    on every rank returns the same images as the single-process pipeline (within the tolerance of a
    different summation order). A collective: every rank calls it, after init_process_group, with the same
    arguments; cfg_degree * data_degree * ring_degree * ulysses_degree must equal the world size.

    The world becomes a mesh of shape (cfg_degree, data_degree, ring_degree, ulysses_degree), dims
    PIPELINE_MESH_DIMS. Each (cfg, data) replica runs the transformer context-parallel over its
    ring_degree x ulysses_degree ranks (diffusers' hooks split the sequence; attention is cp_attention's ring,
    Ulysses or Unified, any head count); all other components (text encoders, VAE, scheduler) run whole on
    every rank.

    cfg_degree: 1 or 2. With 2, the pipeline's conditional and unconditional transformer passes of each step
        run at once on the two halves of the ranks and the predictions are exchanged once per step
        (pipelines that mark them with cache_context("cond") / ("uncond"): FLUX with true_cfg_scale,
        Qwen-Image, Wan and most others). Every call must then run with guidance on.
    data_degree: replicas that each run a share of every transformer call's batch (several prompts, or
        num_images_per_prompt > 1); the batch must hold at least data_degree elements.
    ring_anything, ulysses_anything: diffusers' modes for sequences that do not split evenly.
    backend, check: the attention kernels and agreement check (see register()).
    device_type: the mesh's device type; default "cuda" under NCCL, else "cpu".
    components: the pipeline's transformer attributes to parallelize; default those of
        TRANSFORMER_COMPONENTS it has (Wan 2.2 has two).
    layout="auto": the degrees (left at 1) are chosen by plan_pipeline(pipe, seq_len, batch=batch, cfg=cfg,
        hardware=hardware): the fastest layout cp_attention.plan predicts for the transformer's attention
        (seq_len: its joint sequence, e.g. 4096 image + 512 text tokens for FLUX at 1024 x 1024; batch:
        prompts x images per prompt; cfg: whether calls will run with guidance).

    Inference only with cfg_degree=2. Not with model CPU offload: a pipeline with offload hooks raises
    ValueError, and so do enable_model_cpu_offload / enable_sequential_cpu_offload afterwards (the offload
    hooks would move every rank's transformer to one device and wrap its forward outside context parallelism).
    Returns a PipelineParallel.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from cp_attention.distributed.context_parallel import _default_device_type

    from ._replicas import Axes, ReplicaForward

    op = f"{_OP}.parallelize_pipeline"
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised; call init_process_group first")
    degrees = dict(cfg_degree=cfg_degree, data_degree=data_degree, ring_degree=ring_degree,
                   ulysses_degree=ulysses_degree)
    chosen = None
    if layout is not None:
        if layout != "auto" or any(v != 1 for v in degrees.values()):
            raise ValueError(f"{op}: layout must be None or 'auto' (with every degree left at 1), got "
                             f"layout={layout!r}, {degrees}")
        if seq_len is None:
            raise ValueError(f"{op}: layout='auto' needs seq_len, the transformer's joint sequence length")
        degrees, chosen = plan_pipeline(pipe, seq_len, batch=batch, cfg=cfg, hardware=hardware,
                                        components=components)
        cfg_degree, data_degree = degrees["cfg_degree"], degrees["data_degree"]
        ring_degree, ulysses_degree = degrees["ring_degree"], degrees["ulysses_degree"]
    for name, value in degrees.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    if cfg_degree > 2:
        raise ValueError(f"{op}: cfg_degree must be 1 or 2 (a conditional and an unconditional pass), "
                         f"got {cfg_degree}")
    world = torch.distributed.get_world_size()
    if math.prod(degrees.values()) != world:
        raise ValueError(f"{op}: cfg_degree * data_degree * ring_degree * ulysses_degree must equal the "
                         f"world size {world}, got {degrees}")
    names = tuple(n for n in (components or TRANSFORMER_COMPONENTS) if getattr(pipe, n, None) is not None)
    if not names:
        raise ValueError(f"{op}: the pipeline has none of the components "
                         f"{components or TRANSFORMER_COMPONENTS}")
    if getattr(pipe, "_all_hooks", None) or any(
            hasattr(m, "_hf_hook") for m in pipe.components.values() if isinstance(m, torch.nn.Module)):
        raise ValueError(f"{op}: {_OFFLOAD_CONFLICT}; create the pipeline without offloading")

    register(backend=backend, check=check)
    mesh = init_device_mesh(device_type or _default_device_type(),
                            (cfg_degree, data_degree, ring_degree, ulysses_degree),
                            mesh_dim_names=PIPELINE_MESH_DIMS)
    axes = Axes(cfg_degree, mesh.get_local_rank("cfg"), mesh.get_group("cfg"),
                data_degree, mesh.get_local_rank("data"), mesh.get_group("data"))
    from diffusers import ContextParallelConfig

    replicas = []
    for name in names:
        transformer = getattr(pipe, name)
        transformer.set_attention_backend(BACKEND_NAME)
        if ring_degree * ulysses_degree > 1:
            enable_parallelism(transformer, ContextParallelConfig(
                ring_degree=ring_degree, ulysses_degree=ulysses_degree, mesh=mesh,
                ring_anything=ring_anything, ulysses_anything=ulysses_anything))
        if cfg_degree * data_degree > 1:
            replica = ReplicaForward(transformer, axes)
            replica.install()
            replicas.append(replica)
    _guard_pipeline(pipe, replicas)
    return PipelineParallel(cfg_degree, data_degree, ring_degree, ulysses_degree, mesh, names, chosen)


def plan_pipeline(pipe, seq_len: int, *, batch: int = 1, cfg: bool = False, hardware=None,
                  components: tuple[str, ...] | None = None) -> tuple[dict, object]:
    """The degrees parallelize_pipeline would take for the fastest layout cp_attention.plan predicts over the
    world (heads and head dim from the first transformer's config), and the Plan: the best plan that
    places Ulysses groups on consecutive ranks (the pipeline's mesh) and whose data split fits the calls
    (with cfg, an even data degree becomes cfg_degree=2; the rest splits the batch, at most `batch`).
    hardware: as cp_attention.plan's (default: the CUDA device's built-in profile)."""
    from cp_attention.planner import default_hardware, plan

    names = [n for n in (components or TRANSFORMER_COMPONENTS) if getattr(pipe, n, None) is not None]
    if not names:
        raise ValueError(f"{_OP}.plan_pipeline: the pipeline has none of the components "
                         f"{components or TRANSFORMER_COMPONENTS}")
    config = getattr(pipe, names[0]).config
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    plans = plan(torch.distributed.get_world_size(), seq_len=seq_len, heads=heads, head_dim=head_dim,
                 batch=batch, cfg=cfg, hardware=default_hardware() if hardware is None else hardware)
    for p in plans:
        cfg_degree = 2 if cfg and p.data_degree % 2 == 0 else 1
        data_degree = p.data_degree // cfg_degree
        if p.placement == "ulysses-inner" and data_degree <= batch:
            return dict(cfg_degree=cfg_degree, data_degree=data_degree, ring_degree=p.ring_degree,
                        ulysses_degree=p.ulysses_degree), p
    raise ValueError(f"{_OP}.plan_pipeline: no layout fits batch={batch}, cfg={cfg}")


_OFFLOAD_CONFLICT = ("model CPU offload and context/CFG/data parallelism do not combine: the offload "
                     "hooks move the transformer to one device for every rank (gpu_id defaults to 0) and "
                     "wrap its forward outside the context-parallel split (diffusers issue #12533); each "
                     "rank keeps its whole transformer on its own device instead")


def _guard_pipeline(pipe, replicas) -> None:
    """Offloading raises from now on; the pipeline's end (maybe_free_model_hooks, which diffusers pipelines
    call last) checks that no conditional call is left without its unconditional partner."""
    def refuse(name):
        def method(*args, **kwargs):
            raise ValueError(f"{_OP}: {name} after parallelize_pipeline: {_OFFLOAD_CONFLICT}")
        return method

    for name in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        setattr(pipe, name, refuse(name))
    if replicas:
        free_hooks = pipe.maybe_free_model_hooks

        def maybe_free_model_hooks(*args, **kwargs):
            for replica in replicas:
                replica.check_done()
            return free_hooks(*args, **kwargs)
        pipe.maybe_free_model_hooks = maybe_free_model_hooks


__all__ = ["BACKEND_NAME", "SUPPORTED_VERSIONS", "TESTED_VERSION", "UnsupportedDiffusers",
           "PIPELINE_MESH_DIMS", "PipelineParallel", "attention_backend", "check_version",
           "enable_parallelism", "from_pretrained", "no_accelerator_workaround", "parallelize_pipeline",
           "plan_pipeline", "register"]
