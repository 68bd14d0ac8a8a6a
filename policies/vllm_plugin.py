"""vLLM plugin (entry point group `vllm.general_plugins`): registers GenPage in every vLLM process.

vLLM loads general plugins in the driver, the engine core and each worker, which is where a custom
architecture must be known (registering only in the driver fails). Also registers the HF config so
vLLM's `AutoConfig` lookup of model_type "genpage" works there, and drops the few vLLM log messages that are
known to be harmless for GenPage (`HARMLESS_MESSAGES`) in each of those processes, including the ones verl's
vLLM server starts inside Ray, and on CPU lets a run bound how long vLLM's processes spin waiting for each
other (`bound_shm_spin`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class HarmlessMessage:
    """One vLLM log message that says nothing actionable for GenPage.

    logger: the vLLM logger that emits it (its module's `init_logger(__name__)`).
    msg: the format string vLLM passes to the logger, compared exactly.
    matches: (record) -> bool, the narrower condition (arguments, exception) under which it is harmless."""

    logger: str
    msg: str
    matches: Callable[[logging.LogRecord], bool]


def _rotary_embedding(record: logging.LogRecord) -> bool:
    return record.args == ("RotaryEmbedding",)


def _no_tokenizer(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return isinstance(exc, ValueError) and "skip_tokenizer_init=True" in str(exc)


HARMLESS_MESSAGES = (
    # Once per weight sync, i.e. every Dr. GRPO step: the CPU shim reloads verl's weights through vLLM's layerwise
    # reload (rl.cpu_shims.layerwise_weight_reload), whose finalize step warns for every layer that holds tensors
    # but received none. The rotary embedding's only tensor is its non-persistent `cos_sin_cache` buffer, computed
    # from rope_theta and max_position when the model is built; no checkpoint and no verl update carries it, and
    # finalize puts the existing cache back (`_place_kernel_tensors`), so log-probs are unchanged. Any other layer
    # failing to load still warns.
    HarmlessMessage("vllm.model_executor.model_loader.reload.layerwise", "%s: Failed to load weights",
                    _rotary_embedding),
    # Once per offline engine (policies.vllm_engine.make_llm, as a 15-line traceback): vLLM warms up chat-template
    # rendering, which needs a tokenizer, and make_llm starts engines with skip_tokenizer_init=True because GenPage
    # prompts are token ids. Nothing renders chat there. The same warning for any other cause still shows.
    HarmlessMessage("vllm.renderers.base", "Chat template warmup failed", _no_tokenizer),
)


class DropHarmlessMessage(logging.Filter):
    """Drops the records of one `HarmlessMessage`; passes every other record of its logger."""

    def __init__(self, message: HarmlessMessage):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == self.message.msg and self.message.matches(record))


def install_log_filters() -> None:
    """Adds a `DropHarmlessMessage` to each message's logger (idempotent: vLLM may load plugins more than once)."""
    for message in HARMLESS_MESSAGES:
        target = logging.getLogger(message.logger)
        if not any(isinstance(f, DropHarmlessMessage) and f.message == message for f in target.filters):
            target.addFilter(DropHarmlessMessage(message))


SHM_SPIN_ENV = "GENPAGE_VLLM_SHM_SPIN_S"


def shm_spin_s() -> float | None:
    """How long, after each message, a vLLM process waiting on its shared-memory queue keeps spinning before it
    blocks until the writer's notification: `GENPAGE_VLLM_SHM_SPIN_S` seconds; None (vLLM's own 1 s) when unset."""
    value = os.environ.get(SHM_SPIN_ENV, "")
    return float(value) if value else None


def bound_shm_spin() -> None:
    """vLLM's engine core and its model worker (separate processes: on CPU vLLM always uses the multiprocessing
    executor) pass each step through a shared-memory queue whose readers spin (`sched_yield` in a loop) for 1 s
    after every message before they block on the writer's zmq notification (`SpinCondition`, vllm 0.30; vLLM has
    no setting for it). With an idle core to spin on, that buys latency. Under verl on a small CPU machine there
    is none: while the worker computes a decode step the engine core spins, and between steps the worker does,
    taking CPU from the agent loop, the reward worker and each other. With `GENPAGE_VLLM_SHM_SPIN_S` set (the
    Dr. GRPO recipe sets 0 on CPU), a reader spins at most that long and then blocks; the writer notifies after
    every write and zmq keeps the notification, so no wake-up is lost. Unset, vLLM's behaviour is unchanged
    (offline engines, latency benchmarks). Measurements in docs/benchmarks.md."""
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    if getattr(cls.wait, "_genpage_bounded", False):
        return
    original = cls.wait

    def wait(self, timeout_ms=None):
        # Once per reader, at its first wait (also bounds queues made before the plugin loaded): wait runs in
        # vLLM's spin loop, so the setting is not read again on every call.
        if self.is_reader and not getattr(self, "_genpage_bounded", False):
            limit = shm_spin_s()
            if limit is not None:
                self.busy_loop_s = min(self.busy_loop_s, limit)
            self._genpage_bounded = True
        return original(self, timeout_ms)

    wait._genpage_bounded = True
    cls.wait = wait


def register() -> None:
    install_log_filters()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        bound_shm_spin()

    from vllm import ModelRegistry

    import policies.modeling_genpage  # noqa: F401  (AutoConfig / AutoModel registration)

    if "GenPageForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("GenPageForCausalLM", "policies.vllm_genpage:GenPageForCausalLMVllm")
