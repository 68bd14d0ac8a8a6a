"""vLLM adapter of the business rules: a V1 logits processor (paper section 6.3).

Installed through the `vllm.logits_processors` entry point (pyproject.toml), so every vLLM engine in the
environment loads it, including the one verl starts for rollouts. It switches itself on only for GenPage
checkpoints whose config carries `business_rules`, and a request can opt out with
`SamplingParams(extra_args={"genpage_rules": False})` (to measure what the rules change).

Kept thin: per request it tracks the page written so far (`IncrementalPage`), and each step it asks the
rule engine for the allowed-token mask of the whole batch in one vectorized call. vLLM's newer GPU model
runner has another logits-processor interface; a second adapter would reuse the same two calls.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from policies.rules import IncrementalPage, PageState, RuleSet

OPT_OUT_KEY = "genpage_rules"  # SamplingParams.extra_args key; False disables the rules for that request


class _Request:
    """One request: the page written so far (output is vLLM's live list of generated tokens)."""

    def __init__(self, rules: RuleSet, output: list[int]):
        self.output, self.page = output, IncrementalPage(rules)


class GenPageRulesLogitsProcessor(LogitsProcessor):
    """Sets the logits of tokens the mask-mode rules forbid to -inf, per request.

    Per-request tensors live in rows of batch-slot tensors (moved with vLLM's persistent batch), so a step
    costs one scatter of the new tokens and one vectorized mask for the whole batch."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        hf_config = vllm_config.model_config.hf_config
        self.rules = (RuleSet.from_model_config(hf_config, vllm_config.model_config.model)
                      if getattr(hf_config, "model_type", None) == "genpage" else None)
        self.device = device
        self.requests: dict[int, _Request] = {}
        V = self.rules.vocab_size if self.rules is not None else 0
        self.used = torch.zeros(0, V, dtype=torch.bool)  # [slots, V] tokens on the page so far
        self.resumable = torch.zeros(0, V, dtype=torch.bool)  # [slots, V] titles to resume (from the prompt)
        self.profile_ok = torch.zeros(0, V, dtype=torch.bool)  # [slots, V] titles the profile may see

    def is_argmax_invariant(self) -> bool:
        return False  # a mask changes the argmax: greedy decoding must apply it too

    def _grow(self, slot: int) -> None:
        n = self.used.shape[0]
        if slot >= n:
            extra = max(slot + 1, 2 * n) - n
            self.used = torch.cat([self.used, torch.zeros(extra, self.used.shape[1], dtype=torch.bool)])
            self.resumable = torch.cat([self.resumable, torch.zeros(extra, self.used.shape[1], dtype=torch.bool)])
            self.profile_ok = torch.cat([self.profile_ok, torch.zeros(extra, self.used.shape[1], dtype=torch.bool)])

    def _move(self, a: int, b: int, swap: bool) -> None:
        self._grow(max(a, b))
        for t in (self.used, self.resumable, self.profile_ok):
            if swap:
                t[[a, b]] = t[[b, a]]
            else:
                t[b] = t[a]

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.rules is None or not batch_update:
            return
        for i in batch_update.removed:
            self.requests.pop(i, None)
        for i, params, prompt, output in batch_update.added:
            if prompt is None or (params.extra_args or {}).get(OPT_OUT_KEY, True) is False:
                self.requests.pop(i, None)
                continue
            self._grow(i)
            resumable, profile_ok = self.rules.prompt_facts(torch.tensor([list(prompt)]), torch.tensor([len(prompt)]))
            self.used[i], self.resumable[i], self.profile_ok[i] = False, resumable[0], profile_ok[0]
            self.requests[i] = _Request(self.rules, output)
        for a, b, direction in batch_update.moved:
            swap = direction == MoveDirectionality.SWAP
            ra, rb = self.requests.pop(a, None), self.requests.pop(b, None)
            if ra is not None:
                self.requests[b] = ra
            if swap and rb is not None:
                self.requests[a] = rb
            self._move(a, b, swap)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        rows = sorted(self.requests)
        reqs = [self.requests[i] for i in rows]
        slots, toks = [], []
        for i, r in zip(rows, reqs):  # new tokens since the last step (usually one per request)
            new = r.output[r.page.seen:]
            if new:
                r.page.extend(new)
                slots += [i] * len(new)
                toks += new
        if toks:
            self.used[torch.tensor(slots), torch.tensor(toks)] = True
        idx = torch.tensor(rows)
        state = PageState(
            active=torch.tensor([r.page.active for r in reqs]),
            used=self.used[idx],
            n_rows=torch.tensor([r.page.n_rows for r in reqs]),
            row_len=torch.tensor([r.page.row_len for r in reqs]),
            cur_row=torch.tensor([r.page.cur_row for r in reqs]),
            resumable=self.resumable[idx],
            profile_ok=self.profile_ok[idx],
        )
        allowed = self.rules.allowed(state).to(logits.device)  # [N, V]
        V = allowed.shape[-1]
        didx = idx.to(logits.device)
        logits[didx, :V] = logits[didx, :V].masked_fill(~allowed, float("-inf"))
        if logits.shape[-1] > V:  # padded vocabulary: never sample padding
            logits[didx, V:] = float("-inf")
        return logits
