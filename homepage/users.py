"""Users (profile, hidden tastes, behaviour parameters, viewing history) and requests (time, day, device)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from homepage.catalog import GENRES, KIDS_GENRES, LANGUAGES, Catalog

PROFILE_TYPES: tuple[str, ...] = ("adult", "kids")
DEVICES: tuple[str, ...] = ("tv", "mobile", "web", "tablet")
# History action types (paper section 2: [entity][action type][time bucket][duration bucket]).
ACTIONS: tuple[str, ...] = ("play", "binge", "thumbs_up", "abandon")


@dataclass
class Users:
    """All users; arrays indexed by user index u in [0, U). History is padded with entity -1, oldest first."""

    user_ids: list[str]  # [U]
    language: np.ndarray  # [U] int8 into LANGUAGES
    profile_type: np.ndarray  # [U] int8 into PROFILE_TYPES
    split: np.ndarray  # [U] int8 into SPLITS (held-out users never train)
    taste: np.ndarray  # [U, K] float32 hidden taste vector
    genre_affinity: np.ndarray  # [U, G] float32 hidden interest in each genre's row
    patience: np.ndarray  # [U] probability of moving on to the next row when nothing was played
    stop: np.ndarray  # [U] stopping power: how much a row the user plays from ends browsing
    satiation: np.ndarray  # [U] strength of diminishing returns for similar titles on one page
    col_decay: np.ndarray  # [U] position bias: exam probability ratio between adjacent columns
    binge: np.ndarray  # [U] propensity to binge a satisfying show
    abandon: np.ndarray  # [U] share of unsatisfying plays that are abandoned within minutes
    thumbs: np.ndarray  # [U] propensity to give a thumbs-up to a satisfying title
    hist_entity: np.ndarray  # [U, H] int32 entity index, -1 = padding
    hist_action: np.ndarray  # [U, H] int8 into ACTIONS
    hist_days_ago: np.ndarray  # [U, H] float32
    hist_fraction: np.ndarray  # [U, H] float32 share of the title watched
    resume: "UserTitleSets"  # [U, N] bool partially watched (eligible for Continue Watching)
    completed: "UserTitleSets"  # [U, N] bool watched to the end

    @property
    def n(self) -> int:
        return len(self.user_ids)

    def index_of(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.user_ids)}


class UserTitleSets:
    """A [U, N] boolean (user u holds title n) where each user holds at most H titles, stored as [U, H] title
    indices (-1 = none): the dense array would be 8 GB at 200,000 users x 20,000 titles. Reads like the dense
    array: sets[u] -> [N], sets[users] -> [B, N], sets[users, titles] -> broadcast shape, sets.any(1) -> [U]."""

    def __init__(self, titles: np.ndarray, n_titles: int):
        self.titles = np.asarray(titles, dtype=np.int32)  # [U, H]
        self.n_titles = n_titles

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> "UserTitleSets":
        """From a [U, N] boolean (a world saved before the sets were stored sparse)."""
        H = max(int(dense.sum(1).max()), 1) if dense.size else 1
        order = np.argsort(~dense, axis=1, kind="stable")[:, :H]  # each user's titles first
        return cls(np.where(np.take_along_axis(dense, order, 1), order, -1), dense.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.titles), self.n_titles)

    def __getitem__(self, key):
        if isinstance(key, tuple):  # (users, titles): membership, broadcast like dense indexing
            users, titles = key
            return (self.titles[users] == np.asarray(titles)[..., None]).any(-1)
        rows = self.titles[key]  # [..., H]
        flat = rows.reshape(-1, rows.shape[-1])
        out = np.zeros((len(flat), self.n_titles + 1), dtype=bool)  # column N takes the -1 padding
        out[np.arange(len(flat))[:, None], np.where(flat >= 0, flat, self.n_titles)] = True
        return out[:, :-1].reshape(*rows.shape[:-1], self.n_titles)

    def __setitem__(self, key, value) -> None:
        """sets[user, titles] = False removes the titles (tests make titles unwatched)."""
        if value is not False or not isinstance(key, tuple):
            raise TypeError("UserTitleSets supports only sets[user, titles] = False")
        user, titles = key
        row = self.titles[user]
        row[np.isin(row, np.asarray(titles))] = -1

    def any(self, axis: int) -> np.ndarray:
        if axis != 1:
            raise ValueError("UserTitleSets.any: axis=1 (per user) only")
        return (self.titles >= 0).any(1)

    def dense(self) -> np.ndarray:
        return self[np.arange(len(self.titles))]


@dataclass
class Requests:
    """A batch of page requests. All arrays [B]."""

    hour: np.ndarray  # int8 0..23, local time
    day_of_week: np.ndarray  # int8 0=Monday .. 6=Sunday
    device: np.ndarray  # int8 into DEVICES

    def __len__(self) -> int:
        return len(self.hour)

    def take(self, idx: np.ndarray) -> "Requests":
        return Requests(self.hour[idx], self.day_of_week[idx], self.device[idx])


def sample_requests(rng: np.random.Generator, profile_type: np.ndarray) -> Requests:
    """One request per entry of `profile_type` [B]; kids watch in the afternoon, adults in the evening."""
    B = len(profile_type)
    adult_hours = np.array([1, 1, 0.5, 0.3, 0.3, 0.5, 1, 2, 2, 2, 2, 3, 4, 3, 3, 3, 4, 5, 7, 9, 10, 10, 7, 3.0])
    kids_hours = np.array([0.2, 0.1, 0.1, 0.1, 0.1, 0.3, 2, 4, 3, 2, 2, 3, 4, 5, 6, 7, 8, 8, 7, 5, 2, 0.5, 0.2, 0.2])
    hours = np.where(
        profile_type == 1,
        rng.choice(24, size=B, p=kids_hours / kids_hours.sum()),
        rng.choice(24, size=B, p=adult_hours / adult_hours.sum()),
    )
    dow = rng.integers(0, 7, size=B)
    device = rng.choice(len(DEVICES), size=B, p=[0.45, 0.3, 0.15, 0.1])
    return Requests(hours.astype(np.int8), dow.astype(np.int8), device.astype(np.int8))


USER_CHUNK_CELLS = 2 ** 24  # user x title cells per chunk of history sampling (~130 MB per float64 array)


def history_titles(rng: np.random.Generator, catalog: Catalog, taste: np.ndarray, profile: np.ndarray,
                   H: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's H history titles, drawn by appeal with Gumbel noise (top-H), and their appeal, in chunks of
    users: the [U, N] appeal is never whole (30 GB at 200,000 users x 20,000 titles). The noise is drawn chunk
    after chunk, the same stream as one [U, N] draw.  -> (titles [U, H] best first, appeal [U, H])"""
    U, N = len(taste), catalog.n
    base = catalog.quality + 0.3 * np.log(catalog.popularity)  # [N]
    mature = ~catalog.kids_safe
    order = np.empty((U, H), dtype=np.int64)
    top = np.empty((U, H))
    step = max(1, USER_CHUNK_CELLS // N)
    for s in range(0, U, step):
        e = min(U, s + step)
        appeal = taste[s:e] @ catalog.latent.T + base  # [u, N]
        appeal = np.where((profile[s:e, None] == 1) & mature[None, :], -np.inf, appeal)
        noisy = -(appeal + rng.gumbel(size=appeal.shape) * 1.5)
        part = np.argpartition(noisy, H - 1, axis=1)[:, :H] if H < N else np.tile(np.arange(N), (e - s, 1))
        part = np.take_along_axis(part, np.argsort(np.take_along_axis(noisy, part, 1), axis=1), 1)  # best first
        order[s:e], top[s:e] = part, np.take_along_axis(appeal, part, 1)
    return order, top


def make_users(
    rng: np.random.Generator,
    catalog: Catalog,
    n_users: int,
    kids_fraction: float,
    history_min: int,
    history_max: int,
    split_fractions: tuple[float, float, float],
) -> Users:
    """Samples users with genre-anchored hidden tastes and a viewing history consistent with them."""
    G, N = len(GENRES), catalog.n
    profile = (rng.random(n_users) < kids_fraction).astype(np.int8)
    language = rng.choice(len(LANGUAGES), size=n_users, p=[0.55, 0.15, 0.1, 0.1, 0.1]).astype(np.int8)

    # Taste = mixture of 2 favourite genres' latent centroids + personal noise.
    genre_latent = (catalog.genres.T.astype(np.float64) @ catalog.latent) / catalog.genres.sum(0)[:, None]  # [G, K]
    kids_genres = np.array([g in KIDS_GENRES for g in GENRES])
    logits = np.where(profile[:, None] == 1, np.where(kids_genres, 1.5, -3.0), 0.0) + rng.gumbel(size=(n_users, G))
    fav = np.argsort(-logits, axis=1)[:, :2]  # [U, 2]
    w = rng.dirichlet([2.0, 2.0], size=n_users)  # [U, 2]
    taste = (w[:, :, None] * genre_latent[fav]).sum(1) * 1.6
    taste += rng.normal(size=taste.shape) * 0.45
    genre_affinity = taste @ genre_latent.T / np.linalg.norm(genre_latent, axis=1)  # [U, G]

    patience = rng.uniform(0.78, 0.96, n_users)
    stop = rng.uniform(0.2, 0.7, n_users)
    satiation = rng.uniform(0.6, 2.0, n_users)
    col_decay = rng.uniform(0.78, 0.93, n_users)
    binge = rng.uniform(0.1, 0.7, n_users)
    abandon = rng.uniform(0.25, 0.75, n_users)
    thumbs = rng.uniform(0.05, 0.4, n_users)

    # History: titles drawn by appeal (Gumbel top-k), outcomes by match quality.
    H = history_max
    length = rng.integers(history_min, history_max + 1, size=n_users)
    order, top_appeal = history_titles(rng, catalog, taste, profile, H)  # [U, H] each
    sat = 1 / (1 + np.exp(-(top_appeal - 0.5)))  # [U, H]
    u01 = rng.random((n_users, H))
    fraction = np.where(u01 < sat, rng.uniform(0.9, 1.0, (n_users, H)), rng.uniform(0.02, 0.5, (n_users, H)))
    # A third of the titles the user would finish are still in progress: these feed Continue Watching.
    in_progress = rng.random((n_users, H)) < 0.3
    fraction = np.where(in_progress & (fraction >= 0.9), rng.uniform(0.15, 0.85, (n_users, H)), fraction)
    is_show = catalog.is_show[order]
    action = np.full((n_users, H), ACTIONS.index("play"), dtype=np.int8)
    action[fraction < 0.05] = ACTIONS.index("abandon")
    action[(fraction >= 0.9) & is_show & (rng.random((n_users, H)) < binge[:, None])] = ACTIONS.index("binge")
    action[(fraction >= 0.9) & (rng.random((n_users, H)) < thumbs[:, None])] = ACTIONS.index("thumbs_up")
    days_ago = np.sort(rng.exponential(20.0, (n_users, H)), axis=1)[:, ::-1].astype(np.float32)  # oldest first

    valid = np.arange(H)[None, :] < length[:, None]
    hist_entity = np.where(valid, order, -1).astype(np.int32)
    partial = valid & (fraction >= 0.05) & (fraction < 0.9)
    resume = UserTitleSets(np.where(partial, order, -1), N)  # a user's history titles are distinct
    completed = UserTitleSets(np.where(valid & (fraction >= 0.9), order, -1), N)

    split_draw = rng.random(n_users)
    split = np.where(split_draw < split_fractions[0], 0, np.where(split_draw < split_fractions[0] + split_fractions[1], 1, 2))
    return Users(
        user_ids=[f"user_{i:06d}" for i in range(n_users)],
        language=language,
        profile_type=profile,
        split=split.astype(np.int8),
        taste=taste.astype(np.float32),
        genre_affinity=genre_affinity.astype(np.float32),
        patience=patience.astype(np.float32),
        stop=stop.astype(np.float32),
        satiation=satiation.astype(np.float32),
        col_decay=col_decay.astype(np.float32),
        binge=binge.astype(np.float32),
        abandon=abandon.astype(np.float32),
        thumbs=thumbs.astype(np.float32),
        hist_entity=hist_entity,
        hist_action=np.where(valid, action, 0).astype(np.int8),
        hist_days_ago=np.where(valid, days_ago, 0).astype(np.float32),
        hist_fraction=np.where(valid, fraction, 0).astype(np.float32),
        resume=resume,
        completed=completed,
    )
