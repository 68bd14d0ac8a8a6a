"""The toy world's vocabularies and dataset directory, for tests that build tokenizers and rulesets by hand; and
the config of the small world the tests share (tests/conftest.py's `small_world`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from homepage.catalog import ENTITY_TYPES, LANGUAGES, ROW_IDS
from homepage.config import WorldConfig
from homepage.users import ACTIONS, DEVICES, PROFILE_TYPES
from homepage.world import DAY_OF_WEEK_EDGES, DAYS_AGO_EDGES, HOUR_EDGES, PARTIAL_WATCH, WATCH_FRACTION_EDGES
from policies.tokenizer import ContextVocab, GenPageTokenizer

# small but complete (all rows populated): the world of the `small_world` and `controlled_world` fixtures
SMALL = WorldConfig(seed=3, n_entities=120, n_users=200, n_impressions=600, batch_size=256)

# what ContextVocab.from_schema gives for the toy dataset (world.dataset_schema)
TOY_VOCAB = ContextVocab(LANGUAGES, PROFILE_TYPES, DEVICES, ACTIONS, HOUR_EDGES, DAY_OF_WEEK_EDGES, DAYS_AGO_EDGES,
                         WATCH_FRACTION_EDGES, PARTIAL_WATCH)


def toy_tokenizer(entity_ids, max_history: int = 24, entity_types=None) -> GenPageTokenizer:
    """A tokenizer over the toy world's vocabularies and rows; entity types from the ids' prefixes."""
    ids = list(entity_ids)
    types = entity_types or [e.split("_", 1)[0] if e.split("_", 1)[0] in ENTITY_TYPES else "movie" for e in ids]
    return GenPageTokenizer(ids, TOY_VOCAB, ROW_IDS, types, max_history)


def world_tokenizer(world, max_history: int | None = None) -> GenPageTokenizer:
    c = world.catalog
    return toy_tokenizer(c.entity_ids, max_history or world.config.history_max, [ENTITY_TYPES[t] for t in c.entity_type])


def world_dataset(world, directory: str | Path):
    """The dataset directory make_world would write for `world` (schema and catalog; logs not written)."""
    from homepage.dataset import write_dataset
    from homepage.world import catalog_table, dataset_schema

    world.save(Path(directory) / "simulator")
    return write_dataset(directory, dataset_schema(world), catalog_table(world))


def entity_tokens(tok: GenPageTokenizer, mask: np.ndarray, entity_ids) -> list[int]:
    return [tok.vocab[f"ent:{e}"] for e, on in zip(entity_ids, mask) if on]
