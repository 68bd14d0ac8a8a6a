"""The reward of a page (RM + weighted format reward), the logged ground truth and page metrics, on a hand-made
batch; and verl's per-sample calls collected into one batched judgement."""

import asyncio
import dataclasses

import numpy as np
import pytest
import torch

from homepage.catalog import GENRES
from homepage.pages import Page, PageBatch, Row
from homepage.logs import Impression
from homepage.world import SimulatorEnvironment, world_contexts
from policies.rules import RuleConfig, RuleModes, build_ruleset
from rl import page_metrics as pm
from rl.data import prompt_rows
from tests.toy import world_dataset, world_tokenizer
from rl.reward_manager import PageJudge


class LengthRM:
    """Stand-in reward model: 0.1 x page tokens (easy to check by hand)."""

    def score(self, prompts, pages):
        return np.array([0.1 * len(p) for p in pages])

    def score_tokens(self, prompts, pages):
        return [np.full(len(p), 0.1) for p in pages]


@pytest.fixture(scope="module")
def judge(small_world, tmp_path_factory):
    c = small_world.catalog
    dataset = world_dataset(small_world, tmp_path_factory.mktemp("data"))
    tok = world_tokenizer(small_world)
    # dedup enforced by the format reward (weight 1 per violation), every other rule as a mask (audited).
    config = RuleConfig(modes=RuleModes(dedup="reward"), critical_rows={})
    rules = build_ruleset(tok, dataset, config)
    return PageJudge(SimulatorEnvironment(dataset), tok, rules, LengthRM(), 2.0, c.entity_ids, c.content_emb)


def genre_rows(world, genres: list[str], n: int) -> list[Row]:
    """One row per genre of n distinct titles of that genre (no title in two rows)."""
    c, used, rows = world.catalog, set(), []
    for g in genres:
        idx = [i for i in np.flatnonzero(c.genres[:, GENRES.index(g)]) if i not in used][:n]
        assert len(idx) == n, f"small world has too few {g} titles"
        used.update(idx)
        rows.append(Row(f"genre_{g}", tuple(c.entity_ids[i] for i in idx)))
    return rows


def logged(contexts, page: Page | None = None, engaged: int = 0) -> list[Impression]:
    """Impressions of `contexts` whose logged page is `page` with its first `engaged` titles rewarded."""
    page = page or Page(())
    rewards = [[1.0 if (r, c) in {divmod(i, 3) for i in range(engaged)} else 0.0 for c in range(len(row.entity_ids))]
               for r, row in enumerate(page.rows)]
    return [Impression(i, "train", ctx, page, (), (), (), tuple(map(tuple, rewards)), float(engaged))
            for i, ctx in enumerate(contexts)]


def world_prompts(world, user: np.ndarray, seed: int = 0):
    req = world.sample_requests(np.random.default_rng(seed), user)
    return user, req, world_contexts(world, user, req)


