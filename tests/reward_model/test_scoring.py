"""The reward model built from a GenPage checkpoint, its training forward, and the scoring API for RL."""

import numpy as np
import pytest
import torch

from policies.build import ModelSize, build_model
from policies.reward_heads import expected_feedback_reward
from reward_model.data import EntityTargets, RewardNormalization, collate_pages
from reward_model.heads import token_reward_mse
from reward_model.scoring import EnsembleScorer, PageRewardScorer, conservative
from reward_model.training import build_reward_model, predict, reward_mse
from tests.toy import toy_tokenizer

ENTITIES = [f"{t}_{i:04d}" for i, t in enumerate(["movie", "show", "game"] * 6)]
TOK = toy_tokenizer(ENTITIES)
SIZE = ModelSize(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128)
NORM = RewardNormalization(mean=4.0, std=3.0)
# the reward system of the entity_feedback head: none, abandon, short_play, long_play, binge; thumbs-up; base rates
TARGETS = EntityTargets([], [], [], [0.0, -1.0, 0.5, 2.0, 4.0], 0.5, [80, 4, 6, 8, 2], 5)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    content = {e: rng.normal(size=8).astype(np.float32) for e in ENTITIES}
    out = tmp_path_factory.mktemp("pretrained")
    build_model(TOK, content, SIZE, seed=123).save_pretrained(out)  # stands in for trained weights
    TOK.save_pretrained(out)
    return out


def sequences(n: int, seed: int = 0):
    """n (prompt, page) pairs of different lengths; pages without [EOP] (the scorer appends it)."""
    rng = np.random.default_rng(seed)
    ent = [TOK.vocab[f"ent:{e}"] for e in ENTITIES]
    prompts = [[TOK.bos_id, *rng.choice(ent, size=rng.integers(0, 6)).tolist(), TOK.page_id] for _ in range(n)]
    pages = [[TOK.vocab["row:trending_now"], *rng.choice(ent, size=rng.integers(1, 8)).tolist()] for _ in range(n)]
    return prompts, pages


