import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from policies.build import ModelSize, build_model, token_fallback_map
from policies.modeling_genpage import GenPageConfig, GenPageForCausalLM, GenPageForPageReward
from tests.toy import toy_tokenizer

ENTITIES = [f"{t}_{i:04d}" for i, t in enumerate(["movie", "show", "game"] * 10)]
TOK = toy_tokenizer(ENTITIES)
SIZE = ModelSize(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128, fallback_prob=0.5)


def content(dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return {e: rng.normal(size=dim).astype(np.float32) for e in ENTITIES}


@pytest.fixture(scope="module")
def model() -> GenPageForCausalLM:
    return build_model(TOK, content(), SIZE).eval()


def ids(n=2, T=20, seed=0):
    return torch.randint(0, len(TOK), (n, T), generator=torch.Generator().manual_seed(seed))


def test_registration_round_trip_same_outputs(model, tmp_path):
    model.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "genpage"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(loaded, GenPageForCausalLM)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded.model.content_embeddings, model.model.content_embeddings)
    assert not loaded.model.content_embeddings.requires_grad  # same trainable set after a reload (resume)
    torch.testing.assert_close(loaded.model.token_fallback, model.model.token_fallback)  # fallback replacement works
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(reward, GenPageForPageReward)
    torch.testing.assert_close(reward.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_checkpoint_loads_by_its_architecture_name_as_trl_loads_it(model, tmp_path):
    """TRL's GRPOTrainer builds its reference model with `create_model_from_path`: the class named by
    `config.architectures[0]`, looked up in the transformers namespace. A saved GenPage checkpoint, with no
    auto_map, loads that way once policies.modeling_genpage is imported."""
    import transformers

    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert "auto_map" not in config.to_dict()  # verl would read an auto_map as remote code
    architecture = getattr(transformers, config.architectures[0])
    assert architecture is GenPageForCausalLM
    loaded = architecture.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert transformers.GenPageForPageReward is GenPageForPageReward
    try:  # TRL itself, where the `bench` extra is installed
        from trl.trainer.utils import create_model_from_path
    except ImportError:
        return
    assert isinstance(create_model_from_path(str(tmp_path), device_map="cpu"), GenPageForCausalLM)


def test_embeddings_untied_and_content_fused(model):
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    e = TOK.vocab[f"ent:{ENTITIES[3]}"]
    with torch.no_grad():
        fused = model.model.embed(torch.tensor([[e]]))[0, 0]
        id_only = model.model.embed_tokens.weight[e]
        expected = id_only + model.model.content_proj.weight @ torch.tensor(content()[ENTITIES[3]])
    torch.testing.assert_close(fused, expected)
    assert not torch.allclose(fused, id_only)
    assert not model.model.content_embeddings.requires_grad
    with pytest.raises(ValueError, match="untied"):
        GenPageForCausalLM(GenPageConfig(vocab_size=10, hidden_size=64, num_attention_heads=1, tie_word_embeddings=True))


def test_fallback_replacement_only_in_training_and_only_for_entities_and_rows(model):
    fb = torch.tensor(token_fallback_map(TOK))
    e = TOK.vocab[f"ent:{ENTITIES[4]}"]  # a show
    assert fb[e] == TOK.vocab["ent:<unk_show>"]
    assert fb[TOK.vocab["row:kids"]] == TOK.row_fallback_id
    assert fb[TOK.vocab["act:play"]] == -1
    x = torch.tensor([[e] * 400 + [TOK.vocab["act:play"]] * 400])
    model.train()
    try:
        torch.manual_seed(0)
        emb = model.model.embed(x)[0]
    finally:
        model.eval()
    with torch.no_grad():
        known = model.model.embed(torch.tensor([[e]]))[0, 0]
        swapped = known - model.model.embed_tokens.weight[e] + model.model.embed_tokens.weight[fb[e]]
        ctx = model.model.embed(torch.tensor([[TOK.vocab["act:play"]]]))[0, 0]
    is_swapped = torch.isclose(emb[:400], swapped, atol=1e-6).all(-1)
    is_known = torch.isclose(emb[:400], known, atol=1e-6).all(-1)
    assert (is_swapped | is_known).all()
    assert 0.35 < is_swapped.float().mean() < 0.65  # fallback_prob = 0.5
    assert torch.isclose(emb[400:], ctx, atol=1e-6).all()  # context tokens never replaced
    with torch.no_grad():  # eval: no replacement, all 400 copies of the title embed as the title itself
        assert torch.isclose(model.model.embed(x)[0, :400], known, atol=1e-6).all()


def test_add_cold_entities_uses_fallback_id_and_own_content(model):
    import copy

    m = copy.deepcopy(model)
    e = TOK.vocab[f"ent:{ENTITIES[0]}"]
    new_content = torch.ones(1, 8)
    m.add_cold_entities([e], new_content)
    fb = TOK.vocab["ent:<unk_movie>"]
    torch.testing.assert_close(m.model.embed_tokens.weight[e], m.model.embed_tokens.weight[fb])
    torch.testing.assert_close(m.model.content_embeddings[e], new_content[0])
    with pytest.raises(ValueError, match="no fallback"):
        m.add_cold_entities([TOK.vocab["act:play"]], new_content)


def test_reward_head_reads_last_attended_position():
    m = GenPageForPageReward(build_model(TOK, content(), SIZE).config).eval()
    x = ids(1, 12)
    with torch.no_grad():
        full = m(x[:, :8], attention_mask=torch.ones(1, 8)).logits
        right = m(x, attention_mask=torch.tensor([[1] * 8 + [0] * 4])).logits
        left = m(torch.cat([torch.zeros(1, 4, dtype=torch.long), x[:, :8]], 1), attention_mask=torch.tensor([[0] * 4 + [1] * 8]),
                 position_ids=torch.tensor([[0] * 4 + list(range(8))])).logits
    torch.testing.assert_close(right, full)
    torch.testing.assert_close(left, full, atol=1e-5, rtol=1e-5)
    out = m(x, attention_mask=torch.ones_like(x), labels=torch.tensor([1.0]))
    assert out.loss is not None and out.logits.shape == (1, 1)


def test_model_size_validation():
    with pytest.raises(ValueError, match="head_dim"):
        ModelSize(hidden_size=64, num_attention_heads=4)


def test_output_side_content_fusion(model):
    x = ids(1, 10)
    with torch.no_grad():
        hidden = model.model(x).last_hidden_state
        expected = hidden @ model.lm_head.weight.T + hidden @ (model.output_content_proj(model.model.content_embeddings)).T
        torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)
        # logits_to_keep=1 (what generate uses) is the last position of the full logits
        torch.testing.assert_close(model(x, logits_to_keep=1).logits[:, -1], model(x).logits[:, -1])


