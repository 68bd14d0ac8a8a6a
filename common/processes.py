"""The processes and shared memory a recipe leaves behind, and a reaper that removes them when the recipe dies
without cleaning up (kill -9, the out-of-memory killer).

A recipe that starts engines has descendants: Ray's GCS and raylet with their workers, vLLM engine cores, the
reward model's training processes. A clean exit stops them (`terminate_children`, rl/runtime.py `RunGuard`);
a SIGKILL gives the recipe no chance to, and its descendants would keep running, holding memory, cores and
`/dev/shm` segments (vLLM's message queues, verl's weight buckets: hundreds of MB each). `start_reaper` marks the
run with a token in the environment every later process inherits (RUN_TOKEN) and starts a small watcher in its
own session: while the recipe lives it records the recipe's descendants; once the recipe is gone it stops every
recorded process still alive, their children and every process carrying the token (one spawned just before the
kill is an orphan the records never saw), then removes the shared-memory segments that appeared during the run
and that no live process maps.

    python -m common.processes <pid>     # what start_reaper runs
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_GLOBS = ("psm_*", "verl_weights_*")  # vLLM's message queues; verl's weight-transfer buckets (2 GiB, sparse)
POLL_S = 0.5  # how often the reaper records the recipe's descendants


def shm_segments() -> set[str]:
    return {str(p) for g in SHM_GLOBS for p in SHM_DIR.glob(g)}


def mapped_shm_paths() -> set[str]:
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
    """Segments (SHM_GLOBS) created since `before` (a set of paths) that no live process uses."""
    held = mapped_shm_paths()
    return [Path(p) for p in sorted(shm_segments() - before) if p not in held]


def remove_leftover_shm(before: set[str], attempts: int = 3) -> int:
    """Unlinks leftover_shm(before), retrying while exiting processes release their mappings. -> files removed."""
    removed = 0
    for _ in range(attempts):
        for p in leftover_shm(before):
            try:
                p.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if not leftover_shm(before):
            break
        time.sleep(1.0)
    return removed


def stop_processes(procs: list, timeout_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`, to `procs` (psutil.Process). -> how many there were."""
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def terminate_children(timeout_s: float = 10.0, keep: frozenset[int] = frozenset()) -> int:
    """Stops every descendant of this process but the pids in `keep`. -> how many there were."""
    import psutil

    return stop_processes([c for c in psutil.Process().children(recursive=True) if c.pid not in keep], timeout_s)


RUN_TOKEN = "GENPAGE_RUN_TOKEN"  # environment variable every process of a run inherits; the reaper finds them by it
_reaper: subprocess.Popen | None = None


def start_reaper() -> subprocess.Popen:
    """Starts the reaper of this process (see the module docstring), once; it exits on its own after this one."""
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        os.environ.setdefault(RUN_TOKEN, f"{os.getpid()}-{uuid.uuid4().hex}")  # before any engine starts
        _reaper = subprocess.Popen([sys.executable, "-m", "common.processes", str(os.getpid()), os.environ[RUN_TOKEN]],
                                   cwd=Path(__file__).parents[1], start_new_session=True, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        _reaper.stdout.readline()  # "watching": from here on every process this one starts is recorded
        _reaper.stdout.close()
    return _reaper


def processes_of_run(token: str, exclude: frozenset[int]) -> list:
    """Live processes whose environment carries RUN_TOKEN=token: every descendant of the run, including those
    orphaned before the reaper saw them (a child spawned just before the kill is reparented to init)."""
    import psutil

    needle = f"{RUN_TOKEN}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in exclude:
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(psutil.Process(int(proc.name)))
        except (OSError, psutil.NoSuchProcess):
            continue
    return found


def reap(pid: int, token: str | None = None) -> int:
    """Watches `pid` until it is gone, then stops what it left running and removes its shm. -> processes stopped.
    token: the run's RUN_TOKEN, to find descendants that were orphaned between two polls."""
    import psutil

    before = shm_segments()
    me = os.getpid()
    try:
        target = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, float] = {}  # pid -> create_time (a pid can be reused once its process is gone)
    first = True
    while True:
        try:
            if target.status() == psutil.STATUS_ZOMBIE:
                break
            for c in target.children(recursive=True):
                if c.pid != me:
                    known[c.pid] = c.create_time()
        except psutil.NoSuchProcess:
            break
        if first:
            print("watching", flush=True)
            first = False
        time.sleep(POLL_S)
    left = []
    for p, created in known.items():
        try:
            proc = psutil.Process(p)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            continue
    closure = {p.pid: p for p in left}
    if token:
        closure.update({p.pid: p for p in processes_of_run(token, frozenset({me, pid}))})
    for p in list(closure.values()):  # children born after the last poll belong to a recorded process
        try:
            closure.update({c.pid: c for c in p.children(recursive=True) if c.pid != me})
        except psutil.NoSuchProcess:
            continue
    stopped = stop_processes(list(closure.values()), timeout_s=5.0) if closure else 0
    remove_leftover_shm(before)
    return stopped


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)


def release_freed_memory() -> None:
    """Hands Arrow's freed blocks back to the OS. Its allocator (mimalloc) keeps them after a table is dropped, so a
    process that copied log rows would hold their memory until it ends (docs/scale.md has the measurements)."""
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
