"""The reaper (common/processes.py): when a recipe is killed outright, what it started goes too, and the
shared memory of its run is removed."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.recipes.helpers import alive

psutil = pytest.importorskip("psutil")
ROOT = Path(__file__).parents[2]

RECIPE = """
import subprocess, sys, time
from common.processes import start_reaper
start_reaper()
# a child with a grandchild, and a child holding a shared-memory segment open, as vLLM's engine core does
tree = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"])
holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'wb'); f.write(b'x'); "
                           "f.flush(); time.sleep(300)", sys.argv[1]])
# a daemon (double fork, as servers detach): reparented to init at once, never a descendant the reaper can see
subprocess.run([sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(300)'], start_new_session=True).pid)"], stdout=open(sys.argv[2], "w"))
while len(__import__("psutil").Process().children(recursive=True)) < 4:  # reaper, tree, its child, holder
    time.sleep(0.05)
time.sleep(1.0)  # at least one poll of the reaper
print("ready", flush=True)
time.sleep(300)
"""


def test_a_killed_recipe_takes_its_process_tree_its_daemons_and_its_shm_along(tmp_path):
    shm = Path("/dev/shm") / f"psm_test_{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", RECIPE, str(shm), str(tmp_path / "daemon.pid")], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    descendants = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        descendants = psutil.Process(proc.pid).children(recursive=True)
        work = [p for p in descendants if "common.processes" not in " ".join(p.cmdline())]
        assert len(work) == 3 and shm.exists()
        daemon = psutil.Process(int((tmp_path / "daemon.pid").read_text()))
        assert daemon.ppid() != proc.pid and daemon not in descendants
        descendants.append(daemon)
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs, no atexit
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and (any(alive(p) for p in descendants) or shm.exists()):
            time.sleep(0.2)
        assert not [p for p in descendants if alive(p)], "processes outlived the killed recipe"
        assert not shm.exists(), "the run's shared-memory segment was left behind"
    finally:
        proc.kill()
        for p in descendants:  # never leave them running, even when an assertion failed
            if alive(p):
                p.kill()
        shm.unlink(missing_ok=True)


def test_the_reaper_leaves_a_finished_recipe_alone_and_exits():
    proc = subprocess.run([sys.executable, "-c", "from common.processes import start_reaper; print(start_reaper().pid)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    reaper = int(proc.stdout.strip())
    deadline = time.time() + 10
    while time.time() < deadline and psutil.pid_exists(reaper) and alive(psutil.Process(reaper)):
        time.sleep(0.1)
    assert not (psutil.pid_exists(reaper) and alive(psutil.Process(reaper)))
