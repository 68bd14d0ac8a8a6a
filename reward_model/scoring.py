"""The reward model as a scorer for RL: a batch of (prompt ids, page ids) -> page rewards in reward units.

    scorer = PageRewardScorer.from_pretrained("runs/rm/model")
    rewards = scorer.score(prompts, pages)  # np.ndarray [N]
    per_token = scorer.score_tokens(prompts, pages)  # N arrays [len(page)], each summing to its page's reward

Prompts are the tokenizer's context ids (ending with [PAGE]); pages are page token ids, with or without the
final [EOP] (appended when missing: pages are scored as they were trained, [EOP] included). The normalization
the model was trained with (`config.reward_mean`, `config.reward_std`) is undone, so scores are page rewards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from policies.modeling_genpage import GenPageForPageReward
from reward_model.data import collate_pages
from reward_model.training import predict


class PageRewardScorer:
    """A trained GenPage reward model in eval mode, scoring in batches of `batch_size` sequences."""

    def __init__(self, model: GenPageForPageReward, pad_id: int, eop_id: int, batch_size: int = 128):
        self.model = model.eval()
        self.pad_id, self.eop_id, self.batch_size = pad_id, eop_id, batch_size
        self.reward_mean = float(model.config.reward_mean)
        self.reward_std = float(model.config.reward_std)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "cpu", batch_size: int = 128) -> "PageRewardScorer":
        """Loads a reward-model directory written by recipes/train_rm.py (or one of its checkpoints)."""
        from transformers import AutoModelForSequenceClassification

        import policies  # noqa: F401  (registers GenPage with the Auto classes)

        config_path = Path(model_dir) / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} not found: train a reward model with `python recipes/train_rm.py`")
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).to(device)
        if not isinstance(model, GenPageForPageReward):
            raise ValueError(f"{model_dir} holds a {type(model).__name__}, not a GenPage reward model")
        if "GenPageForPageReward" not in (model.config.architectures or []):
            raise ValueError(f"{model_dir} is not a trained reward model (architectures {model.config.architectures}); "
                             "its head would be untrained: point to runs/rm/model")
        return cls(model, model.config.pad_token_id, model.config.eos_token_id, batch_size)

    def score(self, prompts: list[list[int]], pages: list[list[int]]) -> np.ndarray:
        """Page rewards of (context, page) pairs.  -> [N] float64 in reward units."""
        if len(prompts) != len(pages):
            raise ValueError(f"{len(prompts)} prompts but {len(pages)} pages; give one page per prompt")
        if not prompts:
            return np.zeros(0)
        z = predict(self.model, prompts, pages, self.pad_id, self.eop_id, self.batch_size)  # [N] standardized
        return z * self.reward_std + self.reward_mean

    def score_tokens(self, prompts: list[list[int]], pages: list[list[int]]) -> list[np.ndarray]:
        """Each page token's share of its page reward, for heads that read a page as the sum of per-token rewards
        ("entity_feedback", "entity_sum"): the reward the head gives that token, in reward units. A page without
        its final [EOP] is scored with one appended, and that token's reward is added to the page's last token,
        so each array sums to the page's `score` (an empty page gets an empty array).  -> N arrays [len(page)] float64"""
        if len(prompts) != len(pages):
            raise ValueError(f"{len(prompts)} prompts but {len(pages)} pages; give one page per prompt")
        out: list[np.ndarray] = [np.zeros(0)] * len(pages)
        order = np.argsort([len(p) + len(g) for p, g in zip(prompts, pages)], kind="stable")
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = collate_pages([prompts[i] for i in idx], [pages[i] for i in idx], self.pad_id, self.eop_id)
                token_rewards = self.model(**{k: v.to(device) for k, v in batch.items()}).token_rewards  # [b, T]
                if token_rewards is None:
                    raise ValueError(f"the reward model's head {self.model.config.reward_head!r} has no per-token "
                                     "rewards: token credit needs a reward model trained with reward_head="
                                     "entity_feedback or entity_sum")
                token_rewards = token_rewards.double().cpu().numpy()
                for row, i in enumerate(idx):
                    start, n = len(prompts[i]), len(pages[i])
                    r = token_rewards[row, start:start + n].copy()  # [n] the page's own tokens
                    if n and pages[i][-1] != self.eop_id:  # the appended [EOP]'s reward goes to the last token
                        r[-1] += token_rewards[row, start + n]
                    out[i] = r
        return out


def conservative(member_scores: np.ndarray, k: float) -> np.ndarray:
    """Ensemble score scored conservatively: the members' mean minus k times their standard deviation (the
    "uncertainty-weighted optimization" of Coste et al., 2023, "Reward Model Ensembles Help Mitigate
    Overoptimization"): where the members disagree, the page is worth less.

    member_scores [K, N] -> [N]; one member gives its own scores."""
    s = np.asarray(member_scores, dtype=np.float64)
    if s.ndim != 2 or not len(s):
        raise ValueError(f"member scores must be [K, N] with K >= 1, not shape {s.shape}")
    return s.mean(0) - k * s.std(0) if len(s) > 1 else s[0].copy()


class EnsembleScorer:
    """Several reward models scoring the same pages as one conservative reward (`conservative`).

    `score` and `score_tokens` have PageRewardScorer's contract, so a PageJudge takes either: the per-token
    rewards are the members' mean per token, with the page's -k * std on its last token, so each page's tokens
    still sum to its `score`."""

    def __init__(self, members: list, k: float = 1.0):
        if not members:
            raise ValueError("an ensemble needs at least one reward model")
        if k < 0:
            raise ValueError(f"k={k}: a conservative ensemble subtracts k >= 0 standard deviations")
        self.members, self.k = list(members), float(k)

    @classmethod
    def from_dirs(cls, model_dirs, k: float = 1.0, device: str = "cpu", batch_size: int = 128) -> "EnsembleScorer":
        return cls([PageRewardScorer.from_pretrained(d, device, batch_size) for d in model_dirs], k)

    def member_scores(self, prompts: list[list[int]], pages: list[list[int]]) -> np.ndarray:
        """-> [K, N] each member's page rewards."""
        return np.stack([m.score(prompts, pages) for m in self.members])

    def score(self, prompts: list[list[int]], pages: list[list[int]]) -> np.ndarray:
        """-> [N] mean - k * std over the members."""
        return self.score_with_spread(prompts, pages)[0]

    def score_tokens(self, prompts: list[list[int]], pages: list[list[int]]) -> list[np.ndarray]:
        """-> N arrays [len(page)]: the members' mean per-token reward, the page's -k * std on its last token."""
        return self.score_with_spread(prompts, pages, per_token=True)[2]

    def score_with_spread(self, prompts: list[list[int]], pages: list[list[int]], per_token: bool = False):
        """One pass of every member -> (score [N], the members' std [N], per-token rewards or None)."""
        if not per_token:
            members = self.member_scores(prompts, pages)  # [K, N]
            return conservative(members, self.k), members.std(0), None
        per_member = [m.score_tokens(prompts, pages) for m in self.members]  # K lists of N arrays
        out, spread = [], np.zeros(len(pages))
        for i in range(len(pages)):
            tokens = np.stack([p[i] for p in per_member])  # [K, len(page)]
            spread[i] = tokens.sum(1).std()
            r = tokens.mean(0)
            if r.size and len(self.members) > 1:
                r[-1] -= self.k * spread[i]
            out.append(r)
        return np.array([t.sum() for t in out], dtype=np.float64), spread, out
