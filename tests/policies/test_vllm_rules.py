"""The rule mask in vLLM (the logits processor from the `vllm.logits_processors` entry point) on an untrained
GenPage: no mask-rule violation in sampled or greedy pages, the same pages unmasked do violate, and vLLM's
sampling log-probs equal the HF log-probs with the mask replayed in forward."""


import numpy as np
import pytest
import torch

from policies.build import ModelSize, build_model
from policies.rules import build_ruleset
from tests.policies.test_rules import CONFIG, prompt_of
from homepage.catalog import ENTITY_TYPES
from tests.toy import toy_tokenizer, world_dataset, world_tokenizer


def tiny_checkpoint(world, directory, max_history: int = 20):
    """An untrained 1-layer GenPage with the test rules (2-4 rows of 3-5 titles, trending pinned first,
    Continue Watching within 3 rows) saved with its tokenizer."""
    c = world.catalog
    tok = toy_tokenizer(c.entity_ids, max_history, [ENTITY_TYPES[t] for t in c.entity_type])
    rules = build_ruleset(tok, world_dataset(world, directory / "data"), CONFIG)
    rng = np.random.default_rng(0)
    content = {e: rng.normal(size=8).astype(np.float32) for e in c.entity_ids}
    model = build_model(tok, content, ModelSize(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)).eval()
    model.config.business_rules = rules.to_dict()
    model.save_pretrained(directory / "model")
    tok.save_pretrained(directory / "model")
    return directory / "model", model, tok, rules


def sample_prompts(world, tok):
    users = np.concatenate([np.flatnonzero(world.users.profile_type == 1)[:6], np.arange(18)])  # kids profiles too
    return [prompt_of(world, tok, int(u), seed=i) for i, u in enumerate(users)]


@pytest.fixture(scope="module")
def setup(small_world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_rules")
    model_dir, model, tok, rules = tiny_checkpoint(small_world, tmp, max_history=small_world.config.history_max)
    users = np.concatenate([np.flatnonzero(small_world.users.profile_type == 1)[:8], np.arange(24)])  # kids profiles too
    prompts = [prompt_of(small_world, tok, int(u), seed=i) for i, u in enumerate(users)]
    from policies import vllm_engine

    llm = vllm_engine.make_llm(model_dir, seed=0, logprobs_mode="processed_logprobs")
    yield model, tok, rules, prompts, llm
    del llm


def sample(llm, tok, prompts, temperature, n, masked=True):
    from policies import vllm_engine
    from policies.vllm_rules import OPT_OUT_KEY

    out = vllm_engine.generate(llm, prompts, temperature, 60, tok.eop_id, n=n, logprobs=True,
                               extra_args=None if masked else {OPT_OUT_KEY: False})
    return [p for p, o in zip(prompts, out) for _ in o], [s["token_ids"] for o in out for s in o], [s["logprobs"] for o in out for s in o]


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
    from tests.policies.test_rules import walk

    tok = world_tokenizer(small_world)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        rules = build_ruleset(tok, world_dataset(small_world, Path(d) / "data"), CONFIG)
    proc = GenPageRulesLogitsProcessor(SimpleNamespace(model_config=SimpleNamespace(
        hf_config=GenPageConfig(vocab_size=len(tok), business_rules=rules.to_dict()))), torch.device("cpu"), False)
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
