"""Page generation API: user contexts in, structured homepages out, under the business-rule masks.

    python -m policies.generate --model runs/pretrain/model --users 10 [--backend vllm|hf] [--temperature 0]
                                [--hybrid-k 1] [--rows-per-page 2 --pages 3] [--data runs/world]

`PageGenerator` serves one checkpoint on vLLM (default) or HF transformers (fallback, no vLLM needed), greedy
(temperature 0) or sampled, with plain autoregressive or hybrid row decoding (policies.hybrid, paper section
6.4); `policies.pagination.paginate` builds on it for paginated homepages with in-session feedback (section
2.3). Both backends run the same rule engine (policies.rules) and the same decoding controls
(policies.hybrid.control_logits): on vLLM through the logits processor of policies.vllm_hybrid, on HF in the
decoding loop below (a KV-cached loop rather than `model.generate`, because a hybrid fill appends several
tokens to some rows of the batch at once).

Every page reports its decode steps (forward passes that wrote it: one per generated token on either
backend, the filled titles excluded since they enter the model together in the next pass).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from homepage.logs import Context
from homepage.pages import Page
from policies.hybrid import (NO_LIMIT, HybridConfig, allowed_fill, control_logits, is_fill_point, select_fill,
                             tokens_to_fill_point)
from policies.data import pad_batch
from policies.rules import IncrementalPage, PageState, RuleSet
from policies.tokenizer import GenPageTokenizer

BACKENDS = ("vllm", "hf")
MAX_LOGPROBS = 64  # engine cap on per-position log-probs (the fill reads the top ones at the fill point)


@dataclass
class DecodeResult:
    """What one request wrote.

    page_ids: tokens written after the prompt and prefix ([EOP] included when written; no stop token)
    decode_steps: model forward passes that wrote them (one per generated token; filled titles excluded)
    filled_titles: titles placed by the hybrid fill
    at_row_limit: the request stopped because the page reached its row limit (paginated generation)
    """

    page_ids: list[int]
    decode_steps: int = 0
    filled_titles: int = 0
    at_row_limit: bool = False


@dataclass
class GeneratedPage:
    """One generated homepage.

    prompt_ids: the prompt it was written for; page_ids: its tokens ([EOP] included when written);
    page: its rows and titles; decode_steps, filled_titles: as in DecodeResult."""

    prompt_ids: list[int]
    page_ids: list[int]
    page: Page
    decode_steps: int
    filled_titles: int


def make_generation_llm(model_dir: str | Path, seed: int = 0, **kwargs):
    """vLLM engine for PageGenerator: the entry-point rule processor plus policies.vllm_hybrid's, and
    processed (masked) log-probs, which the hybrid fill reads. Plain `vllm_engine.generate` calls on it are
    masked by the entry-point processor as usual. Create it under `if __name__ == "__main__":`."""
    from policies import vllm_engine
    from policies.vllm_hybrid import FQCN

    args = dict(logits_processors=[FQCN], logprobs_mode="processed_logprobs", max_logprobs=MAX_LOGPROBS, block_size=32)
    args.update(kwargs)
    return vllm_engine.make_llm(model_dir, seed=seed, **args)


class PageGenerator:
    """Generates homepages from one GenPage checkpoint (with business_rules in its config)."""

    def __init__(self, model_dir: str | Path, backend: str = "vllm", seed: int = 0, llm=None, model=None,
                 hf_batch_size: int = 64):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model_dir, self.backend, self.seed = Path(model_dir), backend, seed
        self.tok = GenPageTokenizer.from_pretrained(model_dir)
        self.rules = RuleSet.from_pretrained(model_dir)
        self.stop_id = self.tok.pad_id  # the chunk-stop token of paginated generation (never on a page)
        self.hf_batch_size = hf_batch_size
        self.rng = np.random.default_rng(seed)  # hybrid fill sampling
        self.llm = self.model = None
        if backend == "vllm":
            self.llm = llm if llm is not None else make_generation_llm(model_dir, seed)
        else:
            if model is None:
                from transformers import AutoModelForCausalLM

                import policies  # noqa: F401  (registers GenPage with the Auto classes)

                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            self.model = model.eval()

    @property
    def max_page_tokens(self) -> int:
        return self.rules.config.shape.max_tokens

    # -- public API -------------------------------------------------------------------------------------------
    def prompts(self, contexts: list[Context]) -> list[list[int]]:
        return [self.tok.encode_context(c) for c in contexts]

    def generate(self, contexts: list[Context] | list[list[int]], temperature: float = 0.0,
                 hybrid: HybridConfig = HybridConfig(), n: int = 1) -> list[GeneratedPage]:
        """One homepage per context (n per context, grouped by context). contexts: Context objects or
        prompt token ids. temperature 0 = greedy; hybrid: row decoding (default plain autoregressive)."""
        prompts = contexts if contexts and isinstance(contexts[0], list) else self.prompts(contexts)
        results = self.decode(prompts, temperature=temperature, hybrid=hybrid, n=n)
        out = []
        for p, res in zip(prompts, results):
            for r in res:
                out.append(GeneratedPage(p, r.page_ids, self.tok.decode(r.page_ids, strict=False), r.decode_steps,
                                         r.filled_titles))
        return out

    def decode(self, prompts: list[list[int]], prefixes: list[list[int]] | None = None, temperature: float = 0.0,
               hybrid: HybridConfig = HybridConfig(), row_limits: list[int] | None = None, n: int = 1,
               max_page_tokens: int | None = None) -> list[list[DecodeResult]]:
        """The general entry: n continuations per prompt (list per prompt).

        prompts: token ids ending with [PAGE]; prefixes: page tokens already written (earlier pages' rows),
        counted by the rules (dedup, rows, pins) and final (their last row takes no more titles); row_limits: per prompt, the page's row count at which the
        request stops (NO_LIMIT or None: none); max_page_tokens: budget of tokens per page (prefix included;
        default: the most a page can hold under the rules)."""
        N = len(prompts)
        prefixes = prefixes or [[] for _ in range(N)]
        row_limits = [NO_LIMIT if r is None else r for r in (row_limits or [NO_LIMIT] * N)]
        budget = max_page_tokens or self.max_page_tokens
        if self.backend == "vllm":
            return self._decode_vllm(prompts, prefixes, temperature, hybrid, row_limits, n, budget)
        return self._decode_hf(prompts, prefixes, temperature, hybrid, row_limits, n, budget)

    # -- vLLM -------------------------------------------------------------------------------------------------
    def _decode_vllm(self, prompts, prefixes, temperature, hybrid, row_limits, n, budget) -> list[list[DecodeResult]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from policies.vllm_hybrid import DECODE_KEY
        from policies.vllm_rules import OPT_OUT_KEY

        k = hybrid.active_k(self.rules)
        target = hybrid.target_len(self.rules)
        stops = [self.tok.eop_id, self.stop_id]

        def params(max_tokens: int, row_limit: int, prefix: list[int], n_: int = 1, logprobs: int | None = None):
            spec = {"fill_k": k, "row_limit": row_limit, "sealed_rows": self._rows(prefix)}
            return SamplingParams(n=n_, temperature=temperature, max_tokens=max(1, max_tokens), stop_token_ids=stops,
                                  detokenize=False, logprobs=logprobs, extra_args={OPT_OUT_KEY: False, DECODE_KEY: spec})

        if k == NO_LIMIT:  # plain decoding: one engine call, n samples share the prompt
            sps = [params(budget - len(pre), rl, pre, n) for pre, rl in zip(prefixes, row_limits)]
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p + pre) for p, pre in zip(prompts, prefixes)],
                                     sps, use_tqdm=False)
            return [[self._finish(list(c.token_ids)) for c in o.outputs] for o in outs]

        # Hybrid: rounds of engine calls, each running every open request to its next fill point.
        s = self.rules.config.shape
        fill_logprobs = min(MAX_LOGPROBS, target + (0 if k < s.min_row_len else len(self.rules.row_token) + 1))
        reqs = [_Request(self.rules, p, pre, rl) for p, pre, rl in zip(prompts, prefixes, row_limits) for _ in range(n)]
        while True:
            open_ = [r for r in reqs if not r.done]
            if not open_:
                break
            sps = []
            for r in open_:
                left = budget - len(r.prefix) - len(r.result.page_ids)
                sps.append(params(min(tokens_to_fill_point(r.page, k), left), r.row_limit, r.prefix, logprobs=fill_logprobs))
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=r.sequence()) for r in open_], sps, use_tqdm=False)
            for r, o in zip(open_, outs):
                c = o.outputs[0]
                toks = list(c.token_ids)
                r.result.decode_steps += len(toks)
                for j, t in enumerate(toks):
                    if t == self.stop_id:
                        r.result.at_row_limit = r.done = True
                        break
                    fill_here = is_fill_point(r.page, k) and bool(self.rules.is_entity[t])
                    r.append([t])
                    if fill_here:  # only ever the call's last token: max_tokens ends there
                        lp = c.logprobs[j]
                        cand = [int(u) for u, v in lp.items() if u != t and np.isfinite(v.logprob)
                                and self.rules.is_entity[u] and u not in r.page.used]
                        m = target - r.page.row_len
                        fill = select_fill(t, cand, np.array([lp[u].logprob for u in cand]), m, temperature <= 0, self.rng)
                        fill = allowed_fill(self.rules, r.prompt, r.prefix + r.result.page_ids, fill)
                        r.append(fill)
                        r.result.filled_titles += len(fill)
                    if t == self.tok.eop_id:
                        r.done = True
                        break
                if len(r.prefix) + len(r.result.page_ids) >= budget:
                    r.done = True
        out = [r.result for r in reqs]
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _rows(self, page: list[int]) -> int:
        return sum(int(self.rules.is_row[t]) for t in page)

    def _finish(self, toks: list[int]) -> DecodeResult:
        at_limit = bool(toks) and toks[-1] == self.stop_id
        toks = toks[:-1] if at_limit else toks
        return DecodeResult(toks, decode_steps=len(toks) + int(at_limit), at_row_limit=at_limit)

    # -- HF ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode_hf(self, prompts, prefixes, temperature, hybrid, row_limits, n, budget) -> list[list[DecodeResult]]:
        items = [(p, pre, rl) for p, pre, rl in zip(prompts, prefixes, row_limits) for _ in range(n)]
        out: list[DecodeResult] = []
        mask_flag = self.model.config.mask_logits
        self.model.config.mask_logits = False  # the loop masks each step itself; replay would redo it
        try:
            for s in range(0, len(items), self.hf_batch_size):
                out += self._decode_hf_batch(items[s:s + self.hf_batch_size], temperature, hybrid, budget)
        finally:
            self.model.config.mask_logits = mask_flag
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _decode_hf_batch(self, items, temperature, hybrid, budget) -> list[DecodeResult]:
        rules, tok, model = self.rules, self.tok, self.model
        k, target = hybrid.active_k(rules), hybrid.target_len(rules)
        B, V = len(items), rules.vocab_size
        reqs = [_Request(rules, p, pre, rl) for p, pre, rl in items]
        ids, attn = pad_batch([r.sequence() for r in reqs], tok.pad_id, side="left")  # [B, W] each
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, W]
        pids, _ = pad_batch([r.prompt for r in reqs], rules.page_id)
        resumable, profile_ok = rules.prompt_facts(pids, torch.tensor([len(r.prompt) for r in reqs]))  # [B, V] each
        used = torch.zeros(B, V, dtype=torch.bool)
        for b, r in enumerate(reqs):
            if r.page.used:
                used[b, list(r.page.used)] = True
        fill_k = torch.full((B,), k)
        row_limit = torch.tensor([r.row_limit for r in reqs])
        sealed = torch.tensor([self._rows(r.prefix) for r in reqs])
        temp = torch.full((B,), float(temperature))
        gen = torch.Generator().manual_seed(self.seed)

        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()  # [B, V']
        last_pos = pos[:, -1].clone()
        while not all(r.done for r in reqs):
            pages = [r.page for r in reqs]
            state = PageState(
                active=torch.tensor([not r.done for r in reqs]), used=used,
                n_rows=torch.tensor([p.n_rows for p in pages]), row_len=torch.tensor([p.row_len for p in pages]),
                cur_row=torch.tensor([p.cur_row for p in pages]), resumable=resumable, profile_ok=profile_ok)
            allowed = rules.allowed(state)  # [B, V]
            masked = logits.clone()
            masked[:, :V] = masked[:, :V].masked_fill(~allowed, float("-inf"))
            masked[:, V:] = float("-inf")
            masked = control_logits(masked, rules, state.n_rows, state.row_len, state.cur_row, fill_k, row_limit,
                                    temp, self.stop_id, sealed)
            if temperature > 0:
                probs = torch.softmax(masked / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            else:
                nxt = masked.argmax(-1)
            chunks = []
            for b, r in enumerate(reqs):
                if r.done:
                    chunks.append([])
                    continue
                t = int(nxt[b])
                r.result.decode_steps += 1
                if t == self.stop_id:
                    r.result.at_row_limit = r.done = True
                    chunks.append([])
                    continue
                new = [t]
                if is_fill_point(r.page, k) and rules.is_entity[t]:
                    lp = torch.log_softmax(masked[b, :V] / max(temperature, 1e-5) if temperature > 0 else masked[b, :V], -1)
                    ok = torch.isfinite(lp) & rules.is_entity & ~used[b]  # distinct even where dedup is not a mask
                    ok[t] = False
                    cand = ok.nonzero().flatten()
                    fill = select_fill(t, cand.tolist(), lp[cand].numpy(), target - r.page.row_len - 1, temperature <= 0, self.rng)
                    fill = allowed_fill(rules, r.prompt, r.prefix + r.result.page_ids + [t], fill)
                    new += fill
                    r.result.filled_titles += len(fill)
                r.append(new)
                used[b, new] = True
                if t == tok.eop_id or len(r.prefix) + len(r.result.page_ids) >= budget:
                    r.done = True
                chunks.append(new)
            if all(r.done for r in reqs):
                break
            # Next pass: each row feeds what it just wrote (1 token, or a filled row), right-padded.
            Wc = max(1, max(len(c) for c in chunks))
            step_ids, step_attn = pad_batch([[] if r.done else c for r, c in zip(reqs, chunks)], tok.pad_id, length=Wc)
            step_pos = last_pos[:, None] + 1 + torch.arange(Wc)[None, :]
            attn = torch.cat([attn, step_attn], -1)
            out = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            lens = step_attn.sum(-1)  # [B]
            logits = out.logits[torch.arange(B), (lens - 1).clamp(min=0)].float()
            last_pos = last_pos + lens
        return [r.result for r in reqs]


class _Request:
    """Decoding state of one request: its prompt, the page prefix it continues and what it wrote."""

    def __init__(self, rules: RuleSet, prompt: list[int], prefix: list[int], row_limit: int):
        self.prompt, self.prefix, self.row_limit = prompt, list(prefix), row_limit
        self.page = IncrementalPage(rules)
        self.page.extend(self.prefix)
        self.result = DecodeResult([])
        self.done = False

    def sequence(self) -> list[int]:
        return self.prompt + self.prefix + self.result.page_ids

    def append(self, tokens: list[int]) -> None:
        self.result.page_ids += tokens
        self.page.extend(tokens)


# -- CLI --------------------------------------------------------------------------------------------------------
def row_title(row_id: str) -> str:
    """'genre_sci_fi' -> 'Sci Fi', 'continue_watching' -> 'Continue Watching'."""
    name = row_id[len("genre_"):] if row_id.startswith("genre_") else row_id
    return name.replace("_", " ").title()


def format_page(page: Page, feedback: dict[str, str] | None = None, first_row: int = 1) -> str:
    """Rows as readable lines: '  1. Continue Watching  show_0012, ...'; with feedback, what the user did with a title."""
    lines = []
    for i, row in enumerate(page.rows, first_row):
        titles = [e + (f" [{feedback[e]}]" if feedback and e in feedback else "") for e in row.entity_ids]
        lines.append(f"  {i}. {row_title(row.row_id):<18} " + ", ".join(titles))
    return "\n".join(lines) if lines else "  (no rows)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate homepages for held-out logged contexts of a dataset and print them.")
    ap.add_argument("--model", default="runs/pretrain/model", help="GenPage checkpoint directory (with business_rules)")
    ap.add_argument("--data", default="runs/world", help="dataset directory (docs/dataset.md): logged contexts")
    ap.add_argument("--environment", default="auto", help="ground truth: auto (the dataset's own), '' (none), or a dotted path")
    ap.add_argument("--users", type=int, default=5, help="how many logged contexts to generate for")
    ap.add_argument("--split", default="test", help="user split to draw them from (train, valid, test)")
    ap.add_argument("--backend", default="vllm", choices=BACKENDS)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--hybrid-k", type=int, default=None, help="hybrid row decoding: titles decoded per row before the one-pass fill")
    ap.add_argument("--fill-row-len", type=int, default=HybridConfig.fill_row_len, help="row length the hybrid fill completes to")
    ap.add_argument("--rows-per-page", type=int, default=None, help="paginated generation: rows per page (needs an environment with browse)")
    ap.add_argument("--pages", type=int, default=3, help="paginated generation: pages per user")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from homepage.dataset import open_dataset
    from homepage.environment import load_environment
    from homepage.logs import engaged_titles, sample_impressions
    from policies.evaluation import engaged_recall, pages_from_tokens
    from policies.tokenizer import check_tokenizer_matches

    dataset, table, _ = open_dataset(args.data)
    env = load_environment(args.environment, dataset)
    impressions = sample_impressions(table, args.split, args.users, args.seed)
    contexts = [imp.context for imp in impressions]
    rng = np.random.default_rng(args.seed)
    gen = PageGenerator(args.model, backend=args.backend, seed=args.seed)
    check_tokenizer_matches(gen.tok, dataset, table, f"the checkpoint {args.model}")
    hybrid = HybridConfig(args.hybrid_k, args.fill_row_len)
    if args.rows_per_page:
        from policies.pagination import paginate

        if env is None or not hasattr(env, "browse"):
            raise SystemExit("--rows-per-page needs an environment with a session model (browse), e.g. the toy world's")
        sessions = paginate(gen, contexts, env.browse, args.rows_per_page, args.pages, temperature=args.temperature,
                            hybrid=hybrid, rng=rng)
        page_ids = [s.page_ids for s in sessions]
    else:
        results = gen.generate(contexts, temperature=args.temperature, hybrid=hybrid)
        page_ids = [g.page_ids for g in results]
    pages, _ = pages_from_tokens(gen.tok, page_ids)
    true = env.true_page_reward(contexts, pages) if env is not None else None
    recall = engaged_recall(pages, [engaged_titles(imp) for imp in impressions])
    for b, ctx in enumerate(contexts):
        print(f"\n{ctx.user_id} ({ctx.profile_type}, {ctx.language}), {ctx.device}, day {ctx.day_of_week} "
              f"{ctx.hour:02d}:00, {len(ctx.history)} titles in history")
        if args.rows_per_page:
            s, row = sessions[b], 1
            for p, (chunk, fb) in enumerate(zip(s.pages, s.feedback), 1):
                print(f" page {p}:")
                print(format_page(chunk, fb, first_row=row))
                row += len(chunk.rows)
            print(f" {'homepage ended' if s.ended else 'more pages possible'}")
        else:
            print(format_page(results[b].page))
        figures = [] if args.rows_per_page else [f"{results[b].decode_steps} decode steps"]
        figures += [f"engaged-title recall {recall[b]:.2f}" if np.isfinite(recall[b]) else "no engaged titles logged"]
        if true is not None:
            figures.append(f"true expected page reward {true[b]:.2f}")
        print("  " + "; ".join(figures))


if __name__ == "__main__":
    main()
