"""policies/, reward_model/ and rl/ reach the simulator only through the environment protocol: importing every
module of theirs loads no simulator module (and no module constant naming a genre, row, language or device)."""

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
SIMULATOR = ("homepage.world", "homepage.behavior", "homepage.users", "homepage.logging_policy", "homepage.catalog",
             "homepage.rewards")


def test_no_stage_package_imports_the_simulator():
    modules = [f"{pkg}.{m.name}" for pkg in ("policies", "reward_model", "rl")
               for m in pkgutil.iter_modules([str(ROOT / pkg)])]
    modules = [m for m in modules if m not in ("rl.cpu_platform", "rl.cpu_shims")]  # verl's CPU plumbing: no data
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('homepage'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = proc.stdout.split()
    assert "homepage.logs" in loaded  # the check saw the imports
    assert not set(loaded) & set(SIMULATOR), loaded