def test_pretrained_init_copies_the_backbone_and_initializes_the_head(pretrained_dir):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(pretrained_dir)
    rm = build_reward_model(pretrained_dir, "pretrained", NORM, seed=0)
    lm_state, rm_state = lm.state_dict(), rm.state_dict()
    backbone = [k for k in rm_state if k.startswith("model.")]
    assert backbone and all(torch.equal(rm_state[k], lm_state[k]) for k in backbone)
    assert "lm_head.weight" not in rm_state  # the generator's output side is not part of the reward model
    w = rm.score.weight
    assert torch.isfinite(w).all() and 0.005 < w.std().item() < 0.05  # initializer_range 0.02, not zeros or garbage
    assert rm.config.reward_mean == 4.0 and rm.config.reward_std == 3.0

    scratch = build_reward_model(pretrained_dir, "scratch", NORM, seed=0)
    assert not torch.equal(scratch.model.layers[0].mlp.up_proj.weight, rm.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(scratch.model.content_embeddings, rm.model.content_embeddings)  # data, not weights
    with pytest.raises(ValueError, match="known: \\['pretrained', 'scratch'\\]"):
        build_reward_model(pretrained_dir, "imagenet", NORM)


def test_shrink_perturb_mixes_the_pretrained_layers_with_fresh_noise(pretrained_dir):
    base = build_reward_model(pretrained_dir, "pretrained", NORM, seed=0)
    warm = build_reward_model(pretrained_dir, "pretrained", NORM, seed=0, shrink=0.8)
    matrices = 0
    for (name, a), b in zip(base.model.layers.named_parameters(), warm.model.layers.parameters()):
        if a.dim() == 2:  # 0.8 w + 0.2 noise with the initializer's std (0.02)
            noise = (b - 0.8 * a) / 0.2
            assert abs(noise.std().item() - 0.02) < 0.004 and abs(noise.mean().item()) < 0.004, name
            assert abs(torch.corrcoef(torch.stack([noise.flatten(), a.flatten()]))[0, 1].item()) < 0.1, name  # fresh, not w
            matrices += 1
        else:
            assert torch.equal(a, b), name  # norms keep their values
    assert matrices == 7  # q, k, v, o, gate, up, down
    assert torch.equal(base.model.embed_tokens.weight, warm.model.embed_tokens.weight)
    assert torch.equal(base.score.weight, warm.score.weight)
    again = build_reward_model(pretrained_dir, "pretrained", NORM, seed=0, shrink=0.8)
    assert all(torch.equal(a, b) for a, b in zip(warm.parameters(), again.parameters()))  # seeded
    scratch = build_reward_model(pretrained_dir, "scratch", NORM, seed=0)
    scratch_warm = build_reward_model(pretrained_dir, "scratch", NORM, seed=0, shrink=0.8)  # the ablation is left as is
    assert all(torch.equal(a, b) for a, b in zip(scratch.parameters(), scratch_warm.parameters()))


def test_entity_sum_head_sums_per_token_rewards_over_the_page_only(pretrained_dir):
    rm = build_reward_model(pretrained_dir, "pretrained", NORM, mean_page_tokens=10.0).eval()
    assert rm.config.reward_head == "entity_sum" and rm.score.bias.item() == pytest.approx(0.4)  # 4.0 over 10 tokens
    prompts, pages = sequences(5)
    batch = collate_pages(prompts, pages, TOK.pad_id, TOK.eop_id)
    with torch.no_grad():
        out = rm(**batch)
    tokens = out.token_rewards  # [B, T]
    for i, (p, g) in enumerate(zip(prompts, pages)):
        n = len(g) + 1  # the page and its [EOP]
        assert torch.all(tokens[i, :len(p)] == 0) and torch.all(tokens[i, len(p) + n:] == 0)  # prompt, padding
        assert torch.all(tokens[i, len(p):len(p) + n] != 0)
    torch.testing.assert_close(out.logits[:, 0], (tokens.sum(1) - 4.0) / 3.0)
    # the same page scored alone (no padding) gets the same score; a different prompt changes it
    with torch.no_grad():
        alone = rm(**collate_pages(prompts[:1], pages[:1], TOK.pad_id, TOK.eop_id)).logits[0, 0]
        other = rm(**collate_pages([prompts[1]], pages[:1], TOK.pad_id, TOK.eop_id)).logits[0, 0]
    torch.testing.assert_close(alone, out.logits[0, 0], rtol=1e-5, atol=1e-5)
    assert abs(other.item() - alone.item()) > 1e-6


def test_expected_feedback_reward_by_hand():
    values = torch.tensor([0.0, -1.0, 0.5, 2.0, 4.0])
    sure_binge = torch.tensor([-50.0, -50.0, -50.0, -50.0, 50.0, 50.0])  # binge and a thumbs-up, almost surely
    even = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # each type 1/5, thumbs-up 1/2
    out = expected_feedback_reward(torch.stack([sure_binge, even]), values, thumbs_up_reward=0.5)  # [2]
    torch.testing.assert_close(out, torch.tensor([4.5, 5.5 / 5 + 0.25]))


def test_entity_feedback_head_sums_the_expected_reward_of_each_tokens_feedback(pretrained_dir):
    with pytest.raises(ValueError, match="needs the logged feedback"):
        build_reward_model(pretrained_dir, "pretrained", NORM, reward_head="entity_feedback")
    rm = build_reward_model(pretrained_dir, "pretrained", NORM, reward_head="entity_feedback", targets=TARGETS).eval()
    assert rm.config.reward_head == "entity_feedback" and rm.config.feedback_rewards == TARGETS.feedback_rewards
    assert rm.score.weight.shape == (6, 64)  # five feedback types, then the thumbs-up
    # starts at the logged base rates: 80/100 none, ..., 5/100 thumbs-up
    torch.testing.assert_close(torch.softmax(rm.score.bias[:5], 0), torch.tensor([0.8, 0.04, 0.06, 0.08, 0.02]))
    assert torch.sigmoid(rm.score.bias[5]).item() == pytest.approx(0.05, abs=1e-5)
    scratch = build_reward_model(pretrained_dir, "scratch", NORM, reward_head="entity_feedback", targets=TARGETS)
    torch.testing.assert_close(scratch.score.bias, rm.score.bias)  # the ablation gets the same head
    prompts, pages = sequences(5)
    batch = collate_pages(prompts, pages, TOK.pad_id, TOK.eop_id)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # a head that separates tokens
        out = rm(**batch)
        hidden = rm.model(**batch).last_hidden_state
    assert out.feedback_logits.shape == (*batch["input_ids"].shape, 6)
    expected = expected_feedback_reward(rm.score(hidden), torch.tensor(TARGETS.feedback_rewards), 0.5)  # [B, T]
    for i, (p, g) in enumerate(zip(prompts, pages)):
        n = len(g) + 1  # the page and its [EOP]
        assert torch.all(out.token_rewards[i, :len(p)] == 0) and torch.all(out.token_rewards[i, len(p) + n:] == 0)
        torch.testing.assert_close(out.token_rewards[i, len(p):len(p) + n], expected[i, len(p):len(p) + n])
    torch.testing.assert_close(out.logits[:, 0], (out.token_rewards.sum(1) - 4.0) / 3.0)


def test_last_head_reads_the_end_of_page_position(pretrained_dir):
    rm = build_reward_model(pretrained_dir, "pretrained", NORM, reward_head="last").eval()
    prompts, pages = sequences(4)
    batch = collate_pages(prompts, pages, TOK.pad_id, TOK.eop_id)
    with torch.no_grad():
        out = rm(**batch)
        hidden = rm.model(**batch).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(out.logits[:, 0], rm.score(hidden[torch.arange(4), last])[:, 0])
    assert out.token_rewards is None


def test_reward_loss_by_hand():
    pred, target = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])  # errors 1, -2
    loss, metrics = reward_mse(pred, target)
    assert loss.item() == pytest.approx(2.5) and metrics["rm/train_bias"] == pytest.approx(-0.5)
    nan = float("nan")
    token_pred = torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    token_target = torch.tensor([[nan, 0.0, 2.0], [nan, nan, 3.0]])  # errors 2, 2, -2 over entity_scale 2
    entity_loss = token_reward_mse(token_pred, token_target, scale=2.0)
    assert entity_loss.item() == pytest.approx(1.0)
    assert (loss + 0.5 * entity_loss).item() == pytest.approx(2.5 + 0.5 * 1.0)  # what fit adds at weight 0.5


