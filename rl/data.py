"""Prompts for verl: logged contexts of a dataset, as the parquet rows verl's RLHFDataset reads.

Each row is one logged request: `prompt` is a single chat message holding the context as text (the tokenizer's
chat template appends [PAGE], the prompt/page boundary); `extra_info` carries what the reward manager needs
beside the tokens and never reaches the policy: the context itself (for an environment's ground truth) and the
titles the user engaged with on the logged page (for the offline recall metric). Training prompts are contexts
of train-split users; held-out (test-split) users are the evaluation set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from homepage.logs import Context, HistoryAction, Impression, engaged_titles
from policies.tokenizer import GenPageTokenizer

DATA_SOURCE = "genpage"


def context_to_json(ctx: Context) -> str:
    return json.dumps(dataclasses.asdict(ctx))


def context_from_json(text: str) -> Context:
    d = json.loads(text)
    d["history"] = tuple(HistoryAction(**h) for h in d["history"])
    return Context(**d)


def prompt_rows(tok: GenPageTokenizer, impressions: list[Impression], split: str) -> list[dict]:
    """verl RLHFDataset rows (prompt as chat messages; extra_info with the context and the engaged titles)."""
    return [{
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": tok.prompt_text(imp.context)}],
        "ability": "homepage",
        "reward_model": {"style": "model", "ground_truth": ""},
        "extra_info": {"index": i, "split": split, "impression_id": imp.impression_id,
                       "context": context_to_json(imp.context), "engaged": sorted(engaged_titles(imp))},
    } for i, imp in enumerate(impressions)]


def write_prompt_parquet(path: str | Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.rename(path)
    return path


def contexts_from_extra_info(infos: list[dict]) -> list[Context] | None:
    """The contexts of extra_info dicts (as written by `prompt_rows`); None if any lacks one."""
    if not infos or any(not i or "context" not in i for i in infos):
        return None
    return [context_from_json(i["context"]) for i in infos]
