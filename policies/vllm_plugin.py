"""vLLM plugin (entry point group `vllm.general_plugins`): registers GenPage in every vLLM process.

vLLM loads general plugins in the driver, the engine core and each worker, which is where a custom
architecture must be known (registering only in the driver fails). Also registers the HF config so
vLLM's `AutoConfig` lookup of model_type "genpage" works there, and drops the few vLLM log messages that are
known to be harmless for GenPage (`HARMLESS_MESSAGES`) in each of those processes, including the ones verl's
vLLM server starts inside Ray.
"""

from __future__ import annotations

import logging
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


def register() -> None:
    install_log_filters()
    from vllm import ModelRegistry

    import policies.modeling_genpage  # noqa: F401  (AutoConfig / AutoModel registration)

    if "GenPageForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("GenPageForCausalLM", "policies.vllm_genpage:GenPageForCausalLMVllm")
