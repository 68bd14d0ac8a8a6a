"""Checkpoints (common/training.py): complete or absent, data only, and a resume restores every RNG."""

import os
import random
import shutil

import numpy as np
import pytest
import torch

from common.training import TRAINER_STATE, latest_checkpoint, load_trainer_state, save_checkpoint


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)

    def save_pretrained(self, path):
        os.makedirs(path)
        torch.save(self.state_dict(), os.path.join(path, "weights.pt"))


def trained():
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_resume_restores_optimizer_and_every_rng(tmp_path):
    model, optimizer = trained()
    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    save_checkpoint(tmp_path, 10, model, optimizer, {"history": [{"step": 10, "loss": 0.5}], "ema": {"w": torch.ones(2)}})
    after_save = (np.random.rand(), np.random.randn(), random.random(), torch.rand(1).item())
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    step, extra = load_trainer_state(latest_checkpoint(tmp_path), fresh)
    assert step == 10 and extra["history"] == [{"step": 10, "loss": 0.5}] and torch.equal(extra["ema"]["w"], torch.ones(2))
    assert (np.random.rand(), np.random.randn(), random.random(), torch.rand(1).item()) == after_save
    state = optimizer.state_dict()["state"][0]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], state["exp_avg"])


def test_a_checkpoint_cut_mid_write_is_ignored_on_resume(tmp_path):
    model, optimizer = trained()
    save_checkpoint(tmp_path, 10, model, optimizer, {})
    save_checkpoint(tmp_path, 20, model, optimizer, {})
    # What a kill during the write of step 30 leaves: the temporary directory, without its trainer state; and a
    # step directory someone copied by hand without one.
    (tmp_path / ".tmp_step_30").mkdir()
    (tmp_path / ".tmp_step_30" / "weights.pt").write_bytes(b"\x80half")
    shutil.copytree(tmp_path / "step_20", tmp_path / "step_40")
    (tmp_path / "step_40" / TRAINER_STATE).unlink()
    assert latest_checkpoint(tmp_path).name == "step_20"
    save_checkpoint(tmp_path, 30, model, optimizer, {})  # the next save replaces the leftover
    assert latest_checkpoint(tmp_path).name == "step_30" and not (tmp_path / ".tmp_step_30").exists()


def test_trainer_state_that_would_run_code_is_refused(tmp_path):
    model, optimizer = trained()
    path = save_checkpoint(tmp_path, 10, model, optimizer, {})
    state = torch.load(path / TRAINER_STATE, weights_only=True)
    state["extra"] = {"payload": os.system}  # unpickling this calls into os: weights_only refuses it
    torch.save(state, path / TRAINER_STATE)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_trainer_state(path, optimizer)
