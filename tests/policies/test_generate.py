"""The page generation API on an untrained tiny GenPage: hybrid row decoding with k >= row length is plain
decoding (greedy, vLLM and HF); a fill is the top allowed titles at the fill point and costs k + 2 decode
steps per row; hybrid, sampled and paginated pages never break a mask rule; the HF loop is HF `generate`;
the CLI prints readable pages. The vLLM backend runs on the session's `generation_llm` (tests/policies/conftest.py);
the tests that use it are `engine` tests."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from policies.generate import PageGenerator
from policies.hf_generation import generate_pages_hf
from policies.hybrid import NO_LIMIT, HybridConfig, control_logits
from tests.policies.helpers import SHAPE, sample_prompts
from tests.toy import world_dataset

# The vLLM cases run on the session's engine; the first engine test of a session also starts it.
VLLM = [pytest.mark.engine, pytest.mark.timeout(60)]
BACKENDS = [pytest.param("vllm", marks=VLLM), "hf"]


@pytest.fixture(scope="module")
def setup(small_world, tiny_genpage):
    model_dir, model, tok, rules = tiny_genpage
    return model_dir, model, tok, rules, sample_prompts(small_world, tok)


@pytest.fixture(scope="module")
def vllm_gen(setup, generation_llm):
    return PageGenerator(setup[0], backend="vllm", seed=0, llm=generation_llm)


@pytest.fixture(scope="module")
def hf_gen(setup):
    model_dir, model = setup[:2]
    return PageGenerator(model_dir, backend="hf", model=model, hf_batch_size=8)


def pages_of(results):
    return [r.page_ids for res in results for r in res]


def test_control_merges_row_tokens_into_the_stop_token_at_the_row_limit(setup):
    _, _, tok, rules, _ = setup
    V = rules.vocab_size
    r0, r1 = rules.row_token[:2].tolist()
    logits = torch.full((3, V), float("-inf"))
    logits[:, r0], logits[:, r1], logits[:, tok.eop_id] = 1.0, 2.0, 0.5
    n_rows = torch.tensor([2, 2, 1])
    out = control_logits(logits.clone(), rules, n_rows, row_len=torch.full((3,), 3), cur_row=torch.zeros(3, dtype=torch.long),
                         fill_k=torch.full((3,), NO_LIMIT), row_limit=torch.tensor([2, 2, 2]),
                         temperature=torch.tensor([0.0, 1.0, 1.0]), stop_id=tok.pad_id)
    # greedy: max(1, 2) = 2; T = 1: log(e^1 + e^2) = 2.3133; the third request is below its limit: unchanged
    assert out[0, tok.pad_id] == pytest.approx(2.0) and out[1, tok.pad_id] == pytest.approx(2.3133, abs=1e-4)
    assert torch.isinf(out[:2, [r0, r1]]).all() and (out[:2, tok.eop_id] == 0.5).all()
    assert torch.equal(out[2], logits[2])


def test_control_closes_filled_rows_and_rows_of_earlier_pages(setup):
    _, _, tok, rules, _ = setup
    V = rules.vocab_size
    logits = torch.zeros(4, V)
    out = control_logits(logits, rules, n_rows=torch.tensor([1, 1, 2, 3]), row_len=torch.tensor([3, 2, 4, 4]),
                         cur_row=torch.tensor([0, 0, 1, 2]), fill_k=torch.tensor([1, 2, NO_LIMIT, NO_LIMIT]),
                         row_limit=torch.full((4,), NO_LIMIT), temperature=torch.zeros(4), stop_id=tok.pad_id,
                         sealed_rows=torch.tensor([0, 0, 2, 2]))
    assert torch.isinf(out[0, rules.is_entity]).all() and (out[0, rules.row_token] == 0).all()  # 3 > k=1: filled
    assert (out[1] == 0).all()  # 2 titles, k = 2: the fill point itself, not yet filled
    assert torch.isinf(out[2, rules.is_entity]).all()  # row 2 was on an earlier page: final
    assert (out[3] == 0).all()  # row 3 is this page's


def test_hf_loop_is_hf_generate_and_hybrid_with_k_at_row_length_is_plain(setup, hf_gen):
    _, model, tok, rules, prompts = setup
    want = generate_pages_hf(model, tok, prompts, 0.0, 40, rules=rules)
    assert pages_of(hf_gen.decode(prompts)) == want
    assert pages_of(hf_gen.decode(prompts, hybrid=HybridConfig(fill_k=SHAPE.max_row_len))) == want


@pytest.mark.engine
@pytest.mark.timeout(60)
def test_vllm_hybrid_with_k_at_row_length_is_plain_vllm_decoding(setup, vllm_gen):
    from policies import vllm_engine

    _, _, tok, rules, prompts = setup
    want = [o[0]["token_ids"] for o in vllm_engine.generate(vllm_gen.llm, prompts, 0.0, 40, tok.eop_id)]
    assert rules.violations(prompts, want)["total"].sum() == 0
    for k in (None, SHAPE.max_row_len, SHAPE.max_row_len + 3):
        assert pages_of(vllm_gen.decode(prompts, hybrid=HybridConfig(fill_k=k))) == want, k


def check_fills(model, rules, prompts, results, k: int, target: int, tol: float = 0.0):
    """Every row was filled from the fill point's masked logits (teacher-forced HF forward): the titles after
    the first k + 1 are the best allowed ones there, best first; and decode steps are rows x (k + 2) + 1."""
    checked = 0
    for p, res in zip(prompts, results):
        page = res[0].page_ids
        assert page[-1] == rules.eop_id
        n_rows = sum(int(rules.is_row[t]) for t in page)
        assert res[0].decode_steps == n_rows * (k + 2) + 1
        starts = [i for i, t in enumerate(page) if rules.is_row[t]]
        for s in starts:
            fp = s + 1 + k  # the fill point: its token came from the decoder, the rest from the fill
            row = page[s + 1: (starts + [len(page) - 1])[starts.index(s) + 1]]
            allowed = rules.allowed_step([p], [page[:fp]])[0] & rules.is_entity
            assert len(row) == min(target, k + int(allowed.sum()))  # short only where the row ran out of titles
            with torch.no_grad():
                logits = model(torch.tensor([p + page[:fp]])).logits[0, -1]
            score = logits.masked_fill(~allowed, float("-inf"))
            fill = page[fp: s + 1 + len(row)]
            rest = score.clone()
            rest[fill] = float("-inf")
            vals = score[fill]
            assert (vals[:-1] >= vals[1:] - tol).all(), "fill not in score order"
            assert vals.min() >= rest.max() - tol, "a better allowed title was left out"
            checked += 1
    assert checked > len(prompts)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_hf_hybrid_fills_rows_with_the_best_allowed_titles(setup, hf_gen, k):
    _, model, _, rules, prompts = setup
    results = hf_gen.decode(prompts, hybrid=HybridConfig(fill_k=k, fill_row_len=SHAPE.max_row_len))
    assert rules.violations(prompts, pages_of(results))["total"].sum() == 0
    check_fills(model, rules, prompts, results, k, SHAPE.max_row_len)


@pytest.mark.engine
@pytest.mark.timeout(60)
def test_vllm_hybrid_fills_rows_with_the_best_allowed_titles(setup, vllm_gen):
    _, model, _, rules, prompts = setup
    k, target = 1, 4
    results = vllm_gen.decode(prompts, hybrid=HybridConfig(fill_k=k, fill_row_len=target))
    assert rules.violations(prompts, pages_of(results))["total"].sum() == 0
    check_fills(model, rules, prompts, results, k, target, tol=1e-4)  # vLLM vs HF logits: ~1e-5 apart


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_hybrid_pages_obey_the_rules_and_vary(setup, request, backend):
    _, _, tok, rules, prompts = setup
    gen = request.getfixturevalue(f"{backend}_gen")
    results = gen.decode(prompts, temperature=1.0, hybrid=HybridConfig(fill_k=1, fill_row_len=5), n=3)
    pages = pages_of(results)
    assert rules.violations([p for p in prompts for _ in range(3)], pages)["total"].sum() == 0
    assert all(p[-1] == tok.eop_id for p in pages)
    assert sum(len({tuple(r.page_ids) for r in res}) > 1 for res in results) > len(prompts) // 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row_at_a_time_with_row_limits_rebuilds_the_plain_page(setup, request, backend):
    """Greedy: a chunk stops exactly where the model would open another row, so continuing chunk by chunk
    from the same prompt writes the plain page."""
    _, _, tok, rules, prompts = setup
    gen = request.getfixturevalue(f"{backend}_gen")
    want = pages_of(gen.decode(prompts))
    pages = [[] for _ in prompts]
    for n_rows in range(1, SHAPE.max_rows + 1):
        todo = [i for i, page in enumerate(pages) if page[-1:] != [tok.eop_id]]
        res = gen.decode([prompts[i] for i in todo], prefixes=[pages[i] for i in todo], row_limits=[n_rows] * len(todo))
        for i, r in zip(todo, res):
            pages[i] += r[0].page_ids
            assert sum(int(rules.is_row[t]) for t in pages[i]) <= n_rows
            assert r[0].at_row_limit == (pages[i][-1] != tok.eop_id)
    assert pages == want


@pytest.mark.engine
@pytest.mark.timeout(60)
def test_generate_returns_structured_pages(small_world, setup, vllm_gen):
    from homepage.world import world_contexts

    users = np.arange(4)
    ctx = world_contexts(small_world, users, small_world.sample_requests(np.random.default_rng(0), users))
    pages = vllm_gen.generate(ctx, hybrid=HybridConfig(fill_k=0, fill_row_len=4))
    assert len(pages) == 4
    for g in pages:
        assert SHAPE.min_rows <= len(g.page.rows) <= SHAPE.max_rows
        assert all(SHAPE.min_row_len <= len(r.entity_ids) <= 4 for r in g.page.rows)
        # k = 0: the decoder writes the first title of each row, the fill the rest (up to 4, fewer where a
        # row's category runs out of titles)
        assert g.filled_titles == sum(len(r.entity_ids) - 1 for r in g.page.rows)
        assert g.decode_steps == 2 * len(g.page.rows) + 1


def test_cli_prints_readable_pages(small_world, setup, tmp_path):
    import pyarrow.parquet as pq

    from homepage.logs import batch_to_table

    model_dir = setup[0]
    data = tmp_path / "data"  # the world as a dataset directory, with logs to take held-out contexts from
    world_dataset(small_world, data)
    (data / "logs").mkdir()
    pq.write_table(batch_to_table(next(small_world.iter_logs(300)), small_world), data / "logs" / "part-00000.parquet")
    base = [sys.executable, "-m", "policies.generate", "--model", str(model_dir), "--data", str(data),
            "--backend", "hf", "--users", "2"]
    out = subprocess.run(base + ["--hybrid-k", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Trending Now" in text  # pinned first by the test rules
    assert "true expected page reward" in text and "decode steps" in text and "engaged-title recall" in text
    assert "row:" not in text and "ent:" not in text and "[EOP]" not in text  # names, not tokens
    assert sum(e in text for e in small_world.catalog.entity_ids) >= 2 * SHAPE.min_rows * SHAPE.min_row_len
    out = subprocess.run(base + ["--rows-per-page", "1", "--pages", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "page 1:" in out.stdout and "page 2:" in out.stdout
