"""Page generation with transformers `generate` (the fallback without vLLM), optionally under rule masks."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from policies.data import pad_batch
from policies.tokenizer import GenPageTokenizer

MASK_VALUE = -1e9  # large finite negative, not -inf: entropy stays finite (0 * -inf is NaN)


class RuleMaskProcessor(LogitsProcessor):
    """HF adapter of the business rules: masks the tokens the rule engine forbids, per batch row.

    rules: a policies.rules.RuleSet; prompts: the unpadded prompts; prompt_width: the left-padded prompt
    width of `input_ids` (generated tokens start there)."""

    def __init__(self, rules, prompts: list[list[int]], prompt_width: int):
        self.rules, self.prompts, self.width = rules, prompts, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.rules.allowed_step(self.prompts, input_ids[:, self.width:].tolist())  # [B, V]
        V = allowed.shape[-1]
        scores[:, :V] = scores[:, :V].masked_fill(~allowed.to(scores.device), MASK_VALUE)
        return scores


def generate_pages_hf(model, tok: GenPageTokenizer, prompts: list[list[int]], temperature: float,
                      max_new_tokens: int, rules=None, batch_size: int = 64) -> list[list[int]]:
    """Page token ids per prompt (ending at [EOP] when generated). temperature 0 = greedy.
    rules: a RuleSet whose mask-mode rules are enforced (None: unconstrained)."""
    model.eval()
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        ids, mask = pad_batch(chunk, tok.pad_id, side="left")  # [B, T] each
        T = ids.shape[1]
        kw = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
        if rules is not None:
            kw["logits_processor"] = LogitsProcessorList([RuleMaskProcessor(rules, chunk, T)])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=tok.eop_id, pad_token_id=tok.pad_id, **kw)
        for row in gen[:, T:].tolist():
            out.append(row[: row.index(tok.eop_id) + 1] if tok.eop_id in row else row)
    return out