def test_hand_made_batch(judge, small_world):
    world, tok = small_world, judge.tok
    adult = int(np.flatnonzero(world.users.profile_type == 0)[0])
    user, req, contexts = world_prompts(world, np.array([adult, adult]))
    clean = Page(tuple(genre_rows(world, ["comedy", "family", "drama"], 3)))
    # the logged impression's engaged titles: the first two of the clean page's first row
    infos = [r["extra_info"] for r in prompt_rows(tok, logged(contexts, clean, engaged=2), "train")]
    prompts = [tok.encode_context(c) for c in contexts]
    # Same page, but the first row repeats its first title in its last slot: one dedup violation.
    first = clean.rows[0]
    dup = Page((Row(first.row_id, first.entity_ids[:2] + first.entity_ids[:1]),) + clean.rows[1:])
    pages = [tok.encode_page(clean), tok.encode_page(dup)]
    assert len(pages[0]) == len(pages[1]) == 3 * 4 + 1  # 3 rows of (row token + 3 titles) + [EOP]

    j = judge.judge(prompts, pages, infos)

    # RM: 0.1 x 13 tokens = 1.3 for both. Format: 0 and -1 (one duplicate). Reward = RM + 2.0 x format.
    np.testing.assert_allclose(j.rm, [1.3, 1.3])
    np.testing.assert_allclose(j.format, [0.0, -1.0])
    np.testing.assert_allclose(j.reward, [1.3, -0.7])
    assert j.violations["dedup"].tolist() == [0, 1]
    # Ground truth: the world's exact expected page reward of the same (user, request, page).
    batch = PageBatch.from_pages([clean, dup], world.entity_index)
    np.testing.assert_allclose(j.true, world.true_page_reward(user, req, batch))
    # Recall of the logged engaged titles (the first two of row 0): both on either page.
    np.testing.assert_allclose(j.recall, [1.0, 1.0])
    # Diversity: mean pairwise 1 - cos over the 9 titles (the duplicate pair counts as distance 0).
    unit = world.catalog.content_emb / np.linalg.norm(world.catalog.content_emb, axis=1, keepdims=True)
    for b, page in enumerate([clean, dup]):
        idx = [world.entity_index[e] for e in page.entity_ids]
        sim = unit[idx] @ unit[idx].T
        assert j.diversity[b] == pytest.approx((1 - sim)[np.triu_indices(9, 1)].mean())
    assert j.n_entities.tolist() == [9, 9]
    extra = j.extra_info(1)
    assert extra[pm.EXTRA_FORMAT] == -1.0 and extra["violations/dedup"] == 1.0 and extra[pm.EXTRA_TRUE] == pytest.approx(j.true[1])
    assert j.token_reward is None

    # Per token: the RM's 0.1 per token, the weighted format score (-2.0 on the dedup page) on the last token.
    per_token = judge.judge(prompts, pages, infos, per_token=True)
    np.testing.assert_allclose(per_token.token_reward[0], [0.1] * 13)
    np.testing.assert_allclose(per_token.token_reward[1], [0.1] * 12 + [0.1 - 2.0])
    np.testing.assert_allclose([t.sum() for t in per_token.token_reward], j.reward)
    np.testing.assert_allclose(per_token.reward, j.reward)

    # reward_source=environment: the environment's truth + the weighted format score is trained on; the RM still logged.
    truth = PageJudge(judge.env, tok, judge.rules, judge.rm, 2.0, judge.entity_ids, judge.content, reward_source="environment")
    t = truth.judge(prompts, pages, infos)
    np.testing.assert_allclose(t.reward, j.true + 2.0 * j.format)
    np.testing.assert_allclose(t.rm, j.rm)
    with pytest.raises(ValueError, match="needs each page's context"):
        truth.judge(prompts, pages)
    with pytest.raises(ValueError, match="configure an environment"):
        PageJudge(None, tok, judge.rules, judge.rm, 2.0, judge.entity_ids, judge.content, reward_source="environment")


class ScaledRM(LengthRM):
    """Stand-in reward model: `scale` x 0.1 x page tokens."""

    def __init__(self, scale: float):
        self.scale = scale

    def score(self, prompts, pages):
        return self.scale * super().score(prompts, pages)

    def score_tokens(self, prompts, pages):
        return [self.scale * t for t in super().score_tokens(prompts, pages)]


