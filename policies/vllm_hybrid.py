"""vLLM adapter of the decoding controls (policies.hybrid): the rule masks for prompts that already hold part of
the page, plus hybrid-row and page-chunk controls, as a V1 logits processor.

The entry-point processor (policies.vllm_rules) reads a request's whole prompt as context and its output as
the page. Continuation requests (hybrid decoding re-enters the engine after each fill; paginated generation
after each chunk) carry the page so far after the prompt's last [PAGE] token, so this subclass splits the
prompt there. It acts only on requests whose `SamplingParams.extra_args` hold `DECODE_KEY` (those opt out of
the entry-point processor with `genpage_rules: False`), so both can be loaded in one engine:
`make_llm(..., logits_processors=[FQCN])` (policies.generate.make_generation_llm does this).
"""

from __future__ import annotations

import torch

from policies.hybrid import NO_LIMIT, control_logits
from policies.vllm_rules import GenPageRulesLogitsProcessor, MoveDirectionality, _Request

FQCN = "policies.vllm_hybrid:GenPageDecodeLogitsProcessor"
DECODE_KEY = "genpage_decode"  # extra_args key: {"fill_k": int, "row_limit": int, "sealed_rows": int} (NO_LIMIT = none)


class GenPageDecodeLogitsProcessor(GenPageRulesLogitsProcessor):
    """Rule masks with the page prefix read from the prompt, then `control_logits`."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self.controls: dict[int, tuple[int, int, float, int]] = {}  # slot -> (fill_k, row_limit, temperature, sealed_rows)
        pad = getattr(vllm_config.model_config.hf_config, "pad_token_id", None)
        self.stop_id = 0 if pad is None else int(pad)

    def update_state(self, batch_update) -> None:
        if self.rules is None or not batch_update:
            return
        for i in batch_update.removed:
            self.requests.pop(i, None)
            self.controls.pop(i, None)
        for i, params, prompt, output in batch_update.added:
            spec = (params.extra_args or {}).get(DECODE_KEY)
            if prompt is None or spec is None:
                self.requests.pop(i, None)
                self.controls.pop(i, None)
                continue
            prompt = list(prompt)
            start = len(prompt) - prompt[::-1].index(self.rules.page_id) if self.rules.page_id in prompt else len(prompt)
            self._grow(i)
            resumable, profile_ok = self.rules.prompt_facts(torch.tensor([prompt[:start]]), torch.tensor([start]))
            req = _Request(self.rules, output)
            req.page.extend(prompt[start:])  # the page so far (earlier rows, filled titles)
            req.page.seen = 0  # `output` holds only what this request generates
            self.used[i], self.resumable[i], self.profile_ok[i] = False, resumable[0], profile_ok[0]
            if req.page.used:
                self.used[i, list(req.page.used)] = True
            self.requests[i] = req
            self.controls[i] = (int(spec.get("fill_k", NO_LIMIT)), int(spec.get("row_limit", NO_LIMIT)),
                                float(params.temperature), int(spec.get("sealed_rows", 0)))
        for a, b, direction in batch_update.moved:
            swap = direction == MoveDirectionality.SWAP
            ra, rb = self.requests.pop(a, None), self.requests.pop(b, None)
            ca, cb = self.controls.pop(a, None), self.controls.pop(b, None)
            if ra is not None:
                self.requests[b], self.controls[b] = ra, ca
            if swap and rb is not None:
                self.requests[a], self.controls[a] = rb, cb
            self._move(a, b, swap)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        logits = super().apply(logits)  # rule masks; also brings each request's page state up to date
        rows = sorted(self.requests)
        pages = [self.requests[i].page for i in rows]
        ctl = [self.controls[i] for i in rows]
        idx = torch.tensor(rows)
        sub = control_logits(
            logits[idx.to(logits.device)], self.rules,
            n_rows=torch.tensor([p.n_rows for p in pages]), row_len=torch.tensor([p.row_len for p in pages]),
            cur_row=torch.tensor([p.cur_row for p in pages]), fill_k=torch.tensor([c[0] for c in ctl]),
            row_limit=torch.tensor([c[1] for c in ctl]), temperature=torch.tensor([c[2] for c in ctl]),
            stop_id=self.stop_id, sealed_rows=torch.tensor([c[3] for c in ctl]),
        )
        logits[idx.to(logits.device)] = sub
        return logits
