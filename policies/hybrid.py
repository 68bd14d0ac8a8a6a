"""Hybrid row decoding (paper section 6.4) and page-chunk limits (section 2.3) on top of the rule masks.

Hybrid row decoding: a row's token and its first k titles are decoded autoregressively; at the next position
(the "fill point") one forward pass gives the logits of every title, and the row is completed with the
top-scoring titles the rules allow there (greedy), or titles drawn without replacement at the sampling
temperature (Gumbel top-m). The token the decoder writes at the fill point is the fill's first title, so
greedy hybrid decoding and greedy autoregressive decoding agree up to that point. If that token closes the
row instead (a row token or [EOP], allowed once a row has min_row_len titles), the row is not filled. With
k >= max_row_len no fill point exists and decoding is plain autoregressive.

Decode steps (model forward passes that write a page): autoregressive, one per page token; hybrid, per row
one for the row token, k for the titles and one at the fill point, since the filled titles go through the
model together in the pass that writes the next row token: k + 2 per row instead of row length + 1.

Page-chunk limits (paginated generation): a request may carry a row limit (rows on the page, earlier pages
included). Once the page holds that many rows, the row tokens' probability mass moves to a stop token, so the
chunk ends exactly when the model would have opened another row (greedy: when a row token is the argmax;
sampled: with the total probability of the row tokens) and [EOP] still ends the whole homepage.

Everything here is a pure function of the page state; `policies.vllm_hybrid` (vLLM logits processor) and the
HF decoding loop in `policies.generate` are the two adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from policies.rules import IncrementalPage, RuleSet

NO_LIMIT = -1  # tensor value of "no fill point" / "no row limit"


@dataclass(frozen=True)
class HybridConfig:
    """How a row is written: autoregressively up to `fill_k` titles, then filled in one pass."""

    fill_k: int | None = None  # titles decoded autoregressively per row before the one-pass fill; None: plain decoding
    fill_row_len: int = 5  # the row length the fill completes a row to (capped by the rules' max_row_len);
    # 5: the length the pretrained model writes most rows with when decoding alone (docs/generation.md)

    def __post_init__(self) -> None:
        if self.fill_k is not None and self.fill_k < 0:
            raise ValueError(f"hybrid fill_k must be >= 0 or None (plain decoding), got {self.fill_k}")
        if self.fill_row_len < 1:
            raise ValueError(f"hybrid fill_row_len must be >= 1, got {self.fill_row_len}")

    def active_k(self, rules: RuleSet) -> int:
        """The fill point's row length, or NO_LIMIT when no row is ever filled (plain decoding)."""
        if self.fill_k is None or self.fill_k >= rules.config.shape.max_row_len:
            return NO_LIMIT
        return self.fill_k

    def target_len(self, rules: RuleSet) -> int:
        s = rules.config.shape
        return max(s.min_row_len, min(self.fill_row_len, s.max_row_len))


def control_logits(logits: torch.Tensor, rules: RuleSet, n_rows: torch.Tensor, row_len: torch.Tensor,
                   cur_row: torch.Tensor, fill_k: torch.Tensor, row_limit: torch.Tensor,
                   temperature: torch.Tensor, stop_id: int, sealed_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Applies the decoding controls to already rule-masked logits [N, V'] (V' >= V, padded vocabulary ok).

    n_rows, row_len, cur_row: [N] page state (policies.rules.PageState fields); fill_k: [N] fill point per
    request (NO_LIMIT: none); row_limit: [N] rows after which the chunk stops (NO_LIMIT: none);
    temperature: [N] (0: greedy); sealed_rows: [N] rows of earlier pages, final (default 0). A filled row
    (row_len > fill_k) or a sealed row takes no more titles; at the row limit the row tokens' mass moves to
    `stop_id`: logit T * logsumexp(l_rows / T) (their total probability at temperature T), max(l_rows) when
    greedy. Disallowed logits are -inf and stay so."""
    s = rules.config.shape
    V = rules.vocab_size
    neg = float("-inf")
    closable = (cur_row >= 0) & (row_len >= s.min_row_len)  # [N] a row is open and may end here
    filled = closable & (fill_k >= 0) & (row_len > fill_k)  # [N]
    if sealed_rows is not None:
        filled = filled | (closable & (n_rows <= sealed_rows))
    if filled.any():
        ban = filled[:, None] & rules.is_entity[None, :].to(logits.device)  # [N, V]
        logits[:, :V] = logits[:, :V].masked_fill(ban.to(logits.device), neg)
    at_limit = (row_limit >= 0) & (n_rows >= row_limit)  # [N]
    if at_limit.any():
        idx = at_limit.nonzero().flatten().to(logits.device)
        rows = logits[idx][:, rules.row_token.to(logits.device)]  # [n, R]
        t = temperature[at_limit].to(logits.device, logits.dtype)[:, None]  # [n, 1]
        greedy = t <= 1e-5
        lse = torch.logsumexp(rows / t.clamp(min=1e-5), -1, keepdim=True) * t
        merged = torch.where(greedy, rows.max(-1, keepdim=True).values, lse).squeeze(-1)  # [n]
        merged = torch.where(torch.isnan(merged), torch.full_like(merged, neg), merged)  # all rows -inf
        logits[idx, stop_id] = merged
        sub = logits[idx]
        sub[:, rules.row_token.to(logits.device)] = neg
        logits[idx] = sub
    return logits


def is_fill_point(page: IncrementalPage, fill_k: int) -> bool:
    """Whether the next token of this page prefix is written at a fill point (row open with fill_k titles)."""
    return fill_k != NO_LIMIT and page.active and page.cur_row >= 0 and page.row_len == fill_k


def tokens_to_fill_point(page: IncrementalPage, fill_k: int) -> int | None:
    """Tokens to generate from this prefix up to and including the next fill point's token, assuming the
    model does not close the current row early; None without a fill point (plain decoding)."""
    if fill_k == NO_LIMIT:
        return None
    if page.cur_row >= 0 and page.row_len <= fill_k:
        return fill_k - page.row_len + 1
    return fill_k + 2  # a row token, fill_k titles, then the fill point's token


def allowed_fill(rules: RuleSet, prompt: list[int], page: list[int], fill: list[int]) -> list[int]:
    """The longest head of `fill` that the rule masks allow title by title after `page` (the page prefix,
    the fill point's title included). The fill's titles were allowed at the fill point, but the structure
    rule's look-ahead can stop the row from growing further (the rows still needed must stay fillable)."""
    if not fill:
        return fill
    allowed = rules.allowed_step([prompt] * len(fill), [page + fill[:i] for i in range(len(fill))])  # [m, V]
    ok = allowed[torch.arange(len(fill)), torch.tensor(fill)]  # [m]
    return fill[:int(ok.long().cumprod(0).sum())]


def select_fill(first: int, candidates: list[int], scores: np.ndarray, m: int, greedy: bool,
                rng: np.random.Generator | None) -> list[int]:
    """The row's fill after `first` (the title written at the fill point): `m` more distinct titles from
    `candidates` (allowed titles at the fill point, `first` excluded) with log-probs `scores` [M] at the
    sampling temperature. Greedy: the m best, best first; sampled: Gumbel top-m, i.e. m draws without
    replacement from softmax(scores)."""
    if m <= 0 or not candidates:
        return []
    keys = np.asarray(scores, dtype=np.float64)
    if not greedy:
        keys = keys + (rng or np.random.default_rng()).gumbel(size=len(keys))
    order = np.argsort(-keys, kind="stable")[:m]
    return [int(candidates[i]) for i in order]
