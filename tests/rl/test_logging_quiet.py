"""A run's console shows progress and results: the few upstream messages known to be harmless for GenPage are
dropped (policies/vllm_plugin.py for vLLM's logs, rl/cpu_platform.py for verl's optional-engine warnings), exactly
those and nothing else, and the filtered texts are still the ones upstream emits."""

import logging
import os
import subprocess
import sys
import textwrap
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


RELOAD_SCRIPT = textwrap.dedent('''
    """A tiny GenPage engine whose weights are reloaded twice the way rl.cpu_shims.layerwise_weight_reload does."""
    import json, sys
    import numpy as np, torch

    def reload(worker, state_path, quiet):
        import logging
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
        from policies.vllm_plugin import DropHarmlessMessage

        lg = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        ours = [f for f in lg.filters if isinstance(f, DropHarmlessMessage)]
        seen = []
        handler = logging.Handler()
        handler.emit = lambda r: seen.append(r.getMessage())
        lg.addHandler(handler)
        if not quiet:  # the control: this process's filter off, and nothing printed
            for f in ours:
                lg.removeFilter(f)
            lg.propagate = False
        model, cfg = worker.model_runner.model, worker.model_runner.vllm_config
        state = torch.load(state_path)
        with set_current_vllm_config(cfg):
            initialize_layerwise_reload(model)
            model.load_weights([(k, v.clone()) for k, v in state.items()])
            finalize_layerwise_reload(model, cfg.model_config)
        lg.removeHandler(handler)
        for f in ours:
            if f not in lg.filters:
                lg.addFilter(f)
        lg.propagate = True
        return {"filter_installed": bool(ours), "seen": seen}

    if __name__ == "__main__":
        from policies import vllm_engine
        from policies.build import ModelSize, build_model
        from tests.toy import toy_tokenizer

        out = sys.argv[1]
        ents = [f"{t}_{i:04d}" for i, t in enumerate(["movie", "show", "game"] * 20)]
        tok = toy_tokenizer(ents)
        rng = np.random.default_rng(0)
        size = ModelSize(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
        model = build_model(tok, {e: rng.normal(size=8).astype(np.float32) for e in ents}, size)
        model.eval().save_pretrained(out + "/model")
        tok.save_pretrained(out + "/model")
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out + "/state.pt")
        llm = vllm_engine.make_llm(out + "/model", seed=0)
        seqs = [list(range(5, 40))]
        before = vllm_engine.sequence_logprobs(llm, seqs)[0]
        control = llm.collective_rpc(reload, args=(out + "/state.pt", False))[0]
        quiet = llm.collective_rpc(reload, args=(out + "/state.pt", True))[0]
        after = vllm_engine.sequence_logprobs(llm, seqs)[0]
        print("RESULT " + json.dumps({"control": control, "quiet": quiet,
                                      "logprob_diff": float(np.abs(np.array(before) - np.array(after)).max())}),
              flush=True)
        # An explicit shutdown: left to interpreter exit, the engine's teardown can abort the process
        # ("terminate called without an active exception", exit -6) after the result is printed.
        llm.llm_engine.engine_core.shutdown()
''')


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_weight_syncs_and_offline_engines_print_none_of_the_harmless_messages(tmp_path):
    """One engine (about 30 s): the plugin's filter is installed in the vLLM worker; a layerwise reload there with
    the filter off logs "RotaryEmbedding: Failed to load weights" once, with it on nothing reaches the console;
    log-probs after the reloads are unchanged (the rotary cache really is kept); no chat-warmup traceback."""
    import json

    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    # collective_rpc with a function needs pickle; PYTHONPATH for tests.toy
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    console = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("RESULT "))
    assert result["control"] == {"filter_installed": True, "seen": ["RotaryEmbedding: Failed to load weights"]}
    assert result["quiet"] == {"filter_installed": True, "seen": []}
    assert result["logprob_diff"] < 1e-6
    assert "Failed to load weights" not in console and "Chat template warmup failed" not in console
