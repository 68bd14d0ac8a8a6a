"""A music-streaming dataset directory unlike the toy world in every dimension, written without a simulator.

    python -m tests.datasets.music OUT_DIR [--titles 1500] [--users 3000] [--impressions 20000] [--seed 0]

One entity type (track) with ids like `trk-000123`, 19 genres, moods and a `family_safe` flag, release dates,
32-dimensional content embeddings; 30 rows (19 genre rows, five mood rows, two recency rows, a history row, a
boolean row, an explicit list and an everything row), a pinned row and a critical row; languages and devices
the toy world does not have (the language vocabulary learned from the logs); another reward table (skip,
none, listen, full_listen, repeat; a like on top). Engagement comes from a few lines of random taste below,
not from a behaviour model, and nothing here is ground truth: the dataset declares no environment. The pages
in the logs follow the dataset's own row taxonomy (what a production logging policy serves).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from homepage.logs import LOG_SCHEMA, SPLITS

GENRES = ("pop", "rock", "hiphop", "jazz", "classical", "electronic", "country", "reggae", "metal", "folk", "blues",
          "soul", "latin", "kpop", "afrobeat", "ambient", "punk", "gospel", "soundtrack")
MOODS = ("calm", "energetic", "sad", "happy", "focus")
LANGUAGES = ("de", "pt-BR", "sv", "hi", "yo", "tl")  # the last two rare: below the learned vocabulary's min_count
LANGUAGE_P = (0.35, 0.25, 0.2, 0.17, 0.02, 0.01)
DEVICES = ("car", "smart_speaker", "watch", "desktop", "phone")
PROFILES = ("standard", "family")
ACTIONS = ("stream", "save", "skip", "like")
REWARDS = {"skip": -0.5, "none": 0.0, "listen": 1.0, "full_listen": 2.5, "repeat": 5.0}
LIKE = 1.0
AS_OF = dt.date(2026, 6, 30)


def schema() -> dict:
    return {
        "version": 1, "name": "music-streaming", "as_of": AS_OF.isoformat(), "entity_types": ["track"],
        "embedding_dim": 32,
        "context": {"language": {"min_count": 40}, "profile_type": {"values": list(PROFILES)},
                    "device": {"values": list(DEVICES)}, "hour": {"edges": [5, 9, 12, 14, 18, 21]},
                    "day_of_week": {"edges": [5]}},  # weekday / weekend
        "history": {"actions": {"values": list(ACTIONS)}, "days_ago_edges": [1, 7, 30, 180],
                    "watch_fraction_edges": [0.1, 0.5, 0.95], "partial_watch": [0.1, 0.95]},
        "max_history": 16,
        "restricted_profiles": {"family": "family_safe"},
        "rewards": {"feedback": dict(REWARDS), "thumbs_up": LIKE},
        "rows": [
            {"template": "genre_{value}", "kind": "attribute", "column": "genres", "values": list(GENRES)},
            {"template": "mood_{value}", "kind": "attribute", "column": "mood", "values": list(MOODS)},
            {"id": "jump_back_in", "kind": "history"},
            {"id": "new_this_week", "kind": "recency", "column": "release_date", "days": 7},
            {"id": "fresh_finds", "kind": "recency", "column": "release_date", "days": 60},
            {"id": "staff_picks", "kind": "boolean", "column": "staff_pick"},
            {"id": "editors_choice", "kind": "list", "entities": []},  # filled in by `write`
            {"id": "all_tracks", "kind": "all"},
        ],
        "page": {"min_rows": 3, "max_rows": 6, "min_row_len": 3, "max_row_len": 8},
        "pinned_rows": {"staff_picks": 0}, "critical_rows": {"jump_back_in": 3},
    }


def write(root: str | Path, n_titles: int = 1500, n_users: int = 3000, n_impressions: int = 20000, seed: int = 0) -> Path:
    """Writes the dataset directory (dataset.yaml, catalog.parquet, logs/part-00000.parquet) and returns it."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    N, G = n_titles, len(GENRES)
    ids = [f"trk-{i:06d}" for i in range(N)]
    genres = [sorted({GENRES[g] for g in rng.choice(G, size=rng.integers(1, 3), replace=False)}) for _ in range(N)]
    mood = rng.choice(MOODS, size=N)
    age = np.where(rng.random(N) < 0.1, rng.integers(0, 60, N), rng.integers(60, 4000, N))
    family_safe = rng.random(N) < 0.6
    staff_pick = rng.random(N) < 0.08
    popularity = np.exp(rng.normal(0, 1, N))
    genre_onehot = np.array([[g in gs for g in GENRES] for gs in genres], dtype=np.float64)  # [N, G]
    emb = genre_onehot @ rng.normal(size=(G, 32)) + rng.normal(size=(N, 32)) * 0.5
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    catalog = pa.table({
        "entity_id": ids, "entity_type": ["track"] * N, "genres": genres, "mood": mood.tolist(),
        "release_date": pa.array([AS_OF - dt.timedelta(days=int(a)) for a in age], pa.date32()),
        "family_safe": family_safe, "staff_pick": staff_pick, "bpm": rng.normal(110, 25, N).round(),
        "content_embedding": pa.array(list(emb), pa.list_(pa.float32())),
    })
    spec = schema()
    editors = sorted(rng.choice(ids, size=max(N // 25, 12), replace=False).tolist())
    next(r for r in spec["rows"] if r.get("id") == "editors_choice")["entities"] = editors

    # Row eligibility over the catalog (what the logging policy below serves; the pipeline rebuilds it from the yaml).
    rows = [f"genre_{g}" for g in GENRES] + [f"mood_{m}" for m in MOODS] + [
        "jump_back_in", "new_this_week", "fresh_finds", "staff_picks", "editors_choice", "all_tracks"]
    elig = {f"genre_{g}": genre_onehot[:, i] > 0 for i, g in enumerate(GENRES)}
    elig.update({f"mood_{m}": mood == m for m in MOODS})
    elig.update({"new_this_week": age < 7, "fresh_finds": age < 60, "staff_picks": staff_pick,
                 "editors_choice": np.isin(ids, editors), "all_tracks": np.ones(N, bool)})

    # Users: a taste over genres, a language, a profile, a split, a listening history.
    taste = rng.dirichlet(np.full(G, 0.3), size=n_users)  # [U, G]
    lang = rng.choice(LANGUAGES, size=n_users, p=LANGUAGE_P)
    profile = np.where(rng.random(n_users) < 0.2, "family", "standard")
    split = rng.choice(SPLITS, size=n_users, p=[0.8, 0.1, 0.1])
    affinity = taste @ genre_onehot.T * 3 + 0.3 * np.log(popularity)[None, :]  # [U, N]
    histories = []
    for u in range(n_users):
        pool = np.flatnonzero(family_safe) if profile[u] == "family" else np.arange(N)
        p = np.exp(affinity[u, pool]); p /= p.sum()
        ents = rng.choice(pool, size=rng.integers(4, 14), replace=False, p=p)
        histories.append([(int(e), str(rng.choice(ACTIONS, p=[0.6, 0.15, 0.15, 0.1])), float(rng.exponential(40)),
                           float(rng.choice([rng.uniform(0.1, 0.95), 1.0], p=[0.4, 0.6]))) for e in ents])

    cols = {name: [] for name in LOG_SCHEMA.names}
    fb_names = list(REWARDS)
    for i in range(n_impressions):
        u = int(rng.integers(n_users))
        safe = family_safe if profile[u] == "family" else np.ones(N, bool)
        hist = histories[u]
        partial = np.zeros(N, bool)
        partial[[e for e, _, _, f in hist if 0.1 <= f < 0.95]] = True
        elig["jump_back_in"] = partial
        used: set[int] = set()
        page_rows, page_ents = [], []
        want = ["staff_picks"] + (["jump_back_in"] if partial.any() else [])
        want += list(rng.permutation([r for r in rows if r not in want]))
        for row in want:
            if len(page_rows) >= int(rng.integers(4, 7)):
                break
            pool = np.flatnonzero(elig[row] & safe & ~np.isin(np.arange(N), list(used)))
            if len(pool) < 3:
                continue
            p = np.exp(affinity[u, pool]); p /= p.sum()
            take = rng.choice(pool, size=min(len(pool), int(rng.integers(4, 8))), replace=False, p=p)
            used.update(int(t) for t in take)
            page_rows.append(row)
            page_ents.append([int(t) for t in take])
        feedback, minutes, likes, rewards = [], [], [], []
        for ents in page_ents:
            f_row, m_row, l_row, r_row = [], [], [], []
            for e in ents:
                engage = 1 / (1 + np.exp(-(affinity[u, e] - 2.0)))
                p = np.array([0.05 + 0.15 * (1 - engage), 0.8 * (1 - engage), 0.45 * engage, 0.35 * engage, 0.2 * engage])
                outcome = fb_names[rng.choice(len(fb_names), p=p / p.sum())]
                like = outcome in ("full_listen", "repeat") and rng.random() < 0.3
                f_row.append(outcome)
                m_row.append(float({"skip": 0.2, "none": 0.0, "listen": 1.5, "full_listen": 3.5, "repeat": 7.0}[outcome]))
                l_row.append(bool(like))
                r_row.append(REWARDS[outcome] + LIKE * like)
            feedback.append(f_row); minutes.append(m_row); likes.append(l_row); rewards.append(r_row)
        cols["impression_id"].append(i)
        cols["user_id"].append(f"listener-{u:05d}")
        cols["split"].append(str(split[u]))
        cols["language"].append(str(lang[u]))
        cols["profile_type"].append(str(profile[u]))
        cols["hour"].append(int(rng.integers(0, 24)))
        cols["day_of_week"].append(int(rng.integers(0, 7)))
        cols["device"].append(str(rng.choice(DEVICES)))
        cols["history_entity_ids"].append([ids[e] for e, _, _, _ in hist])
        cols["history_actions"].append([a for _, a, _, _ in hist])
        cols["history_days_ago"].append([d for _, _, d, _ in hist])
        cols["history_watch_fraction"].append([f for _, _, _, f in hist])
        cols["page_row_ids"].append(page_rows)
        cols["page_entity_ids"].append([[ids[e] for e in ents] for ents in page_ents])
        cols["feedback"].append(feedback)
        cols["play_minutes"].append(minutes)
        cols["thumbs_up"].append(likes)
        cols["entity_rewards"].append(rewards)
        cols["page_reward"].append(float(sum(sum(r) for r in rewards)))
        cols["rows_viewed"].append(len(page_rows))
        cols["policy"].append("editorial_v3")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(cols, schema=LOG_SCHEMA), root / "logs" / "part-00000.parquet")
    pq.write_table(catalog, root / "catalog.parquet")
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, width=120))
    return root


class FamilySafeShare:
    """A stand-in ground truth, plugged by dotted path (`tests.datasets.music:FamilySafeShare`; the dataset
    declares none): a page's "true reward" is its number of family-safe titles."""

    def __init__(self, dataset):
        ids = dataset.entity_ids
        safe = dataset.catalog.column("family_safe").to_pylist()
        self.safe = {e for e, s in zip(ids, safe) if s}

    def true_page_reward(self, contexts, pages):
        return np.array([sum(e in self.safe for e in p.entity_ids) for p in pages], dtype=np.float64)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--titles", type=int, default=1500)
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--impressions", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"wrote {write(a.out_dir, a.titles, a.users, a.impressions, a.seed)}")
