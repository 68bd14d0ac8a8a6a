"""Rollouts that do not depend on how many vLLM replicas serve them: each page is sampled with its own seed.

verl's rollout seeds each vLLM engine once (`rollout.seed` + the replica's rank), so which pages a step samples
depends on how its requests were spread over replicas and on every request the engine served before (a
validation pass included). With `rollout_seeding=request` (rl.config) every sampled page gets its own vLLM
`SamplingParams.seed`, a function of the run's seed, the trainer step, the prompt's dataset index and the copy
within its group: a step samples the same pages on 1 rank or 8, and a resumed run samples what the uninterrupted
one would have. That is what lets the data-parallel run be checked against one rank
(tests/recipes/test_data_parallel.py).

Installed through verl's own extension point, `rollout.agent.agent_loop_manager_class`: the manager below starts
`SeededAgentLoopWorker`s, which add the seed to each request's sampling parameters before verl's agent loop
runs; vLLM's async server keeps a seed that is already set (it only sets one under `full_determinism`, and there
the same one for every request of a replica, so every copy of a group would be the same page).
"""

from __future__ import annotations

import hashlib
from typing import Any

import ray
from verl.experimental.agent_loop.agent_loop import AgentLoopManager, AgentLoopWorker

SEED_BITS = 31  # vLLM takes any int; a 31-bit seed is valid for every torch generator


def request_seed(seed: int, step: int, index: int, copy: int, validate: bool) -> int:
    """The sampling seed of one page: copy `copy` of the prompt with dataset index `index` at trainer step
    `step` of the run seeded `seed` (validation pages draw from their own stream). A hash, not a sum, so
    neighbouring (step, index, copy) triples do not share seeds."""
    key = f"{seed}/{'val' if validate else 'train'}/{step}/{index}/{copy}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % (1 << SEED_BITS)


class SeededAgentLoopWorker(AgentLoopWorker):
    """verl's agent loop worker with a per-page sampling seed (`request_seed`)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.run_seed = int(config.actor_rollout_ref.rollout.seed)

    def set_run_seed(self, seed: int) -> None:
        self.run_seed = int(seed)

    async def _run_agent_loop(self, sampling_params: dict[str, Any], trajectory: dict[str, Any], **kwargs):
        params = dict(sampling_params)
        params["seed"] = request_seed(self.run_seed, int(trajectory["step"]),
                                      int(trajectory["sample_index"]), int(trajectory["rollout_n"]),
                                      bool(trajectory["validate"]))
        return await super()._run_agent_loop(params, trajectory, **kwargs)


class SeededAgentLoopManager(AgentLoopManager):
    """verl's agent loop manager, starting `SeededAgentLoopWorker`s (rl.config sets it when rollout_seeding=request)."""

    def __init__(self, *args, **kwargs):
        self.agent_loop_workers_class = ray.remote(SeededAgentLoopWorker)
        super().__init__(*args, **kwargs)

    def set_run_seed(self, seed: int) -> None:
        """The seed the next pages are drawn with: a session that trains several seeds (rl.trainer) starts the
        workers once, with the first seed's config, and tells them each next seed."""
        ray.get([worker.set_run_seed.remote(seed) for worker in self.agent_loop_workers])
