"""The simulated homepage world: catalog, users, behaviour model, reward system and logging policy.

`World.generate(config)` builds it deterministically from `config.seed`; `world.save(dir)` /
`World.load(dir)` persist it (hidden state included, so ground truth survives code changes to the
generators); `world.true_page_reward(...)` is the ground truth every later stage is judged on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from common.config import from_dict
from homepage.behavior import BehaviorModel, Feedback
from homepage.catalog import Catalog, make_catalog
from homepage.config import WorldConfig
from homepage.logging_policy import LoggingPolicy
from homepage.pages import PageBatch
from homepage.users import Requests, Users, UserTitleSets, make_users, sample_requests

WORLD_FORMAT_VERSION = 1
SIMULATOR_DIR = "simulator"  # inside the dataset directory make_world writes: the hidden state
AS_OF = "2026-01-01"  # the toy world's "today": release days become dates relative to it
ENVIRONMENT = "homepage.world:SimulatorEnvironment"  # what the toy dataset declares as its ground truth
# The toy dataset's buckets: hours into night / morning / afternoon / evening / late, one bucket per weekday, days
# since an action, and the share watched (a title is resumable between 5% and 90%).
HOUR_EDGES = (6, 12, 17, 22)
DAY_OF_WEEK_EDGES = (1, 2, 3, 4, 5, 6)
DAYS_AGO_EDGES = (1, 3, 7, 14, 30, 90)
WATCH_FRACTION_EDGES = (0.05, 0.25, 0.5, 0.9)
PARTIAL_WATCH = (0.05, 0.9)


@dataclass
class ImpressionBatch:
    """B simulated impressions: who, when, what was shown, and what happened."""

    impression_id: np.ndarray  # [B] int64
    user: np.ndarray  # [B] user index
    requests: Requests  # B requests
    pages: PageBatch  # B pages
    feedback: Feedback  # aligned with pages


def _save_dataclass(obj, prefix: str, arrays: dict, meta: dict) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, UserTitleSets):  # [U, H] title indices; N is the catalog's
            arrays[f"{prefix}.{f.name}"] = v.titles
        elif isinstance(v, np.ndarray):
            arrays[f"{prefix}.{f.name}"] = v
        else:
            meta[f"{prefix}.{f.name}"] = v


def _load_dataclass(cls, prefix: str, arrays, meta: dict):
    kw = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        kw[f.name] = arrays[key] if key in arrays else meta[key]
    return cls(**kw)


def _title_sets(users: Users, n_titles: int) -> Users:
    """Loaded users with resume/completed as UserTitleSets: [U, H] indices, or a dense [U, N] boolean (a world
    saved before they were stored sparse)."""
    for name in ("resume", "completed"):
        v = getattr(users, name)
        setattr(users, name, UserTitleSets.from_dense(v) if v.dtype == bool else UserTitleSets(v, n_titles))
    return users


class World:
    def __init__(self, config: WorldConfig, catalog: Catalog, users: Users):
        self.config, self.catalog, self.users = config, catalog, users
        self.behavior = BehaviorModel(catalog, users, config.behavior, config.rewards)
        self.logging_policy = LoggingPolicy(catalog, users, config.logging_policy)
        self._user_index = users.index_of()
        self._entity_index = catalog.index_of()

    @classmethod
    def generate(cls, config: WorldConfig) -> "World":
        rng = np.random.default_rng([config.seed, 0])
        catalog = make_catalog(rng, config.n_entities, config.content_dim, config.latent_dim, config.new_title_days)
        users = make_users(
            rng, catalog, config.n_users, config.kids_fraction, config.history_min, config.history_max,
            config.split_fractions,
        )
        return cls(config, catalog, users)

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        meta: dict = {"format_version": WORLD_FORMAT_VERSION, "config": dataclasses.asdict(self.config)}
        _save_dataclass(self.catalog, "catalog", arrays, meta)
        _save_dataclass(self.users, "users", arrays, meta)
        np.savez_compressed(directory / "world_state.npz", **arrays)
        (directory / "world.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path) -> "World":
        """From a directory `save` wrote, or a dataset directory holding one in `simulator/`."""
        directory = Path(directory)
        if not (directory / "world.json").exists() and (directory / SIMULATOR_DIR / "world.json").exists():
            directory = directory / SIMULATOR_DIR
        meta_path = directory / "world.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: generate the world first with `python recipes/make_world.py`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != WORLD_FORMAT_VERSION:
            raise ValueError(f"{meta_path}: world format {meta.get('format_version')}, expected {WORLD_FORMAT_VERSION}")
        config = from_dict(WorldConfig, meta["config"], where=str(meta_path))
        with np.load(directory / "world_state.npz") as arrays:
            arrays = dict(arrays)
        catalog = _load_dataclass(Catalog, "catalog", arrays, meta)
        users = _title_sets(_load_dataclass(Users, "users", arrays, meta), catalog.n)
        return cls(config, catalog, users)

    # -- lookups -----------------------------------------------------------------------------------------
    def user_indices(self, user_ids: list[str]) -> np.ndarray:
        missing = [u for u in user_ids if u not in self._user_index]
        if missing:
            raise KeyError(f"{len(missing)} user id(s) not in this world, e.g. {missing[:3]}")
        return np.array([self._user_index[u] for u in user_ids], dtype=np.int64)

    @property
    def entity_index(self) -> dict[str, int]:
        return self._entity_index

    # -- simulation --------------------------------------------------------------------------------------
    def sample_users(self, rng: np.random.Generator, n: int, split: str | None = None) -> np.ndarray:
        from homepage.logs import SPLITS

        pool = np.arange(self.users.n) if split is None else np.flatnonzero(self.users.split == SPLITS.index(split))
        return rng.choice(pool, size=n)

    def sample_requests(self, rng: np.random.Generator, user: np.ndarray) -> Requests:
        return sample_requests(rng, self.users.profile_type[user])

    def simulate(self, user: np.ndarray, req: Requests, pages: PageBatch, rng: np.random.Generator) -> Feedback:
        """One sampled browsing session per page (what a log records)."""
        return self.behavior.sample(user, req, pages, rng)

    def true_page_reward(self, user: np.ndarray, req: Requests, pages: PageBatch) -> np.ndarray:
        """Ground truth: the exact expected page reward of each (user, request, page).  -> [B]"""
        out = np.empty(len(pages))
        bs = self.config.batch_size
        for s in range(0, len(pages), bs):
            sl = slice(s, s + bs)
            out[sl] = self.behavior.expected_reward(user[sl], req.take(np.arange(len(pages))[sl]), pages.take(sl))
        return out

    def iter_logs(self, n_impressions: int | None = None, seed: int | None = None) -> Iterator[ImpressionBatch]:
        """The logging policy serving `n_impressions` requests, in deterministic batches."""
        n = n_impressions or self.config.n_impressions
        for k in range(-(-n // self.config.batch_size)):
            yield self.log_batch(k, n, seed)

    def log_batch(self, k: int, n_impressions: int | None = None, seed: int | None = None) -> ImpressionBatch:
        """Batch k of iter_logs, on its own: each batch has its own generator, so batches can be made in any
        order or in parallel (recipes/make_world.py's workers)."""
        n = n_impressions or self.config.n_impressions
        seed = self.config.seed if seed is None else seed
        bs = self.config.batch_size
        start = k * bs
        rng = np.random.default_rng([seed, 1, k])
        b = min(bs, n - start)
        user = self.sample_users(rng, b)
        req = self.sample_requests(rng, user)
        pages = self.logging_policy.act(user, req, rng)
        fb = self.simulate(user, req, pages, rng)
        return ImpressionBatch(np.arange(start, start + b, dtype=np.int64), user, req, pages, fb)


def _ragged_positions(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of each flat value of a ragged array with the given per-row lengths."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, cols


def _padded(flat: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Ragged values (flat, with per-row lengths) -> [rows, width] array padded with -1."""
    out = np.full((len(lengths), max(width, 1)), -1, dtype=np.int64)
    out[_ragged_positions(lengths)] = flat
    return out


def batch_from_table(world: World, table) -> tuple[np.ndarray, Requests, PageBatch]:
    """Logged impressions (LOG_SCHEMA table) -> (user indices [B], requests, pages) for the ground truth.

    Vectorized over the table. Ids unknown to this world raise KeyError: ground truth exists only for the
    world's own users and titles.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from homepage.catalog import ROW_IDS
    from homepage.users import DEVICES

    def lookup(values, known: list[str], what: str) -> np.ndarray:
        idx = pc.index_in(values, value_set=pa.array(known, pa.string())).fill_null(-1).to_numpy(zero_copy_only=False)
        if (idx < 0).any():
            bad = values[int(np.flatnonzero(idx < 0)[0])].as_py()
            raise KeyError(f"{what} {bad!r} is not in this world; ground truth needs the world's own ids")
        return idx.astype(np.int64)

    user = lookup(table.column("user_id").combine_chunks(), world.users.user_ids, "user id")
    req = Requests(
        table.column("hour").to_numpy().astype(np.int8),
        table.column("day_of_week").to_numpy().astype(np.int8),
        lookup(table.column("device").combine_chunks(), list(DEVICES), "device").astype(np.int8),
    )
    rows_col = table.column("page_row_ids").combine_chunks()
    n_rows = pc.list_value_length(rows_col).to_numpy(zero_copy_only=False)
    row_idx = lookup(rows_col.flatten(), list(ROW_IDS), "row id")
    ents_col = table.column("page_entity_ids").combine_chunks()
    row_lists = ents_col.flatten()
    row_len = pc.list_value_length(row_lists).to_numpy(zero_copy_only=False)
    ent_idx = lookup(row_lists.flatten(), world.catalog.entity_ids, "entity id")
    R, L = int(n_rows.max(initial=1)), int(row_len.max(initial=1))
    rows = _padded(row_idx, n_rows, R)  # [B, R]
    ents_by_row = _padded(ent_idx, row_len, L)  # [sum rows, L]
    ents = np.full((len(n_rows), R, L), -1, dtype=np.int64)
    ents[_ragged_positions(n_rows)] = ents_by_row
    return user, req, PageBatch(rows, ents)


def world_contexts(world: World, user: np.ndarray, req: Requests):
    """The prompt side of impressions for world users: what the logs would record as context."""
    from homepage.catalog import LANGUAGES
    from homepage.logs import Context, HistoryAction
    from homepage.users import ACTIONS, DEVICES, PROFILE_TYPES

    us, ids = world.users, world.catalog.entity_ids
    out = []
    for b, u in enumerate(user):
        valid = us.hist_entity[u] >= 0
        history = tuple(
            HistoryAction(ids[e], ACTIONS[a], float(d), float(f))
            for e, a, d, f in zip(us.hist_entity[u][valid], us.hist_action[u][valid], us.hist_days_ago[u][valid],
                                  us.hist_fraction[u][valid])
        )
        out.append(Context(us.user_ids[u], LANGUAGES[us.language[u]], PROFILE_TYPES[us.profile_type[u]],
                           int(req.hour[b]), int(req.day_of_week[b]), DEVICES[req.device[b]], history))
    return out


# ----------------------------------------------------------------------------------------------------------
# The simulator as one producer of datasets, and as one environment
# ----------------------------------------------------------------------------------------------------------
def catalog_table(world: World):
    """The observable catalog as the dataset's catalog.parquet (hidden taste factors and quality left out)."""
    import datetime as dt

    import pyarrow as pa

    from homepage.catalog import ENTITY_TYPES, GENRES, LANGUAGES, MATURITY

    c = world.catalog
    as_of = np.datetime64(AS_OF, "D")
    return pa.table({
        "entity_id": c.entity_ids,
        "entity_type": [ENTITY_TYPES[t] for t in c.entity_type],
        "genres": [[g for g, on in zip(GENRES, row) if on] for row in c.genres],
        "maturity": [MATURITY[m] for m in c.maturity],
        "kids_safe": pa.array(c.kids_safe, pa.bool_()),
        "trending": pa.array(c.trending, pa.bool_()),
        "release_date": pa.array([dt.date.fromisoformat(str(as_of + int(d))) for d in c.release_day], pa.date32()),
        "popularity": c.popularity,
        "language": [LANGUAGES[x] for x in c.language],
        "runtime_min": c.runtime_min,
        "content_embedding": pa.array(list(c.content_emb), pa.list_(pa.float32())),
    })


def dataset_schema(world: World) -> dict:
    """dataset.yaml of the toy world: its vocabularies, reward system and row taxonomy (docs/dataset.md)."""
    from homepage.catalog import CONTINUE_WATCHING, ENTITY_TYPES, GENRES, KIDS, LANGUAGES, NEW_RELEASES, TRENDING
    from homepage.rewards import FEEDBACK_TYPES
    from homepage.users import ACTIONS, DEVICES, PROFILE_TYPES

    r = world.config.rewards
    return {
        "version": 1, "name": "toy-world", "as_of": AS_OF, "entity_types": list(ENTITY_TYPES),
        "embedding_dim": world.config.content_dim,
        "context": {
            "language": {"values": list(LANGUAGES)}, "profile_type": {"values": list(PROFILE_TYPES)},
            "device": {"values": list(DEVICES)},
            "hour": {"edges": list(HOUR_EDGES)}, "day_of_week": {"edges": list(DAY_OF_WEEK_EDGES)},
        },
        "history": {"actions": {"values": list(ACTIONS)}, "days_ago_edges": list(DAYS_AGO_EDGES),
                    "watch_fraction_edges": list(WATCH_FRACTION_EDGES), "partial_watch": list(PARTIAL_WATCH)},
        "max_history": world.config.history_max,
        "restricted_profiles": {"kids": "kids_safe"},
        "rewards": {"feedback": dict(zip(FEEDBACK_TYPES, r.feedback_values().tolist())), "thumbs_up": r.thumbs_up},
        "rows": [
            {"template": "genre_{value}", "kind": "attribute", "column": "genres", "values": list(GENRES)},
            {"id": CONTINUE_WATCHING, "kind": "history"},
            {"id": TRENDING, "kind": "boolean", "column": "trending"},
            {"id": NEW_RELEASES, "kind": "recency", "column": "release_date", "days": world.config.new_title_days},
            {"id": KIDS, "kind": "boolean", "column": "kids_safe"},
        ],
        "page": {"min_rows": 3, "max_rows": 6, "min_row_len": 3, "max_row_len": 8},
        "pinned_rows": {}, "critical_rows": {CONTINUE_WATCHING: 2},
        "environment": ENVIRONMENT,
    }


def contexts_to_requests(world: World, contexts) -> tuple[np.ndarray, Requests]:
    """Logged contexts of world users -> (user indices [B], requests). Raises KeyError for foreign ids."""
    from homepage.users import DEVICES

    user = world.user_indices([c.user_id for c in contexts])
    dev = {d: i for i, d in enumerate(DEVICES)}
    unknown = sorted({c.device for c in contexts} - set(dev))
    if unknown:
        raise KeyError(f"device(s) {unknown} are not the simulator's; ground truth needs the world's own values")
    req = Requests(np.array([c.hour for c in contexts], np.int8), np.array([c.day_of_week for c in contexts], np.int8),
                   np.array([dev[c.device] for c in contexts], np.int8))
    return user, req


def session_actions(world: World, page: PageBatch, fb: Feedback, b: int):
    """In-session history actions (page order) and a readable summary from feedback row b of a page batch:
    abandon -> act:abandon, short or long play -> act:play, binge -> act:binge, a thumbs-up -> act:thumbs_up."""
    from homepage.logs import HistoryAction
    from homepage.rewards import ABANDON, BINGE, FEEDBACK_TYPES, LONG_PLAY, NONE, SHORT_PLAY

    action_of = {ABANDON: "abandon", SHORT_PLAY: "play", LONG_PLAY: "play", BINGE: "binge"}
    c = world.catalog
    actions, summary = [], {}
    R, L = page.entities.shape[1:]
    for r in range(R):
        for col in range(L):
            e = int(page.entities[b, r, col])
            code = int(fb.feedback[b, r, col])
            if e < 0 or code == NONE:
                continue
            frac = float(fb.play_minutes[b, r, col]) / max(float(c.runtime_min[e]), 1e-6)
            thumbs = bool(fb.thumbs_up[b, r, col])
            actions.append(HistoryAction(c.entity_ids[e], "thumbs_up" if thumbs else action_of[code], 0.0, frac))
            summary[c.entity_ids[e]] = FEEDBACK_TYPES[code].replace("_", " ") + (" + thumbs up" if thumbs else "")
    return actions, summary


class SimulatorEnvironment:
    """The toy world's ground truth behind the environment protocol (homepage.environment.Environment)."""

    def __init__(self, dataset):
        self.world = World.load(Path(dataset.root) / SIMULATOR_DIR)

    @classmethod
    def of_world(cls, world: World) -> "SimulatorEnvironment":
        """The environment of a world in memory (tests, notebooks)."""
        env = cls.__new__(cls)
        env.world = world
        return env

    def _arrays(self, contexts, pages) -> tuple[np.ndarray, Requests, PageBatch]:
        """Structured contexts and pages -> the world's arrays (titles or rows it lacks raise KeyError)."""
        user, req = contexts_to_requests(self.world, contexts)
        return user, req, PageBatch.from_pages(list(pages), self.world.entity_index)

    def true_page_reward(self, contexts, pages) -> np.ndarray:
        """[B] exact expected reward of page b in context b."""
        if not len(contexts):
            return np.zeros(0)
        return self.world.true_page_reward(*self._arrays(contexts, pages))

    def sample_contexts(self, n: int, split: str, seed: int):
        """n fresh requests of `split` users (for stages that want contexts the logs do not hold)."""
        rng = np.random.default_rng([seed, 23])
        user = self.world.sample_users(rng, n, split=split)
        return world_contexts(self.world, user, self.world.sample_requests(rng, user))

    def log_impressions(self, contexts, pages, rng: np.random.Generator, first_id: int, policy: str):
        """Serves page b in context b once each and logs what the simulated users did: a log table
        (homepage.logs.LOG_SCHEMA) with impression ids first_id, first_id + 1, ... and `policy` as its policy."""
        from homepage.logs import batch_to_table

        user, req, batch = self._arrays(contexts, pages)
        fb = self.world.simulate(user, req, batch, rng)
        ids = np.arange(first_id, first_id + len(pages), dtype=np.int64)
        return batch_to_table(ImpressionBatch(ids, user, req, batch, fb), self.world, policy=policy)

    def browse(self, contexts, pages, rng: np.random.Generator):
        """One simulated browsing session per (context, page): per page (in-session history actions, summary)
        (policies.pagination's session model)."""
        user, req, batch = self._arrays(contexts, pages)
        fb = self.world.simulate(user, req, batch, rng)
        return [session_actions(self.world, batch, fb, i) for i in range(len(pages))]
