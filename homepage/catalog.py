"""The catalog: entities (movies, shows, games) and the rows a homepage is made of.

Observable attributes (ids, type, genres, maturity, release day, popularity, language, runtime, content
embedding) are what a production system would have. `latent` and `quality` are the simulator's hidden
truth: they drive user behaviour and are never written to the logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENTITY_TYPES: tuple[str, ...] = ("movie", "show", "game")
GENRES: tuple[str, ...] = (
    "action", "comedy", "drama", "thriller", "horror", "romance", "scifi", "documentary", "animation", "family",
)
KIDS_GENRES: frozenset[str] = frozenset({"animation", "family", "comedy", "documentary"})
MATURITY: tuple[str, ...] = ("kids", "teen", "mature")  # kids-safe == "kids"
LANGUAGES: tuple[str, ...] = ("en", "es", "fr", "ko", "ja")

# Special rows (paper section 1): their eligibility is not a genre.
CONTINUE_WATCHING = "continue_watching"  # only titles the user partially watched (user dependent)
TRENDING = "trending_now"  # only titles flagged trending at world time
NEW_RELEASES = "new_releases"  # only titles released within `new_title_days`
KIDS = "kids"  # only kids-safe titles
SPECIAL_ROWS: tuple[str, ...] = (CONTINUE_WATCHING, TRENDING, NEW_RELEASES, KIDS)


def genre_row_id(genre: str) -> str:
    return f"genre_{genre}"


ROW_IDS: tuple[str, ...] = tuple(genre_row_id(g) for g in GENRES) + SPECIAL_ROWS


@dataclass
class Catalog:
    """All entities of the world; arrays are indexed by entity index n in [0, N)."""

    entity_ids: list[str]  # [N] stable string ids, e.g. "movie_0007"; what logs carry
    entity_type: np.ndarray  # [N] int8 index into ENTITY_TYPES
    genres: np.ndarray  # [N, G] bool, at least one genre each
    maturity: np.ndarray  # [N] int8 index into MATURITY
    release_day: np.ndarray  # [N] int32 days relative to world "today" (<= 0)
    popularity: np.ndarray  # [N] float32 > 0, long tailed
    language: np.ndarray  # [N] int8 index into LANGUAGES
    runtime_min: np.ndarray  # [N] float32 minutes (per episode for shows, per session for games)
    content_emb: np.ndarray  # [N, D] float32 unit-norm stand-in for synopsis/cast embeddings
    latent: np.ndarray  # [N, K] float32 hidden taste factors (simulator only)
    quality: np.ndarray  # [N] float32 hidden quality (simulator only)
    trending: np.ndarray  # [N] bool
    new_title_days: int  # a title is "new" when released within this many days

    @property
    def n(self) -> int:
        return len(self.entity_ids)

    @property
    def is_new(self) -> np.ndarray:
        return self.release_day > -self.new_title_days  # [N] bool

    @property
    def kids_safe(self) -> np.ndarray:
        return self.maturity == MATURITY.index("kids")  # [N] bool

    @property
    def is_show(self) -> np.ndarray:
        return self.entity_type == ENTITY_TYPES.index("show")  # [N] bool

    def index_of(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.entity_ids)}

    def row_static_eligibility(self) -> np.ndarray:
        """[R, N] bool: which entities may appear in each row, before user-dependent rules.

        Continue Watching is all-True here; the user's partially watched set narrows it (`Users.resume`).
        """
        elig = np.zeros((len(ROW_IDS), self.n), dtype=bool)
        for g in range(len(GENRES)):
            elig[g] = self.genres[:, g]
        elig[ROW_IDS.index(CONTINUE_WATCHING)] = True
        elig[ROW_IDS.index(TRENDING)] = self.trending
        elig[ROW_IDS.index(NEW_RELEASES)] = self.is_new
        elig[ROW_IDS.index(KIDS)] = self.kids_safe
        return elig

    def row_genre(self) -> np.ndarray:
        """[R] int genre index of each row, -1 for special rows."""
        return np.array([i if i < len(GENRES) else -1 for i in range(len(ROW_IDS))], dtype=np.int64)


def make_catalog(
    rng: np.random.Generator,
    n_entities: int,
    content_dim: int,
    latent_dim: int,
    new_title_days: int = 30,
    new_title_fraction: float = 0.08,
    trending_fraction: float = 0.12,
    franchise_fraction: float = 0.3,
) -> Catalog:
    """Samples a catalog whose content embeddings are informative of the hidden taste factors.

    Titles cluster by genre; a share of them belong to franchises (sequels, spin-offs) whose content
    embeddings are near-duplicates, which is what makes satiation matter on a page.
    """
    G = len(GENRES)
    types = rng.choice(len(ENTITY_TYPES), size=n_entities, p=[0.5, 0.35, 0.15]).astype(np.int8)
    primary = rng.integers(0, G, size=n_entities)
    genres = np.zeros((n_entities, G), dtype=bool)
    genres[np.arange(n_entities), primary] = True
    second = rng.integers(0, G, size=n_entities)
    has_second = rng.random(n_entities) < 0.35
    genres[np.arange(n_entities)[has_second], second[has_second]] = True

    kids_genre_mask = np.array([g in KIDS_GENRES for g in GENRES])
    kid_friendly = genres[:, ~kids_genre_mask].sum(1) == 0  # only kids genres
    maturity = np.where(
        kid_friendly,
        rng.choice(3, size=n_entities, p=[0.75, 0.2, 0.05]),
        rng.choice(3, size=n_entities, p=[0.02, 0.45, 0.53]),
    ).astype(np.int8)
    horror = genres[:, GENRES.index("horror")]
    maturity[horror] = 2

    is_new = rng.random(n_entities) < new_title_fraction
    release_day = np.where(
        is_new, -rng.integers(0, new_title_days, size=n_entities), -rng.integers(new_title_days, 3000, size=n_entities)
    ).astype(np.int32)
    popularity = np.exp(rng.normal(0.0, 1.0, size=n_entities)).astype(np.float32)
    language = rng.choice(len(LANGUAGES), size=n_entities, p=[0.55, 0.15, 0.1, 0.1, 0.1]).astype(np.int8)
    runtime = np.where(
        types == 0, rng.normal(110, 20, n_entities), np.where(types == 1, rng.normal(45, 10, n_entities), 40.0)
    ).clip(15, 200).astype(np.float32)

    # Content embeddings: genre centroids + franchise offset + title noise.
    genre_centroids = rng.normal(size=(G, content_dim))
    base = genres.astype(np.float64) @ genre_centroids / genres.sum(1, keepdims=True)
    n_franchises = max(1, int(n_entities * franchise_fraction / 4))
    franchise = np.where(rng.random(n_entities) < franchise_fraction, rng.integers(0, n_franchises, n_entities), -1)
    franchise_offsets = rng.normal(size=(n_franchises, content_dim)) * 1.2
    emb = base + np.where(franchise[:, None] >= 0, franchise_offsets[franchise.clip(0)], 0.0)
    noise_scale = np.where(franchise >= 0, 0.15, 0.7)[:, None]
    emb = emb + rng.normal(size=(n_entities, content_dim)) * noise_scale
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)

    # Hidden taste factors: mostly a projection of the content embedding (so content predicts appeal,
    # which is what makes cold start solvable), plus what content does not capture.
    proj = rng.normal(size=(content_dim, latent_dim)) / np.sqrt(content_dim)
    latent = emb @ proj * 2.0 + rng.normal(size=(n_entities, latent_dim)) * 0.35
    quality = rng.normal(0.0, 0.6, size=n_entities) + 0.25 * np.log(popularity)

    trend_score = np.log(popularity) + 1.5 * is_new + rng.normal(0, 0.5, n_entities)
    trending = trend_score >= np.quantile(trend_score, 1.0 - trending_fraction)

    prefix = np.array(ENTITY_TYPES)[types]
    entity_ids = [f"{p}_{i:04d}" for i, p in enumerate(prefix)]
    return Catalog(
        entity_ids=entity_ids,
        entity_type=types,
        genres=genres,
        maturity=maturity,
        release_day=release_day,
        popularity=popularity,
        language=language,
        runtime_min=runtime,
        content_emb=emb.astype(np.float32),
        latent=latent.astype(np.float32),
        quality=quality.astype(np.float32),
        trending=trending,
        new_title_days=new_title_days,
    )
