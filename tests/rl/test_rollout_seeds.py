"""rl/rollout_seeds.py: one sampling seed per page, from (run seed, step, prompt, copy), set on every request."""

import asyncio

import pytest

pytest.importorskip("verl")

from verl.experimental.agent_loop.agent_loop import AgentLoopWorker  # noqa: E402

from rl.rollout_seeds import SEED_BITS, SeededAgentLoopWorker, request_seed  # noqa: E402


def test_a_pages_seed_depends_on_each_coordinate_and_only_on_them():
    base = dict(seed=0, step=3, index=17, copy=2, validate=False)
    seeds = {request_seed(**base)}
    for key, other in (("seed", 1), ("step", 4), ("index", 18), ("copy", 3), ("validate", True)):
        seeds.add(request_seed(**{**base, key: other}))
    assert len(seeds) == 6  # every coordinate changes the seed
    assert request_seed(**base) == request_seed(**base)  # and nothing else does (no process state)
    # the copies of one prompt get different seeds, so a group's pages differ
    assert len({request_seed(0, 1, 5, c, False) for c in range(64)}) == 64
    assert all(0 <= request_seed(s, 1, i, 0, False) < 2 ** SEED_BITS for s in range(3) for i in range(100))


def test_the_worker_sets_the_seed_on_each_request_and_follows_the_run_seed(monkeypatch):
    seen = []

    async def verls_loop(self, sampling_params, trajectory, **kwargs):  # what verl's agent loop would receive
        seen.append(sampling_params)
        return "out"

    monkeypatch.setattr(AgentLoopWorker, "_run_agent_loop", verls_loop)
    worker = object.__new__(SeededAgentLoopWorker)  # no Ray, no servers: only the seeding is under test
    worker.set_run_seed(7)
    given = {"temperature": 1.0}
    traj = {"step": 2, "sample_index": 11, "rollout_n": 1, "validate": False}
    assert asyncio.run(worker._run_agent_loop(given, traj, agent_name="single_turn_agent")) == "out"
    assert seen[-1] == {"temperature": 1.0, "seed": request_seed(7, 2, 11, 1, False)}
    assert given == {"temperature": 1.0}  # the shared parameters are not changed for the other requests
    worker.set_run_seed(8)
    asyncio.run(worker._run_agent_loop(given, traj, agent_name="single_turn_agent"))
    assert seen[-1]["seed"] == request_seed(8, 2, 11, 1, False)
