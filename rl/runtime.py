"""Clean start and shutdown of a verl run: environment, Ray, leftover processes and shared memory.

`RunGuard` is a context manager around everything that starts Ray / vLLM. On exit, normal or not (an
exception, Ctrl-C, SIGTERM), it shuts Ray down, terminates any process this one started that is still alive
(Ray's raylet and GCS, vLLM engine cores and workers), and removes the `/dev/shm/psm_*` and `/dev/shm/verl_weights_*` segments
that appeared during the run and are no longer mapped by any live process (vLLM's shared-memory message queues
and verl's weight-transfer buckets stay behind when their owners are killed, hundreds of MB each: docs/cpu.md).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_GLOBS = ("psm_*", "verl_weights_*")  # vLLM's message queues; verl's weight-transfer buckets (2 GiB, sparse)


def _mapped_shm_paths() -> set[str]:
    """Shared-memory files mapped or held open by any live process (readable /proc entries only)."""
    held: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    held.add(line.split(None, 5)[-1].split(" (deleted)")[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    held.add(target)
        except (OSError, PermissionError):
            continue
    return held


def leftover_shm(before: set[str]) -> list[Path]:
    """psm_* segments created since `before` (a set of paths) that no live process uses."""
    held = _mapped_shm_paths()
    return [p for g in SHM_GLOBS for p in SHM_DIR.glob(g) if str(p) not in before and str(p) not in held]


class RunGuard:
    """`with RunGuard(): ...` shuts Ray and every child process down and removes this run's shm files."""

    def __init__(self, log=print):
        self.log = log
        self._before: set[str] = set()
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> "RunGuard":
        self._before = {str(p) for g in SHM_GLOBS for p in SHM_DIR.glob(g)}
        self.install_signal_handlers()
        return self

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGHUP -> KeyboardInterrupt (the Ctrl-C path). Call again after `ray.init`, which installs
        its own SIGTERM handler in the driver (it aborts the process)."""
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.signal(sig, self._raise_interrupt)
            self._old_handlers.setdefault(sig, previous)

    @staticmethod
    def _raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        # Ctrl-C during cleanup must not leave it half done.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.shutdown()
        finally:
            signal.signal(signal.SIGINT, previous)

    def shutdown(self) -> None:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception as e:  # keep cleaning up
            self.log(f"[cleanup] ray.shutdown failed: {e}")
        stopped = terminate_children()
        if stopped:
            self.log(f"[cleanup] stopped {stopped} leftover process(es)")
        removed = 0
        for _ in range(3):  # processes release their mappings as they exit
            for p in leftover_shm(self._before):
                try:
                    p.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
            if not leftover_shm(self._before):
                break
            time.sleep(1.0)
        if removed:
            self.log(f"[cleanup] removed {removed} leftover shared-memory file(s) of this run")


def init_ray(config) -> None:
    """`ray.init` exactly as verl's `run_ppo` does it (verl's runtime env merged with `ray_kwargs.ray_init`),
    so the caller can re-install its signal handlers before verl starts (run_ppo skips an initialized Ray)."""
    import ray
    from omegaconf import OmegaConf
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    ray_init = config.ray_kwargs.get("ray_init", {})
    runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(config), ray_init.get("runtime_env", {}))
    ray.init(**OmegaConf.to_container(OmegaConf.create({**ray_init, "runtime_env": runtime_env})))


def terminate_children(timeout_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`, to every descendant of this process. -> how many there were."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for c in children:
        try:
            c.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for c in alive:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    return len(children)
