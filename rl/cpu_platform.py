"""A CPU platform for verl, registered through verl's plugin registry (verl 0.9.1 ships cuda, npu and rocm only).

verl resolves its platform once per process (`verl.plugin.platform.get_platform`), by name from the env
`VERL_PLATFORM`. Every process that imports verl (driver, task runner, FSDP workers, vLLM server and its
workers, reward workers) first imports the modules listed in `VERL_USE_EXTERNAL_MODULES`; the recipe sets
both (`cpu_env()`), so this module registers the "cpu" platform and applies the CPU shims (`rl.cpu_shims`)
in each of them. On a GPU machine the env is not set and nothing here runs.

Written against verl 0.9.1 (`verl/plugin/platform/platform_base.py`: the methods `PlatformCPU` overrides, and the
`VERL_USE_EXTERNAL_MODULES` import in `verl/__init__.py`). Retire when verl ships a CPU platform of its own;
`CPU_PLATFORM` says the same for `rl.cpu_shims.apply_all`'s version check, and its canary is asserted in
tests/rl/test_cpu_shims.py. This module patches nothing of verl's; it only registers a class and installs one
narrow warnings filter (`quiet_optional_engine_warnings`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import types
import warnings
from typing import Any, Optional

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

from rl.cpu_shims import VERL, UpstreamPin

PLATFORM_NAME = "cpu"


def cpu_env() -> dict[str, str]:
    """Environment every process of a CPU run needs (the recipe exports it before Ray starts)."""
    return {
        "VERL_PLATFORM": PLATFORM_NAME,
        "VERL_USE_EXTERNAL_MODULES": __name__,
        # verl registers its FSDP engine for "cuda"/"npu" only; the engine itself is device-agnostic.
        "VERL_ENGINE_DEVICE": "cuda",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB
    }


def _zero(*_args, **_kwargs) -> int:
    return 0


class _CpuDeviceModule(types.ModuleType):
    """`torch.cpu` plus the accelerator helpers verl calls on its device module (cache, memory figures, RNG,
    IPC), as no-ops or host figures."""

    def __init__(self):
        super().__init__("verl_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def synchronize(device=None) -> None:
        return None

    @staticmethod
    def set_device(device) -> None:
        return None

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"

    @staticmethod
    def mem_get_info(device=None) -> tuple[int, int]:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        return avail * page_size, pages * page_size

    memory_allocated = memory_reserved = max_memory_allocated = max_memory_reserved = staticmethod(_zero)

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction, device=None) -> None:
        return None

    @staticmethod
    def get_rng_state(device=None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, device=None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed


_DEVICE_MODULE = _CpuDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """Host CPU as verl's device: gloo collectives, no IPC (weights reach vLLM through shared memory)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME  # never auto-detected

    def current_device(self):
        return "cpu"  # an int would be read as an accelerator index ("cpu:0" devices fail in FSDP2)

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"  # what Ray sets for the declared "GPU" resource; vLLM-CPU ignores it

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # verl's resource pools count "GPU" bundles; Ray is started with num_gpus declared (rl.config).
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False  # verl then sends weights to vLLM through shared memory

    def cudart(self):
        return None


def verl_ships_no_cpu_platform() -> bool:
    """Canary: no platform verl registers itself is named "cpu", and verl has no `platform_cpu` module."""
    builtin_cpu = any(name == PLATFORM_NAME and PlatformRegistry.get(name).__module__.startswith("verl.")
                      for name in PlatformRegistry.registered_names())
    return not builtin_cpu and importlib.util.find_spec("verl.plugin.platform.platform_cpu") is None


CPU_PLATFORM = UpstreamPin(
    name="rl.cpu_platform.PlatformCPU",
    written_against={"verl": VERL},
    retire_when="verl ships a CPU platform of its own (a built-in 'cpu' entry in PlatformRegistry); then drop this "
                "module and the VERL_USE_EXTERNAL_MODULES entry of cpu_env(), keeping the shims' import",
    canary=verl_ships_no_cpu_platform,
)

# verl's engine registry tries every optional training backend at import and warns for each one that is not
# installed, in every process that imports it (task runner, each FSDP worker, the vLLM server...). GenPage uses
# verl's FSDP engine (`strategy=fsdp2`), which is always there; the others are separate installs it never asks
# for, and a config that named one would still fail with verl's own error when the engine is looked up.
OPTIONAL_ENGINES = ("torchtitan", "veomni", "automodel", "mindspeed", "megatron")


def quiet_optional_engine_warnings() -> None:
    """Ignores exactly verl's "<engine> engine is not available" UserWarnings for `OPTIONAL_ENGINES`."""
    warnings.filterwarnings("ignore", message=rf"({'|'.join(OPTIONAL_ENGINES)}) engine is not available: ",
                            category=UserWarning, module=r"verl\.workers\.engine")


if os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME:
    from rl import cpu_shims

    quiet_optional_engine_warnings()
    cpu_shims.apply_all(also=(CPU_PLATFORM,))
