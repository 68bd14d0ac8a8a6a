"""Page-level metrics as pure functions, and the metric names used by wandb, summary.json and the plots.

Diversity follows the paper's section 7.4: the mean pairwise content-embedding distance (1 - cosine
similarity) among the entities on one page. Coverage is the share of the catalog that appears on at least
one page of a batch.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from policies.tokenizer import ENTITY_PREFIX, is_title_token

# Per-step metric names (logged by the trainer hook in rl/trainer.py; one definition for every consumer).
RM_REWARD = "rollout/rm_reward"  # reward model score of the sampled pages
FORMAT_REWARD = "rollout/format_reward"  # format score (<= 0), before its weight
TRAIN_REWARD = "rollout/reward"  # what the policy is trained on: RM + format_weight * format
TRUE_REWARD = "rollout/true_reward"  # ground-truth expected page reward (logged, never trained on)
RM_STD = "rollout/rm_ensemble_std"  # the RM ensemble members' disagreement on the sampled pages (rm_ensemble)
VALIDATOR_REWARD = "rollout/validator_reward"  # a reward model kept out of training (validator_rm_dir)
RM_TRUTH_GAP = "rollout/rm_truth_gap"  # RM score minus true reward: grows when the policy exploits the RM
RM_VALIDATOR_GAP = "rollout/rm_validator_gap"  # RM score minus the validator's: the same without the truth
RECALL = "rollout/recall"  # share of the logged impression's engaged titles on the page (offline metric)
DIVERSITY = "page/diversity"
COVERAGE = "page/coverage"
PAGE_ENTITIES = "page/entities"  # titles per page
VIOLATIONS_PREFIX = "rules/violations/"  # + rule name: mean violations per page
VIOLATING_PAGES = "rules/violating_pages"  # share of pages with any violation
KL = "actor/kl_loss"  # verl's KL-to-reference loss (with use_kl_loss)
ENTROPY = "actor/entropy"  # mean token entropy of the policy (verl's old-log-prob pass, or estimated from the samples)
ROLLOUT_PROBS_DIFF_MAX = "training/rollout_probs_diff_max"  # verl: max |p_vllm - p_trainer| over tokens
EARLY_STOP_LAST_STEP = "early_stop/last_step"  # the step the run will end at (early_stop_patience > 0)
CREDIT_SPREAD = "credit/within_page_advantage_std"  # credit=token: how far a page's tokens' advantages differ

# Keys of the per-page reward_extra_info the reward manager returns (verl stores them per sample).
EXTRA_RM, EXTRA_FORMAT, EXTRA_TRUE, EXTRA_RECALL, EXTRA_DIVERSITY, EXTRA_ENTITIES = (
    "rm_reward", "format_reward", "true_reward", "recall", "diversity", "n_entities")
EXTRA_RM_STD, EXTRA_VALIDATOR = "rm_std", "validator_reward"
EXTRA_VIOLATIONS_PREFIX = "violations/"
EXTRA_TOKEN_REWARD = "token_rewards"  # per-token training reward of a page, padded to the response width (credit=token)


def token_entity_index(token_names: list[str], entity_index: dict[str, int]) -> np.ndarray:
    """[V] catalog index of each title token ("ent:<id>"), -1 for other tokens and titles not in entity_index."""
    out = np.full(len(token_names), -1, dtype=np.int64)
    for t, name in enumerate(token_names):
        if is_title_token(name):
            out[t] = entity_index.get(name[len(ENTITY_PREFIX):], -1)
    return out


def page_entities(page_ids: Iterable[int], token_entity: np.ndarray, eop_id: int) -> np.ndarray:
    """Catalog indices of the titles on a page, in layout order (tokens after [EOP] ignored)."""
    ids = np.asarray(list(page_ids), dtype=np.int64)
    end = np.flatnonzero(ids == eop_id)
    ids = ids[: end[0]] if len(end) else ids
    ids = ids[(ids >= 0) & (ids < len(token_entity))]
    ents = token_entity[ids]
    return ents[ents >= 0]


def page_diversity(entities: list[np.ndarray], content: np.ndarray) -> np.ndarray:
    """[B] mean pairwise content distance 1 - cos(c_i, c_j) over pairs of titles on each page (paper 7.4).

    entities: per page, catalog indices of its titles; content: [N, D] content embeddings. A page with fewer
    than two titles has diversity 0. A title shown twice counts as a pair at distance 0.
    """
    unit = content / np.maximum(np.linalg.norm(content, axis=1, keepdims=True), 1e-12)  # [N, D]
    out = np.zeros(len(entities))
    for b, ents in enumerate(entities):
        k = len(ents)
        if k < 2:
            continue
        c = unit[ents]  # [k, D]
        sim = c @ c.T  # [k, k]
        out[b] = float((1.0 - sim)[np.triu_indices(k, 1)].mean())
    return out


def catalog_coverage(entities: list[np.ndarray], n_entities: int) -> float:
    """Share of the catalog's titles that appear on at least one of the pages."""
    if n_entities <= 0:
        return 0.0
    seen = np.unique(np.concatenate([np.asarray(e, dtype=np.int64) for e in entities])) if entities else np.array([])
    return float(len(seen)) / n_entities


def rollout_metrics(extra: dict[str, np.ndarray], train_reward: np.ndarray) -> dict[str, float]:
    """Per-step means from the reward manager's per-page extra info ([B] arrays) and the training reward [B]."""
    m: dict[str, float] = {TRAIN_REWARD: float(np.mean(train_reward))}
    names = {EXTRA_RM: RM_REWARD, EXTRA_FORMAT: FORMAT_REWARD, EXTRA_TRUE: TRUE_REWARD, EXTRA_RECALL: RECALL,
             EXTRA_DIVERSITY: DIVERSITY, EXTRA_ENTITIES: PAGE_ENTITIES, EXTRA_RM_STD: RM_STD,
             EXTRA_VALIDATOR: VALIDATOR_REWARD}
    for key, name in names.items():
        values = np.asarray(extra.get(key, []), dtype=np.float64)
        if np.isfinite(values).any():  # true reward without an environment, recall without engaged titles: NaN
            m[name] = float(np.nanmean(values))
    rm = np.asarray(extra.get(EXTRA_RM, []), dtype=np.float64)
    for key, name in ((EXTRA_TRUE, RM_TRUTH_GAP), (EXTRA_VALIDATOR, RM_VALIDATOR_GAP)):
        other = np.asarray(extra.get(key, []), dtype=np.float64)
        if len(other) == len(rm) and np.isfinite(other).any():
            m[name] = float(np.nanmean(rm - other))
    violations = {k[len(EXTRA_VIOLATIONS_PREFIX):]: np.asarray(v, dtype=np.float64)
                  for k, v in extra.items() if k.startswith(EXTRA_VIOLATIONS_PREFIX)}
    for rule, counts in violations.items():
        m[VIOLATIONS_PREFIX + rule] = float(counts.mean())
    if violations:
        m[VIOLATING_PAGES] = float((np.sum(list(violations.values()), axis=0) > 0).mean())
    return m