@pytest.mark.parametrize("head", ["entity_feedback", "entity_sum", "last"])
def test_save_load_round_trip_gives_identical_scores_in_reward_units(pretrained_dir, tmp_path, head):
    rm = build_reward_model(pretrained_dir, "pretrained", NORM, seed=0, reward_head=head, targets=TARGETS)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # a head that actually separates pages
    rm.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    prompts, pages = sequences(40)
    expected = predict(rm, prompts, pages, TOK.pad_id, TOK.eop_id) * 3.0 + 4.0  # de-normalized by hand

    scorer = PageRewardScorer.from_pretrained(tmp_path, batch_size=7)
    scores = scorer.score(prompts, pages)
    assert scores.shape == (40,) and scores.std() > 0.1
    np.testing.assert_array_equal(scores, PageRewardScorer.from_pretrained(tmp_path, batch_size=7).score(prompts, pages))
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-5)  # float32 sums, batches of 7 vs 128
    # [EOP] given or appended, one at a time or in padded batches: the same score
    with_eop = [p + [TOK.eop_id] for p in pages]
    np.testing.assert_allclose(scorer.score(prompts, with_eop), scores, rtol=1e-6, atol=1e-5)
    one_by_one = np.concatenate([scorer.score([p], [g]) for p, g in zip(prompts[:5], pages[:5])])
    np.testing.assert_allclose(one_by_one, scores[:5], rtol=1e-6, atol=1e-5)
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="one page per prompt"):
        scorer.score(prompts, pages[:-1])