def test_ensemble_and_validator_scores_with_the_gaps_they_log(judge, small_world):
    from reward_model.scoring import EnsembleScorer

    tok = judge.tok
    adult = int(np.flatnonzero(small_world.users.profile_type == 0)[0])
    _, _, contexts = world_prompts(small_world, np.array([adult, adult]))
    page = Page(tuple(genre_rows(small_world, ["comedy", "family", "drama"], 3)))
    infos = [r["extra_info"] for r in prompt_rows(tok, logged(contexts, page), "train")]
    prompts, pages = [tok.encode_context(c) for c in contexts], [tok.encode_page(page), tok.encode_page(page)[:5]]
    # members 1x and 3x the length score: 13 tokens -> 1.3 and 3.9, mean 2.6, std 1.3; k = 0.5 -> 1.95
    ens = PageJudge(judge.env, tok, judge.rules, EnsembleScorer([ScaledRM(1.0), ScaledRM(3.0)], k=0.5), 2.0,
                    judge.entity_ids, judge.content, validator=ScaledRM(2.0))
    j = ens.judge(prompts, pages, infos)
    np.testing.assert_allclose(j.rm, [1.95, 0.75])  # 5 tokens: mean 1.0, std 0.5 -> 0.75
    np.testing.assert_allclose(j.rm_std, [1.3, 0.5])
    np.testing.assert_allclose(j.validator, [2.6, 1.0])
    per_token = ens.judge(prompts, pages, infos, per_token=True)
    np.testing.assert_allclose([t.sum() for t in per_token.token_reward], j.reward)
    np.testing.assert_allclose(per_token.rm_std, j.rm_std)
    extra = j.extra_info(0)
    assert extra[pm.EXTRA_RM_STD] == pytest.approx(1.3) and extra[pm.EXTRA_VALIDATOR] == pytest.approx(2.6)
    m = pm.rollout_metrics({k: np.array([j.extra_info(i)[k] for i in range(2)]) for k in extra}, j.reward)
    assert m[pm.RM_VALIDATOR_GAP] == pytest.approx(np.mean(j.rm - j.validator))
    assert m[pm.RM_TRUTH_GAP] == pytest.approx(np.mean(j.rm - j.true))
    assert m[pm.RM_STD] == pytest.approx(0.9)
    # a single reward model, no validator: neither key is sent (verl stacks the keys of every page)
    plain = judge.judge(prompts, pages, infos).extra_info(0)
    assert pm.EXTRA_RM_STD not in plain and pm.EXTRA_VALIDATOR not in plain


def test_page_diversity_by_hand():
    content = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # pairs: (0,1) cos 0 -> 1; (0,2) cos 1/sqrt2 -> 0.2929; (1,2) -> 0.2929; mean = 0.5286
    d = pm.page_diversity([np.array([0, 1, 2]), np.array([1]), np.array([0, 0])], content)
    np.testing.assert_allclose(d, [(1 + 2 * (1 - 1 / np.sqrt(2))) / 3, 0.0, 0.0])
    assert pm.catalog_coverage([np.array([0, 1]), np.array([1])], 4) == 0.5


def test_manager_batches_verl_per_sample_calls(judge, small_world):
    """verl calls run_single once per page; concurrent calls are judged as one batch, results in order."""
    from verl import DataProto

    from rl.reward_manager import GenPageRewardManager

    calls = []

    class Spy(PageJudge):
        def judge(self, prompts, pages, infos=None, per_token=False):
            calls.append(len(pages))
            return super().judge(prompts, pages, infos, per_token)

    manager = GenPageRewardManager.__new__(GenPageRewardManager)
    manager.judge = Spy(judge.env, judge.tok, judge.rules, judge.rm, judge.format_weight, judge.entity_ids, judge.content)
    from rl.reward_manager import _MicroBatcher

    manager.batcher = _MicroBatcher(manager._judge_batch)
    manager.token_width = None  # credit=page
    world, tok = small_world, judge.tok
    _, _, contexts = world_prompts(world, np.arange(3))
    rows = prompt_rows(tok, logged(contexts), "train")
    prompts = [tok.encode_context(c) for c in contexts]
    pages = [[tok.eop_id], [tok.vocab["row:genre_comedy"], tok.eop_id], [tok.vocab["row:genre_drama"]]]

    def item(i):  # what verl's agent loop hands a reward worker for one rollout
        p, r = torch.tensor(prompts[i]), torch.tensor(pages[i])
        return DataProto.from_dict(
            tensors={"prompts": p[None], "responses": r[None], "attention_mask": torch.ones(1, len(p) + len(r), dtype=torch.long)},
            non_tensors={"extra_info": np.array([rows[i]["extra_info"]], dtype=object),
                         "prompt_len": np.array([len(p)]), "response_len": np.array([len(r)])})

    async def run_all():
        return await asyncio.gather(*(manager.run_single(item(i)) for i in range(3)))

    out = asyncio.run(run_all())
    assert calls == [3]
    np.testing.assert_allclose([o["reward_score"] for o in out], [0.1, 0.2, 0.1])
    assert set(out[0]["reward_extra_info"]) >= {pm.EXTRA_RM, pm.EXTRA_TRUE, pm.EXTRA_FORMAT, "violations/structure"}
    # An unfinished page is a structure violation (audited, mask-mode, not in the format reward).
    assert out[2]["reward_extra_info"]["violations/structure"] >= 1
    assert all(pm.EXTRA_TOKEN_REWARD not in o["reward_extra_info"] for o in out)

    # credit=token: training pages carry their per-token rewards, padded to the response width; held-out pages
    # (the evaluation's) do not.
    manager.token_width = 4
    out = asyncio.run(run_all())
    np.testing.assert_allclose([o["reward_extra_info"][pm.EXTRA_TOKEN_REWARD] for o in out],
                               [[0.1, 0, 0, 0], [0.1, 0.1, 0, 0], [0.1, 0, 0, 0]])
    rows = prompt_rows(tok, logged(contexts), "test")
    out = asyncio.run(run_all())
    assert all(pm.EXTRA_TOKEN_REWARD not in o["reward_extra_info"] for o in out)


