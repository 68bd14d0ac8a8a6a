"""The pretraining stage's pieces that `recipes/pretrain.py` composes: the held-out page loss, the choice of
cold-start titles, and the evaluation of a pretrained policy on held-out logged contexts (what the logs allow
and, with an environment, its ground truth)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from homepage.environment import Environment
from homepage.logs import engaged_titles, other_page_of_user, sample_impressions
from policies.data import PageSequences, collate, page_token_nll
from policies.evaluation import engaged_recall, pages_from_tokens
from policies.hf_generation import generate_pages_hf
from policies.rules import RuleSet
from policies.tokenizer import GenPageTokenizer

# Evaluation pages: (temperature, business-rule masks on). Unmasked pages show what the model learned alone.
DECODING_MODES = {"sampled": (1.0, False), "greedy": (0.0, False), "masked_sampled": (1.0, True),
                  "masked_greedy": (0.0, True)}
PARITY_SEQUENCES = 64  # held-out sequences whose HF and vLLM log-probs are compared


def heldout_loss(model, data: PageSequences, batch_size: int, pad_id: int) -> float:
    """Mean negative log-likelihood per page token of `data` (eval mode: no fallback-token swaps)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            nll, n = page_token_nll(model, collate(data.prompts[s:s + batch_size], data.pages[s:s + batch_size], pad_id))
            total, count = total + nll.item(), count + n.item()
    model.train(was_training)
    return total / count


def pick_cold_start_titles(table, entity_ids: list[str], n: int, seed: int) -> list[str]:
    """n titles drawn from the 10% least present in the logs, so holding them out costs few pages."""
    if n == 0:
        return []
    import pyarrow.compute as pc

    flat = pc.list_flatten(pc.list_flatten(table.column("page_entity_ids")))
    hist = pc.list_flatten(table.column("history_entity_ids"))
    counts = dict.fromkeys(entity_ids, 0)
    for col in (flat, hist):
        for item in pc.value_counts(col).to_pylist():
            if item["values"] in counts:
                counts[item["values"]] += item["counts"]
    rare = sorted(entity_ids, key=lambda e: (counts[e], e))[: max(n, len(entity_ids) // 10)]
    return sorted(np.random.default_rng(seed).choice(rare, size=n, replace=False).tolist())


def nanmean(x) -> float | None:
    """Mean over the finite entries, None when there are none."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def vllm_pages_and_parity(model, model_dir: Path, prompts: list[list[int]], tok: GenPageTokenizer,
                          valid: PageSequences, max_new_tokens: int, seed: int) -> tuple[dict[str, list[list[int]]], float]:
    """Pages of every decoding mode from the serving engine (its rule logits processor reads the saved rules),
    and the largest |HF - vLLM| log-prob over the first held-out sequences."""
    from policies import vllm_engine
    from policies.vllm_rules import OPT_OUT_KEY

    llm = vllm_engine.make_llm(model_dir, seed=seed)
    pages = {name: [s[0]["token_ids"] for s in vllm_engine.generate(
        llm, prompts, temp, max_new_tokens, tok.eop_id, extra_args=None if masked else {OPT_OUT_KEY: False})]
        for name, (temp, masked) in DECODING_MODES.items()}
    seqs = [p + g for p, g in zip(valid.prompts[:PARITY_SEQUENCES], valid.pages[:PARITY_SEQUENCES])]
    vllm_lp = vllm_engine.sequence_logprobs(llm, seqs)
    diffs = []
    with torch.no_grad():
        for s, v in zip(seqs, vllm_lp):
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)  # [T, V]; eval mode
            hf = lp[torch.arange(len(s) - 1), torch.tensor(s[1:])].numpy()
            diffs.append(np.abs(hf - np.array(v)).max())
    del llm
    return pages, float(max(diffs))


def evaluate_pretrained(model, model_dir: Path, tok: GenPageTokenizer, rules: RuleSet, table, env: Environment | None,
                        valid: PageSequences, eval_users: int, backend: str, max_new_tokens: int, seed: int) -> dict:
    """The pretrained policy on `eval_users` held-out (test-split) logged contexts, in every decoding mode, beside
    the logging policy: engaged-title recall (the logging policy's on the same user's other logged page, since its
    own page holds every engaged title), the environment's true reward and how recall ranks pages against it,
    rule violations, decoding reports and (vLLM backend) HF/vLLM log-prob parity. -> summary entries."""
    heldout = sample_impressions(table, "test", eval_users, seed)
    contexts = [imp.context for imp in heldout]
    engaged = [engaged_titles(imp) for imp in heldout]
    prompts = [tok.encode_context(c) for c in contexts]
    pairs = [(page, e) for page, e in zip(other_page_of_user(heldout, table), engaged) if page is not None]
    recall = {"logging": nanmean(engaged_recall([p for p, _ in pairs], [e for _, e in pairs]))}
    true = {"logging": env.true_page_reward(contexts, [imp.page for imp in heldout]) if env else None}
    parity = None
    if backend == "vllm":
        gen, parity = vllm_pages_and_parity(model, model_dir, prompts, tok, valid, max_new_tokens, seed)
    else:
        gen = {}
        for name, (temp, masked) in DECODING_MODES.items():
            torch.manual_seed(seed)
            gen[name] = generate_pages_hf(model, tok, prompts, temp, max_new_tokens, rules=rules if masked else None)
    decode_reports, recall_true = {}, {}
    for name, pages in gen.items():
        structured, report = pages_from_tokens(tok, pages)
        page_recall = engaged_recall(structured, engaged)  # [N], NaN where nothing was engaged
        recall[name] = nanmean(page_recall)
        true[name] = env.true_page_reward(contexts, structured) if env else None
        if env is not None:  # does the offline metric rank this policy's pages as the truth does?
            ok = np.isfinite(page_recall)
            recall_true[name] = float(np.corrcoef(page_recall[ok], true[name][ok])[0, 1]) if ok.sum() > 2 else None
        decode_reports[name] = dataclasses.asdict(report)
    summary = {
        **{f"recall_{name}": v for name, v in recall.items()},  # engaged titles of the held-out impression on the page
        "environment": type(env).__name__ if env else None,
        "vllm_hf_max_abs_logprob_diff": parity,
        "eval_contexts": len(contexts),
        "eval_backend": backend,
        "decode_reports": decode_reports,
        "rule_violations": {name: {r: int(v.sum()) for r, v in rules.violations(prompts, pages).items()}
                            for name, pages in gen.items()},
    }
    if env is not None:
        summary.update({f"true_reward_{'logging' if name == 'logging' else 'pretrained_' + name}": float(v.mean())
                        for name, v in true.items()})
        summary.update({f"{name}_vs_logging": float(true[name].mean() / true["logging"].mean()) for name in gen})
        summary["recall_true_pearson"] = recall_true
    return summary