def test_scorer_refuses_a_checkpoint_that_is_not_a_trained_reward_model(pretrained_dir, tmp_path):
    with pytest.raises(ValueError, match="not a trained reward model"):
        PageRewardScorer.from_pretrained(pretrained_dir)  # the generator: its head would be random
    with pytest.raises(FileNotFoundError, match="python recipes/train_rm.py"):
        PageRewardScorer.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("head", ["entity_feedback", "entity_sum"])
def test_token_rewards_are_the_heads_per_token_rewards_and_sum_to_the_page_score(pretrained_dir, tmp_path, head):
    rm = build_reward_model(pretrained_dir, "pretrained", NORM, seed=0, reward_head=head, targets=TARGETS)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    scorer = PageRewardScorer.from_pretrained(tmp_path, batch_size=7)
    prompts, pages = sequences(20)
    pages[3] = pages[3] + [TOK.eop_id]  # one page ends with its [EOP], the others get one appended
    per_token = scorer.score_tokens(prompts, pages)
    assert [len(t) for t in per_token] == [len(g) for g in pages]
    np.testing.assert_allclose([t.sum() for t in per_token], scorer.score(prompts, pages), rtol=1e-5, atol=1e-4)
    # By hand for one page: the head's token rewards at the page's positions, the appended [EOP]'s on the last.
    batch = collate_pages(prompts[:1], pages[:1], TOK.pad_id, TOK.eop_id)
    with torch.no_grad():
        tr = scorer.model(**batch).token_rewards[0].double().numpy()
    start, n = len(prompts[0]), len(pages[0])
    expected = tr[start:start + n].copy()
    expected[-1] += tr[start + n]
    np.testing.assert_allclose(per_token[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_token[3], scorer.score_tokens(prompts[3:4], pages[3:4])[0], rtol=1e-5, atol=1e-6)


def test_token_rewards_need_a_per_token_head(pretrained_dir, tmp_path):
    rm = build_reward_model(pretrained_dir, "pretrained", NORM, seed=0, reward_head="last", targets=TARGETS)
    rm.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="reward_head=entity_feedback or entity_sum"):
        PageRewardScorer.from_pretrained(tmp_path).score_tokens(*sequences(2))


def test_conservative_score_by_hand():
    s = np.array([[1.0, 2.0], [3.0, 2.0]])  # 2 members x 2 pages: they disagree on page 0 only
    np.testing.assert_allclose(conservative(s, 1.0), [2.0 - 1.0, 2.0])  # population std of (1, 3) is 1
    np.testing.assert_allclose(conservative(s, 0.0), [2.0, 2.0])
    np.testing.assert_array_equal(conservative(s[:1], 5.0), s[0])  # one member: its own scores
    with pytest.raises(ValueError, match="K >= 1"):
        conservative(np.zeros(3), 1.0)


def test_ensemble_scores_the_members_conservatively_and_its_token_rewards_still_sum(pretrained_dir, tmp_path):
    dirs = []
    for seed in (0, 1):
        rm = build_reward_model(pretrained_dir, "pretrained", NORM, seed=seed, reward_head="entity_feedback", targets=TARGETS)
        with torch.no_grad():
            rm.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
        rm.save_pretrained(tmp_path / f"m{seed}")
        TOK.save_pretrained(tmp_path / f"m{seed}")
        dirs.append(tmp_path / f"m{seed}")
    prompts, pages = sequences(12)
    members = [PageRewardScorer.from_pretrained(d).score(prompts, pages) for d in dirs]
    assert np.abs(members[0] - members[1]).max() > 0.1  # the members disagree somewhere
    ens = EnsembleScorer.from_dirs(dirs, k=0.5)
    scores = ens.score(prompts, pages)
    np.testing.assert_allclose(scores, (members[0] + members[1]) / 2 - 0.5 * np.abs(members[0] - members[1]) / 2, rtol=1e-6, atol=1e-6)
    assert (scores <= np.maximum(members[0], members[1]) + 1e-9).all()
    per_token = ens.score_tokens(prompts, pages)
    assert [len(t) for t in per_token] == [len(g) for g in pages]
    np.testing.assert_allclose([t.sum() for t in per_token], scores, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="k >= 0"):
        EnsembleScorer(ens.members, k=-1.0)
