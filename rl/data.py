"""Prompts for verl: user contexts from the world, as the parquet rows verl's RLHFDataset reads.

Each row is one request of one user: `prompt` is a single chat message holding the context as text (the
tokenizer's chat template appends [PAGE], the prompt/page boundary), `extra_info` carries what the reward
manager needs to judge the page on the ground truth (user index, request) and never reaches the policy.
Training prompts come from train-split users only; valid/test users are held out for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from homepage.users import SPLITS, Requests
from homepage.world import World, world_contexts
from policies.tokenizer import GenPageTokenizer

DATA_SOURCE = "genpage"


@dataclass
class PromptSet:
    """B requests of world users. user: [B] user index; requests: B requests; split: their users' split."""

    user: np.ndarray  # [B] int64
    requests: Requests
    split: str

    def __len__(self) -> int:
        return len(self.user)


def sample_prompts(world: World, split: str, n: int, seed: int) -> PromptSet:
    """n requests of users drawn (with replacement) from `split`, deterministic in `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; known: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 7])
    user = world.sample_users(rng, n, split=split)
    return PromptSet(user, world.sample_requests(rng, user), split)


def prompt_rows(world: World, tok: GenPageTokenizer, prompts: PromptSet) -> list[dict]:
    """verl RLHFDataset rows (prompt as chat messages, extra_info with user index and request)."""
    rows = []
    contexts = world_contexts(world, prompts.user, prompts.requests)
    r = prompts.requests
    for i, ctx in enumerate(contexts):
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": tok.prompt_text(ctx)}],
            "ability": "homepage",
            "reward_model": {"style": "model", "ground_truth": ""},
            "extra_info": {
                "index": i, "split": prompts.split, "user": int(prompts.user[i]), "hour": int(r.hour[i]),
                "day_of_week": int(r.day_of_week[i]), "device": int(r.device[i]),
            },
        })
    return rows


def write_prompt_parquet(path: str | Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.rename(path)
    return path


def requests_from_extra_info(infos: list[dict]) -> tuple[np.ndarray, Requests]:
    """extra_info dicts (as written by `prompt_rows`) -> (user indices [B], requests)."""
    user = np.array([int(x["user"]) for x in infos], dtype=np.int64)
    req = Requests(
        np.array([int(x["hour"]) for x in infos], dtype=np.int8),
        np.array([int(x["day_of_week"]) for x in infos], dtype=np.int8),
        np.array([int(x["device"]) for x in infos], dtype=np.int8),
    )
    return user, req
