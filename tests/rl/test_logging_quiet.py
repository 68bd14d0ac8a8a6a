"""A run's console shows progress and results: the few upstream messages known to be harmless for GenPage are
dropped (policies/vllm_plugin.py for vLLM's logs, rl/cpu_platform.py for verl's optional-engine warnings), exactly
those and nothing else, and the filtered texts are still the ones upstream emits. That a real run's console holds
none of them, weight syncs included, and that its log-probs survive the syncs, is checked on the Dr. GRPO smoke
run (tests/recipes/test_dr_grpo.py)."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from policies.vllm_plugin import HARMLESS_MESSAGES, DropHarmlessMessage, install_log_filters

ROOT = Path(__file__).parents[2]
LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"
RENDERER = "vllm.renderers.base"


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def no_tokenizer_error():
    try:
        raise ValueError("Tokenizer not available when `skip_tokenizer_init=True`")
    except ValueError:
        return sys.exc_info()


def other_error():
    try:
        raise RuntimeError("template has a syntax error")
    except RuntimeError:
        return sys.exc_info()


def test_the_plugin_filters_drop_exactly_the_harmless_vllm_messages():
    install_log_filters()
    install_log_filters()  # vLLM may load plugins twice in one process
    loggers = [logging.getLogger(LAYERWISE), logging.getLogger(RENDERER)]
    assert [sum(isinstance(f, DropHarmlessMessage) for f in lg.filters) for lg in loggers] == [1, 1]
    collect = Collect()
    for lg in loggers:
        lg.addHandler(collect)
    try:
        layerwise, renderer = loggers
        layerwise.warning("%s: Failed to load weights", "RotaryEmbedding")  # dropped
        layerwise.warning("%s: Failed to load weights", "GenPageVllmModel")  # a real layer: kept
        layerwise.warning("%s: Excessive loading", "RotaryEmbedding")  # another message: kept
        renderer.warning("Chat template warmup failed", exc_info=no_tokenizer_error())  # dropped
        renderer.warning("Chat template warmup failed", exc_info=other_error())  # another cause: kept
        renderer.warning("Chat template warmup failed")  # no cause: kept
        logging.getLogger("vllm.other").warning("%s: Failed to load weights", "RotaryEmbedding")  # other logger
    finally:
        for lg in loggers:
            lg.removeHandler(collect)
    assert collect.records == ["GenPageVllmModel: Failed to load weights", "RotaryEmbedding: Excessive loading",
                               "Chat template warmup failed", "Chat template warmup failed"]


def test_the_filtered_messages_are_the_ones_vllm_logs_and_the_rotary_cache_is_computed():
    """Each filter's logger is a vLLM module's `init_logger(__name__)` and logs that exact format string; the
    rotary embedding's cache is a non-persistent buffer (never in a checkpoint); offline engines start without a
    tokenizer. Fails when vLLM changes a message (the filter would go stale)."""
    from rl.cpu_shims import upstream_source

    for message in HARMLESS_MESSAGES:
        package, _, module = message.logger.partition(".")
        source = upstream_source(package, module.replace(".", "/") + ".py")
        assert "logger = init_logger(__name__)" in source, message.logger
        assert f'logger.warning("{message.msg}"' in source, message.msg
    assert 'register_buffer("cos_sin_cache", cache, persistent=False)' in upstream_source(
        "vllm", "model_executor/layers/rotary_embedding/base.py")
    assert "Tokenizer not available when `skip_tokenizer_init=True`" in upstream_source("vllm", "renderers/base.py")
    assert "skip_tokenizer_init=True" in (ROOT / "policies" / "vllm_engine.py").read_text()


def test_verls_optional_engine_warnings_are_ignored_and_other_warnings_are_not():
    pytest.importorskip("verl")
    from rl.cpu_platform import OPTIONAL_ENGINES, quiet_optional_engine_warnings
    from rl.cpu_shims import upstream_source

    source = upstream_source("verl", "workers/engine/__init__.py")
    for engine in OPTIONAL_ENGINES:  # the text verl 0.9.1 warns with
        assert f'warnings.warn(f"{engine} engine is not available: {{e!r}}"' in source, engine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_optional_engine_warnings()
        shown = [
            ("megatron engine is not available: ModuleNotFoundError('megatron')", "verl.workers.engine"),
            ("fsdp engine is not available: ImportError('x')", "verl.workers.engine"),  # the engine GenPage uses: kept
            ("megatron engine is not available: ...", "policies.elsewhere"),  # someone else's: kept
        ]
        for text, module in shown:
            warnings.warn_explicit(text, UserWarning, "__init__.py", 1, module=module)
        warnings.warn_explicit("veomni engine is not available: x", DeprecationWarning, "__init__.py", 1,
                               module="verl.workers.engine")  # another category: kept
    assert [str(w.message) for w in caught] == [shown[1][0], shown[2][0], "veomni engine is not available: x"]


def test_a_cpu_platform_process_imports_verls_engines_without_their_warnings():
    """What each verl process of a CPU run does first: import rl.cpu_platform (VERL_USE_EXTERNAL_MODULES), then
    verl's engine registry. No engine starts."""
    pytest.importorskip("verl")
    env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "rl.cpu_platform"}
    proc = subprocess.run([sys.executable, "-W", "default", "-c", "import verl.workers.engine"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "engine is not available" not in proc.stderr
    assert "UpstreamVersionWarning" not in proc.stderr  # the pinned versions are installed
