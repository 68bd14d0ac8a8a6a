"""What the recipe tests share: a tiny world and model, a reward model without training, killing a recipe outright
at a chosen point, and telling what outlived it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# A world and a model small enough for a recipe test: make_world and pretrain in seconds.
TINY_WORLD = ["world.n_entities=60", "world.n_users=80", "world.n_impressions=1200", "world.batch_size=400"]
TINY_PRETRAIN = ["model.hidden_size=64", "model.num_hidden_layers=1", "model.num_attention_heads=1",
                 "model.intermediate_size=128", "batch_size=16", "eval_sequences=64", "eval_users=8",
                 "eval_backend=hf", "max_new_tokens=40", "wandb_mode=disabled", "num_threads=1",
                 "cold_start_titles=0", "lr=0.01"]
TINY_MODEL = [*TINY_PRETRAIN, "steps=20", "eval_interval=20", "checkpoint_interval=20"]
# Dr. GRPO at smoke size. Training prompts sampled by the world's environment here; tests/recipes/test_foreign_dataset.py
# covers logged ones; token credit: tests/recipes/test_dr_grpo.py's ensemble test. Seeded per page, so a 2-rank run
# samples the same step-1 pages (test_dr_grpo.py's data-parallel test).
TINY_RL = ["steps=2", "seeds=[0,1]", "prompts_per_step=4", "group_size=4", "eval_users=8", "save_freq=1", "lr=0.01",
           "wandb_mode=offline", "prompt_source=environment", "credit=page", "rollout_seeding=request"]
ROOT = Path(__file__).parents[2]


def run_recipe(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """recipes/<script> with `args` as a subprocess of the repository root; asserts it succeeds."""
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def alive(proc) -> bool:
    """A psutil.Process still running (an orphan that exited stays a zombie until init reaps it)."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay_s: float, timeout_s: float = 600) -> list:
    """SIGKILL to `proc` alone (no handler, no atexit runs), `delay_s` after ready() first holds. -> its
    descendants (psutil.Process) just before the kill, to check none outlives it."""
    import psutil

    deadline = time.time() + timeout_s
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready(), "the run never reached the point to kill it at"
    time.sleep(delay_s)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return descendants


def outliving(descendants: list, timeout_s: float = 30.0) -> list[str]:
    """The command lines of `descendants` still running after `timeout_s`; kills them (never leave them)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(alive(p) for p in descendants):
        time.sleep(0.2)
    left = [p for p in descendants if alive(p)]
    names = []
    for p in left:
        try:
            names.append(" ".join(p.cmdline())[:100])
            p.kill()
        except Exception:  # gone in between
            pass
    return names


def untrained_reward_model(policy_dir: Path, out: Path, seed: int = 0, flat: bool = False, head: str | None = None) -> Path:
    """A reward-model directory (backbone of the tiny policy, a fresh head drawn with `seed`: GenPageConfig's
    default entity_sum, so it has per-token rewards): enough to exercise the plumbing. flat: a zero head, so every
    page scores the same (a validator that never improves); head: another read-out (policies.reward_heads)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import policies  # noqa: F401
    from policies.modeling_genpage import GenPageForPageReward
    from policies.tokenizer import GenPageTokenizer

    config = AutoConfig.from_pretrained(policy_dir)
    config.architectures = ["GenPageForPageReward"]
    if head is not None:
        config.reward_head = head
    torch.manual_seed(seed)
    rm = GenPageForPageReward(config)
    rm.model.load_state_dict(AutoModelForCausalLM.from_pretrained(policy_dir).model.state_dict())
    if flat:
        with torch.no_grad():
            for p in rm.score.parameters():
                p.zero_()
    rm.save_pretrained(out)
    GenPageTokenizer.from_pretrained(policy_dir).save_pretrained(out)
    return out