class PromptLengthRM(LengthRM):
    """Stand-in reward model that also sees the prompt: 0.1 x page tokens + 0.01 x prompt tokens."""

    def score(self, prompts, pages):
        return np.array([0.1 * len(g) + 0.01 * len(p) for p, g in zip(prompts, pages)])


def test_whole_batch_scored_like_its_pages_without_padding(judge, small_world):
    """score_batch (the trainer's scoring after the rollout) on a verl batch (prompts left-padded, pages
    right-padded) gives each page what run_single gives it alone: padding is not part of the prompt or the page,
    the reward sits on the page's last token, and the extra info is stacked per key."""
    from verl import DataProto

    from rl.reward_manager import GenPageRewardManager, _MicroBatcher

    manager = GenPageRewardManager.__new__(GenPageRewardManager)
    manager.judge = PageJudge(judge.env, judge.tok, judge.rules, PromptLengthRM(), judge.format_weight,
                              judge.entity_ids, judge.content)
    manager.batcher, manager.token_width = _MicroBatcher(manager._judge_batch), None
    tok = judge.tok
    _, _, contexts = world_prompts(small_world, np.arange(3))
    contexts[1] = dataclasses.replace(contexts[1], history=contexts[1].history[:-1])  # a shorter prompt: padding shows
    rows = prompt_rows(tok, logged(contexts), "train")
    prompts = [tok.encode_context(c) for c in contexts]
    assert len({len(p) for p in prompts}) > 1
    pages = [[tok.eop_id], [tok.vocab["row:genre_comedy"], tok.eop_id], [tok.vocab["row:genre_drama"]]]
    P, T, pad = max(map(len, prompts)), max(map(len, pages)), tok.pad_id

    def left(p):
        return [pad] * (P - len(p)) + p

    def right(g):
        return g + [pad] * (T - len(g))

    batch = DataProto.from_dict(
        tensors={"prompts": torch.tensor([left(p) for p in prompts]), "responses": torch.tensor([right(g) for g in pages]),
                 "attention_mask": torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(g)) + [0] * (T - len(g))
                                                 for p, g in zip(prompts, pages)])},
        non_tensors={"extra_info": np.array([r["extra_info"] for r in rows], dtype=object)})
    out = manager.score_batch(batch)

    expected = [0.1 * len(g) + 0.01 * len(p) for p, g in zip(prompts, pages)]
    scores = out.batch["rm_scores"]  # [3, T]
    np.testing.assert_allclose(scores.sum(-1).numpy(), expected, rtol=1e-6)
    assert [int(s.nonzero()[-1]) for s in scores] == [len(g) - 1 for g in pages]

    def alone(i):
        p, g = torch.tensor(prompts[i]), torch.tensor(pages[i])
        return DataProto.from_dict(
            tensors={"prompts": p[None], "responses": g[None], "attention_mask": torch.ones(1, len(p) + len(g), dtype=torch.long)},
            non_tensors={"extra_info": np.array([rows[i]["extra_info"]], dtype=object),
                         "prompt_len": np.array([len(p)]), "response_len": np.array([len(g)])})

    single = [asyncio.run(manager.run_single(alone(i))) for i in range(3)]
    np.testing.assert_allclose([s["reward_score"] for s in single], expected, rtol=1e-6)
    assert out.meta_info["reward_extra_keys"] == list(single[0]["reward_extra_info"])
    for key in out.meta_info["reward_extra_keys"]:
        np.testing.assert_allclose(out.non_tensor_batch[key].astype(float), [s["reward_extra_info"][key] for s in single])
