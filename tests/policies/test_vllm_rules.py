"""The rule mask in vLLM (the logits processor from the `vllm.logits_processors` entry point) on an untrained
GenPage: no mask-rule violation in sampled or greedy pages, the same pages unmasked do violate, and vLLM's
sampling log-probs equal the HF log-probs with the mask replayed in forward. The engine is the session's
`generation_llm` (PageGenerator's engine: the hybrid processor beside the entry-point one acts only on requests
that ask for it)."""


import numpy as np
import pytest
import torch

from policies.rules import build_ruleset
from tests.policies.helpers import CONFIG, prompt_of, walk
from tests.toy import world_dataset, world_tokenizer


@pytest.fixture(scope="module")
def setup(small_world, tiny_genpage, generation_llm):
    _, model, tok, rules = tiny_genpage
    users = np.concatenate([np.flatnonzero(small_world.users.profile_type == 1)[:8], np.arange(24)])  # kids profiles too
    prompts = [prompt_of(small_world, tok, int(u), seed=i) for i, u in enumerate(users)]
    return model, tok, rules, prompts, generation_llm


def sample(llm, tok, prompts, temperature, n, masked=True):
    from policies import vllm_engine
    from policies.vllm_rules import OPT_OUT_KEY

    out = vllm_engine.generate(llm, prompts, temperature, 60, tok.eop_id, n=n, logprobs=True,
                               extra_args=None if masked else {OPT_OUT_KEY: False})
    return [p for p, o in zip(prompts, out) for _ in o], [s["token_ids"] for o in out for s in o], [s["logprobs"] for o in out for s in o]


@pytest.mark.engine
@pytest.mark.timeout(60)  # the first engine test of a session also starts the engine
def test_masked_vllm_pages_never_break_a_mask_rule_and_unmasked_ones_do(setup):
    _, tok, rules, prompts, llm = setup
    for temperature, n in ((1.0, 4), (0.0, 1)):
        ps, pages, _ = sample(llm, tok, prompts, temperature, n)
        v = rules.violations(ps, pages)
        assert len(pages) == len(prompts) * n
        assert all(p[-1] == tok.eop_id for p in pages)
        assert v["total"].sum() == 0, {r: int(x.sum()) for r, x in v.items()}
    ps, pages, _ = sample(llm, tok, prompts, 1.0, 2, masked=False)
    assert rules.violations(ps, pages)["total"].sum() > 0  # an untrained model breaks the rules without masks


@pytest.mark.engine
@pytest.mark.timeout(60)
def test_masked_vllm_sampling_logprobs_equal_hf_with_mask_replay(setup):
    model, tok, _, prompts, llm = setup
    ps, pages, lps = sample(llm, tok, prompts[:16], 1.0, 2)
    model.config.mask_logits = True
    try:
        worst = 0.0
        for p, g, lp in zip(ps, pages, lps):
            with torch.no_grad():
                logits = model(torch.tensor([p + g])).logits[0]
            hf = torch.log_softmax(logits, -1)[len(p) - 1: len(p) + len(g) - 1].gather(-1, torch.tensor(g)[:, None]).squeeze(-1)
            worst = max(worst, float(np.abs(hf.numpy() - np.array(lp)).max()))
    finally:
        model.config.mask_logits = False
    assert worst < 1e-4, worst


def test_processor_follows_vllms_persistent_batch_through_adds_moves_swaps_and_removals(small_world):
    """The adapter alone, driven by hand-made BatchUpdates: after each change every batch row is masked
    with its own request's prompt and page (the step mask of the engine)."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from policies.modeling_genpage import GenPageConfig
    from policies.vllm_rules import OPT_OUT_KEY, GenPageRulesLogitsProcessor

    tok = world_tokenizer(small_world)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        rules = build_ruleset(tok, world_dataset(small_world, Path(d) / "data"), CONFIG)
        header = rules.write_tables(d)  # the processor reads the tables from the engine's model directory
        proc = GenPageRulesLogitsProcessor(SimpleNamespace(model_config=SimpleNamespace(
            model=d, hf_config=GenPageConfig(vocab_size=len(tok), business_rules=header))), torch.device("cpu"), False)
    rng = np.random.default_rng(0)
    prompts = [prompt_of(small_world, tok, u, seed=u) for u in range(5)]
    pages = [walk(rules, tok, p, rng)[: 2 + 3 * u] for u, p in enumerate(prompts)]  # different prefix lengths
    outputs = [[] for _ in prompts]  # vLLM's live output lists
    sp, off = SamplingParams(), SamplingParams(extra_args={OPT_OUT_KEY: False})

    def check(slot_of: dict[int, int], steps: int = 2):
        for _ in range(steps):
            logits = torch.zeros(max(slot_of.values()) + 1, len(tok) + 3)  # padded vocabulary
            out = proc.apply(logits)
            for req, slot in slot_of.items():
                want = rules.allowed_step([prompts[req]], [outputs[req]])[0] if req != 4 else torch.ones(len(tok), dtype=torch.bool)
                assert torch.equal(out[slot, : len(tok)] == 0, want), (req, slot)
                if req != 4:
                    assert torch.isinf(out[slot, len(tok):]).all()
                nxt = pages[req][len(outputs[req])] if len(outputs[req]) < len(pages[req]) else None
                if nxt is not None:
                    outputs[req].append(nxt)

    proc.update_state(BatchUpdate(4, [], [(i, sp if i != 3 else sp, prompts[i], outputs[i]) for i in range(4)], []))
    check({0: 0, 1: 1, 2: 2, 3: 3})
    proc.update_state(BatchUpdate(4, [], [], [(0, 3, MoveDirectionality.SWAP)]))
    check({0: 3, 1: 1, 2: 2, 3: 0})
    proc.update_state(BatchUpdate(3, [1], [(4, off, prompts[4], outputs[4])], [(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    check({0: 3, 2: 1, 3: 0, 4: 4})
