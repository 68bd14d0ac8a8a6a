"""The same checkpoint in vLLM (through the vllm.general_plugins entry point) and in transformers."""

import numpy as np
import pytest
import torch

from policies.build import ModelSize, build_model
from tests.toy import toy_tokenizer

# One engine for the module, on its own 2-layer checkpoint; the first test's timeout includes starting it.
pytestmark = [pytest.mark.engine, pytest.mark.timeout(60)]

ENTITIES = [f"{t}_{i:04d}" for i, t in enumerate(["movie", "show", "game"] * 20)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = toy_tokenizer(ENTITIES)
    rng = np.random.default_rng(0)
    content = {e: rng.normal(size=8).astype(np.float32) for e in ENTITIES}
    model = build_model(tok, content, ModelSize(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256))
    with torch.no_grad():  # make the content path matter
        model.model.content_proj.weight.mul_(20)
        model.output_content_proj.weight.mul_(20)
    path = tmp_path_factory.mktemp("genpage")
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


@pytest.fixture(scope="module")
def llm(checkpoint):
    from policies import vllm_engine

    engine = vllm_engine.make_llm(checkpoint[0], seed=0)
    yield engine
    del engine


def test_vllm_and_hf_logprobs_agree_fp32(checkpoint, llm):
    from policies import vllm_engine

    _, model, tok = checkpoint
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, len(tok), (int(n),), generator=g).tolist() for n in (12, 40, 77, 120)]
    vllm_lp = vllm_engine.sequence_logprobs(llm, seqs)
    worst = 0.0
    for s, v in zip(seqs, vllm_lp):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0], -1)
        hf = lp[torch.arange(len(s) - 1), torch.tensor(s[1:])].numpy()
        worst = max(worst, float(np.abs(hf - np.array(v)).max()))
    assert worst < 1e-4, worst


def test_vllm_generates_pages_that_stop_at_eop_with_matching_logprobs(checkpoint, llm):
    from policies import vllm_engine

    _, model, tok = checkpoint
    prompt = [tok.bos_id, tok.vocab["[PROFILE]"], tok.vocab["lang:en"], tok.page_id]
    out = vllm_engine.generate(llm, [prompt], temperature=1.0, max_tokens=30, stop_token_id=tok.eop_id, n=4, logprobs=True)
    assert len(out[0]) == 4
    for sample in out[0]:
        toks = sample["token_ids"]
        assert len(toks) <= 30 and all(0 <= t < len(tok) for t in toks)
        assert tok.eop_id not in toks[:-1]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt + toks])).logits[0], -1)
        hf = lp[torch.arange(len(prompt) - 1, len(prompt) + len(toks) - 1), torch.tensor(toks)].numpy()
        np.testing.assert_allclose(hf, sample["logprobs"], atol=1e-4)