def test_length_buckets_give_the_padded_batch_results_and_gradients():
    """Rows grouped by length (each group cut to its longest row) = one padded batch: logits of every real
    position and the gradients; left padding, KV caches and small batches keep the single batch."""
    torch.manual_seed(0)
    m = build_model(TOK, content(), SIZE).train()
    m.config.fallback_prob = 0.0
    lengths = torch.randint(5, 41, (48,), generator=torch.Generator().manual_seed(1))
    lengths[0] = 40
    x = ids(48, 40, seed=2)
    mask = (torch.arange(40)[None] < lengths[:, None]).long()  # right padding
    assert m.model.length_buckets(mask, {}) is not None and len(m.model.length_buckets(mask, {})) == 3
    real = mask.bool()

    def run(bucket_rows):
        m.config.length_bucket_rows = bucket_rows
        m.zero_grad()
        logits = m(x, attention_mask=mask, use_cache=False).logits
        (logits[real].logsumexp(-1) * torch.linspace(0, 1, int(real.sum()))).sum().backward()
        return logits[real].detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run(0)
    logits, grads = run(16)
    m.config.length_bucket_rows = 16
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-4, rtol=1e-4)
    assert m.model.length_buckets(mask.flip(-1), {}) is None  # left padding
    assert m.model.length_buckets(mask, {"use_cache": True}) is None
    assert m.model.length_buckets(mask[:20], {}) is None  # fewer than two groups of 16 rows
    assert m.model.length_buckets(torch.ones_like(mask), {}) is None  # nothing to save


