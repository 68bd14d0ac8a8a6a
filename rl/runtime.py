"""Clean start and shutdown of a verl run: environment, Ray, leftover processes and shared memory.

`RunGuard` is a context manager around everything that starts Ray / vLLM. On exit, normal or not (an
exception, Ctrl-C, SIGTERM), it shuts Ray down, terminates any process this one started that is still alive
(Ray's raylet and GCS, vLLM engine cores and workers), and removes the `/dev/shm/psm_*` and `/dev/shm/verl_weights_*` segments
that appeared during the run and are no longer mapped by any live process (vLLM's shared-memory message queues
and verl's weight-transfer buckets stay behind when their owners are killed, hundreds of MB each: docs/cpu.md).
"""

from __future__ import annotations

import signal

from common.processes import remove_leftover_shm, shm_segments, start_reaper, terminate_children


class RunGuard:
    """`with RunGuard(): ...` shuts Ray and every child process down and removes this run's shm files."""

    def __init__(self, log=print):
        self.log = log
        self._before: set[str] = set()
        self._reaper = None
        self._old_handlers: dict[int, object] = {}

    def __enter__(self) -> "RunGuard":
        self._before = shm_segments()
        self._reaper = start_reaper()  # the same cleanup, should this process be killed outright
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
        stopped = terminate_children(keep=frozenset({self._reaper.pid} if self._reaper else ()))
        if stopped:
            self.log(f"[cleanup] stopped {stopped} leftover process(es)")
        removed = remove_leftover_shm(self._before)
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