def _readout_case():
    """One right-padded sequence [BOS] [PAGE] a b [PAD]: the page is positions 2 and 3; hidden [1, 5, 2]."""
    ids = torch.tensor([[TOK.bos_id, TOK.page_id, 20, 21, TOK.pad_id]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    config = GenPageConfig(vocab_size=len(TOK), hidden_size=64, num_attention_heads=1, page_token_id=TOK.page_id,
                           reward_mean=1.0, reward_std=2.0, feedback_rewards=[0.0, 2.0], thumbs_up_reward=1.0)
    return ids, mask, config


def linear(weight, bias):
    layer = torch.nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_entity_sum_readout_by_hand():
    from policies.reward_heads import get_reward_readout

    ids, mask, config = _readout_case()
    hidden = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0]]])  # h_t = (t, 1)
    head = get_reward_readout("entity_sum")
    assert head.outputs(config) == 1
    with torch.no_grad():
        out = head.read(linear([[1.0, 0.0]], [0.5]), hidden, ids, mask, config)  # reward_t = t + 0.5
    # page positions 2, 3: 2.5 + 3.5 = 6; standardized (6 - 1) / 2 = 2.5
    torch.testing.assert_close(out.token_rewards, torch.tensor([[0.0, 0.0, 2.5, 3.5, 0.0]]))
    torch.testing.assert_close(out.logits, torch.tensor([[2.5]]))
    assert out.feedback_logits is None
    # what credit=token checks before a run: which read-outs give per-token rewards
    assert head.per_token and get_reward_readout("entity_feedback").per_token and not get_reward_readout("last").per_token


def test_entity_feedback_readout_by_hand():
    import math

    from policies.reward_heads import get_reward_readout

    ids, mask, config = _readout_case()
    ln3 = math.log(3.0)
    hidden = torch.tensor([[[5.0, 5.0], [5.0, 5.0], [ln3, 0.0], [0.0, ln3], [5.0, 5.0]]])
    head = get_reward_readout("entity_feedback")
    assert head.outputs(config) == 3  # two feedback types, then the thumbs-up
    score = linear([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0.0, 0.0, 0.0])  # logits (0, h_0, h_1)
    with torch.no_grad():
        out = head.read(score, hidden, ids, mask, config)
    # position 2: P(type 1) = 3/4 -> 0.75 * 2.0, thumbs-up 1/2 -> 0.5 * 1.0: 2.0
    # position 3: P(type 1) = 1/2 -> 1.0, thumbs-up 3/4 -> 0.75: 1.75; page 3.75, standardized (3.75 - 1) / 2
    torch.testing.assert_close(out.token_rewards, torch.tensor([[0.0, 0.0, 2.0, 1.75, 0.0]]))
    torch.testing.assert_close(out.logits, torch.tensor([[1.375]]))
    torch.testing.assert_close(out.feedback_logits, score(hidden).detach())  # every position, page or not
    with pytest.raises(ValueError, match="needs config.feedback_rewards"):
        head.outputs(GenPageConfig(vocab_size=10, hidden_size=64, num_attention_heads=1, page_token_id=3))


def test_last_readout_by_hand_for_right_left_and_no_padding():
    from policies.reward_heads import get_reward_readout

    ids, mask, config = _readout_case()
    hidden = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0]]])
    head, score = get_reward_readout("last"), linear([[1.0, 0.0]], [0.5])  # h_t -> t + 0.5
    with torch.no_grad():
        right = head.read(score, hidden, ids, mask, config)  # last attended position 3
        left = head.read(score, hidden, ids, mask.flip(-1), config)  # [0, 1, 1, 1, 1]: position 4
        unmasked = head.read(score, hidden, ids, None, config)
    torch.testing.assert_close(right.logits, torch.tensor([[3.5]]))  # a scalar, not standardized again
    torch.testing.assert_close(left.logits, torch.tensor([[4.5]]))
    torch.testing.assert_close(unmasked.logits, torch.tensor([[4.5]]))
    assert right.token_rewards is None and right.feedback_logits is None


def test_an_unknown_reward_head_lists_the_known_ones():
    from policies.reward_heads import get_reward_readout

    known = r"known: \['entity_feedback', 'entity_sum', 'last'\]"
    with pytest.raises(ValueError, match=known):
        get_reward_readout("scalar")
    with pytest.raises(ValueError, match=known):
        GenPageForPageReward(GenPageConfig(vocab_size=10, hidden_size=64, num_attention_heads=1, reward_head="scalar"))
    with pytest.raises(ValueError, match="needs config.page_token_id"):
        GenPageForPageReward(GenPageConfig(vocab_size=10, hidden_size=64, num_attention_heads=1, reward_head="entity_sum"))
