"""The reward of a page, and the verl reward manager that hands it to the trainer.

    reward = RM score + format_weight * format score          (what the policy is trained on)
    reward = true reward + format_weight * format score       (reward_source=environment: simulator studies only)

The RM score is one reward model's, or an ensemble's scored conservatively (reward_model.scoring.EnsembleScorer:
the members' mean minus k standard deviations). A validator reward model, kept out of training, can score the same
pages: what a real deployment has in place of the truth to watch over-optimization (early stopping, rl/trainer.py).

`PageJudge` computes it for a batch of (prompt ids, page ids) without decoding text, together with what is
only logged: the ground-truth expected page reward where an environment is configured (never used for
training, so reward hacking shows as a growing gap between RM and true reward), the recall of the logged
impression's engaged titles, diversity and per-rule violations. Evaluation uses the
same judge.

`GenPageRewardManager` is registered with verl's reward-loop registry as "genpage" and is loaded by the recipe
through `reward.reward_manager.source=importlib` (`pkg://rl.reward_manager`), which imports this module in
verl's reward workers. Streamed (`reward_timing=streamed`), verl calls `run_single` once per sampled page as each
rollout finishes; the manager collects concurrent calls into one batch (`_MicroBatcher`) so the reward model and
the rule engine run batched. After the rollout (the default), the trainer calls `score_batch` on the whole batch
in its own process (rl/trainer.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rl import page_metrics as pm


@dataclass
class PageJudgement:
    """Scores of N pages. All arrays [N]."""

    reward: np.ndarray  # training reward: rm (or true, reward_source=environment) + format_weight * format
    rm: np.ndarray  # reward model score (reward units; an ensemble's conservative score)
    rm_std: np.ndarray  # the ensemble members' standard deviation (NaN for a single reward model)
    validator: np.ndarray  # the validator reward model's score (NaN without one; never trained on)
    format: np.ndarray  # format score (<= 0; 0 = no reward-mode rule violated)
    true: np.ndarray  # ground-truth expected page reward (NaN without an environment)
    recall: np.ndarray  # share of the logged impression's engaged titles on the page (NaN where it had none)
    diversity: np.ndarray  # mean pairwise content distance among the page's titles
    n_entities: np.ndarray  # titles on the page
    violations: dict[str, np.ndarray] = field(default_factory=dict)  # rule -> violations per page (audit)
    entities: list[np.ndarray] = field(default_factory=list)  # per page: catalog indices of its titles
    token_reward: list[np.ndarray] | None = None  # per page [len(page)]: training reward per token, summing to `reward`

    def extra_info(self, i: int) -> dict[str, float]:
        """Page i's logged values, keyed as verl's reward_extra_info (scalars only: verl stacks them)."""
        out = {pm.EXTRA_RM: float(self.rm[i]), pm.EXTRA_FORMAT: float(self.format[i]),
               pm.EXTRA_TRUE: float(self.true[i]), pm.EXTRA_RECALL: float(self.recall[i]),
               pm.EXTRA_DIVERSITY: float(self.diversity[i]),
               pm.EXTRA_ENTITIES: float(self.n_entities[i])}
        for key, values in ((pm.EXTRA_RM_STD, self.rm_std), (pm.EXTRA_VALIDATOR, self.validator)):
            if np.isfinite(values[i]):  # set for every page of a run or for none (verl stacks the keys)
                out[key] = float(values[i])
        out.update({pm.EXTRA_VIOLATIONS_PREFIX + r: float(v[i]) for r, v in self.violations.items()})
        return out


def load_rules(policy_dir: str | Path, data_dir: str | Path):
    """The checkpoint's business rules (config.json), else the dataset's default ruleset."""
    from policies.rules import RuleSet, dataset_ruleset
    from policies.tokenizer import GenPageTokenizer

    try:
        return RuleSet.from_pretrained(policy_dir)
    except ValueError:
        return dataset_ruleset(data_dir, tok=GenPageTokenizer.from_pretrained(policy_dir))


class PageJudge:
    """Reward model + format reward + ground truth + page metrics for batches of token-id pages.

    env: a homepage.environment.Environment or None; tok: GenPageTokenizer; rules: policies.rules.RuleSet; rm:
    anything with `score(prompts, pages) -> [N]` (reward_model.scoring.PageRewardScorer, or an EnsembleScorer);
    entity_ids and content: the catalog's ids and content embeddings [N, D] (for diversity); validator: a scorer
    whose score is only logged, or None."""

    def __init__(self, env, tok, rules, rm, format_weight: float, entity_ids: list[str], content: np.ndarray,
                 reward_source: str = "rm", validator=None):
        self.env, self.tok, self.rules, self.rm, self.validator = env, tok, rules, rm, validator
        self.format_weight = float(format_weight)
        if reward_source not in ("rm", "environment"):
            raise ValueError(f"reward_source must be 'rm' or 'environment', not {reward_source!r}")
        if reward_source == "environment" and env is None:
            raise ValueError("reward_source=environment trains on the environment's true reward: configure an environment "
                             "(environment=auto with a dataset that declares one, or a dotted path)")
        self.reward_source = reward_source
        self.entity_ids = list(entity_ids)
        self.token_entity = pm.token_entity_index(tok.tokens, {e: i for i, e in enumerate(self.entity_ids)})  # [V]
        self.content = np.asarray(content, dtype=np.float64)  # [N, D]

    @classmethod
    def from_dirs(cls, data_dir: str | Path, environment: str, policy_dir: str | Path, rm_dir: str | Path,
                  format_weight: float, reward_source: str = "rm", ensemble: tuple = (), ensemble_k: float = 1.0,
                  validator_dir: str | Path | None = None) -> "PageJudge":
        """From the dataset directory and its environment setting, the policy checkpoint (tokenizer, business
        rules) and the RM directory; reward_source: what `reward` is built on, 'rm' or 'environment';
        ensemble: more RM directories scored with rm_dir as one conservative ensemble (mean - ensemble_k * std);
        validator_dir: a reward model only logged (None: none)."""
        from homepage.dataset import load_dataset
        from homepage.environment import load_environment
        from policies.tokenizer import GenPageTokenizer
        from reward_model.scoring import EnsembleScorer, PageRewardScorer

        dataset = load_dataset(data_dir)
        rm = (EnsembleScorer.from_dirs([rm_dir, *ensemble], ensemble_k) if ensemble
              else PageRewardScorer.from_pretrained(rm_dir))
        validator = PageRewardScorer.from_pretrained(validator_dir) if validator_dir else None
        return cls(load_environment(environment, dataset), GenPageTokenizer.from_pretrained(policy_dir),
                   load_rules(policy_dir, data_dir), rm, format_weight, dataset.entity_ids, dataset.content_matrix(),
                   reward_source, validator)

    def judge(self, prompts: list[list[int]], pages: list[list[int]], infos: list[dict[str, Any]] | None = None,
              per_token: bool = False) -> PageJudgement:
        """prompts: context ids ending with [PAGE]; pages: page ids (with [EOP] unless cut at the length limit);
        infos: per page the prompt's extra_info (its context and engaged titles, `rl.data.prompt_rows`);
        per_token: also split each page's training reward over its tokens (`token_reward`: the reward model's
        per-token rewards, the weighted format score on the last token; rl/advantage.py)."""
        from policies.evaluation import engaged_recall, pages_from_tokens
        from rl.data import contexts_from_extra_info

        n = len(pages)
        report = self.rules.format_reward(prompts, pages)
        fmt = np.asarray(report.score, dtype=np.float64)
        token_reward, rm_std = None, np.full(n, np.nan)
        if hasattr(self.rm, "score_with_spread"):  # an ensemble: one pass of each member
            rm, rm_std, token_reward = self.rm.score_with_spread(prompts, pages, per_token=per_token)
        elif per_token:  # one reward-model pass: the page score is the sum of its tokens' rewards
            token_reward = self.rm.score_tokens(prompts, pages)
            rm = np.array([t.sum() for t in token_reward], dtype=np.float64)
        else:
            rm = np.asarray(self.rm.score(prompts, pages), dtype=np.float64)
        if token_reward is not None:
            for t, f in zip(token_reward, fmt):
                if len(t):
                    t[-1] += self.format_weight * f
        validator = (np.asarray(self.validator.score(prompts, pages), dtype=np.float64) if self.validator is not None
                     else np.full(n, np.nan))
        true, recall = np.full(n, np.nan), np.full(n, np.nan)
        contexts = contexts_from_extra_info(infos) if infos is not None else None
        if contexts is not None:
            structured, _ = pages_from_tokens(self.tok, pages)
            recall = engaged_recall(structured, [set(i.get("engaged") or ()) for i in infos])
            if self.env is not None:
                true = np.asarray(self.env.true_page_reward(contexts, structured), dtype=np.float64)
        entities = [pm.page_entities(p, self.token_entity, self.tok.eop_id) for p in pages]
        base = rm
        if self.reward_source == "environment":
            if contexts is None or not np.isfinite(true).all():
                raise ValueError("reward_source=environment needs each page's context in its prompt's extra_info "
                                 "(rl.data.prompt_rows) and a finite true reward")
            base = true
        return PageJudgement(
            reward=base + self.format_weight * fmt, rm=rm, rm_std=rm_std, validator=validator, format=fmt, true=true,
            recall=recall,
            diversity=pm.page_diversity(entities, self.content), n_entities=np.array([len(e) for e in entities], float),
            violations={r: np.asarray(v, dtype=np.float64) for r, v in report.violations.items()}, entities=entities,
            token_reward=token_reward,
        )


def padded(values: np.ndarray, width: int) -> list[float]:
    """values [n] -> a list of `width` floats, zeros after the n values (n must not exceed width)."""
    if len(values) > width:
        raise ValueError(f"a page of {len(values)} tokens is longer than the response width {width}")
    return [float(v) for v in values] + [0.0] * (width - len(values))


class _MicroBatcher:
    """Collects concurrent `submit` calls for `max_wait_s` and runs `fn` once on the batch, in a thread."""

    def __init__(self, fn: Callable[[list], list], max_wait_s: float = 0.05):
        self.fn, self.max_wait_s = fn, max_wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._flush: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((item, fut))
        if self._flush is None:
            self._flush = loop.create_task(self._flush_later())
        return await fut

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.max_wait_s)
        batch, self._pending, self._flush = self._pending, [], None
        try:
            results = await asyncio.get_running_loop().run_in_executor(None, self.fn, [item for item, _ in batch])
        except Exception as e:  # every waiting page gets the error
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut), result in zip(batch, results):
            fut.set_result(result)


try:
    from verl.experimental.reward_loop.reward_manager import register
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
except ImportError:  # verl absent: PageJudge stays usable (evaluation, tests)
    RewardManagerBase, register = object, (lambda name: (lambda cls: cls))


@register("genpage")
class GenPageRewardManager(RewardManagerBase):
    """verl reward manager: token ids in, RM + weighted format reward out; ground truth in the extra info.

    Reads `genpage.{data_dir, environment, rm_dir, rm_ensemble, rm_ensemble_k, validator_rm_dir, format_weight,
    credit, reward_source}` and the policy directory
    (`actor_rollout_ref.model.path`, for the tokenizer and the business rules) from verl's config. With
    `credit=token`, the pages of training prompts also carry their per-token rewards (`EXTRA_TOKEN_REWARD`,
    padded to `data.max_response_length`) for rl/advantage.py; evaluation pages do not (verl averages every
    extra-info key of a validation page into its metrics).
    """

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None, reward_model_tokenizer=None, **_):
        super().__init__(config, tokenizer, compute_score)
        settings = config.genpage
        self.judge = PageJudge.from_dirs(settings.data_dir, settings.environment, config.actor_rollout_ref.model.path,
                                         settings.rm_dir, settings.format_weight, settings.get("reward_source", "rm"),
                                         tuple(settings.get("rm_ensemble") or ()), float(settings.get("rm_ensemble_k", 1.0)),
                                         settings.get("validator_rm_dir") or None)
        self.token_width = int(config.data.max_response_length) if settings.get("credit", "page") == "token" else None
        self.batcher = _MicroBatcher(self._judge_batch)

    def _judge_batch(self, items: list[tuple[list[int], list[int], dict]]) -> list[dict]:
        prompts, pages, infos = (list(x) for x in zip(*items))
        per_token = [self.token_width is not None and info.get("split") == "train" for info in infos]
        j = self.judge.judge(prompts, pages, infos, per_token=any(per_token))
        out = []
        for i in range(len(items)):
            extra = j.extra_info(i)
            if per_token[i]:
                extra[pm.EXTRA_TOKEN_REWARD] = padded(j.token_reward[i], self.token_width)
            out.append({"reward_score": float(j.reward[i]), "reward_extra_info": extra})
        return out

    async def run_single(self, data) -> dict:
        return await self.batcher.submit(batch_items(data[-1:])[0])  # single-turn: the last (only) sequence

    def score_batch(self, data):
        """A whole rollout batch scored in one judge pass, in the calling process: what verl's
        `RewardLoopManager.compute_rm_score` returns (`rm_scores` [B, T] with each page's reward on its last token;
        the extra info per key, stacked; `reward_extra_keys`), without sending the batch to a reward worker."""
        from verl import DataProto

        results = self._judge_batch(batch_items(data))
        rm_scores = self.assemble_rm_scores(data, [r["reward_score"] for r in results])  # [B, T]
        keys = list(results[0]["reward_extra_info"]) if results else []
        extra = {k: np.array([r["reward_extra_info"][k] for r in results]) for k in keys}
        return DataProto.from_dict(tensors={"rm_scores": rm_scores}, non_tensors=extra, meta_info={"reward_extra_keys": keys})


def batch_items(data) -> list[tuple[list[int], list[int], dict]]:
    """verl's rollout DataProto -> per page (prompt ids, page ids, the prompt's extra_info), padding removed. A batch
    left-pads its prompts and right-pads its responses (`attention_mask` [B, P + T] marks the real tokens); one
    rollout streamed from the agent loop also carries its lengths (`prompt_len`, `response_len`)."""
    prompts, responses = data.batch["prompts"], data.batch["responses"]  # [B, P], [B, T]
    width = prompts.shape[1]
    mask = data.batch["attention_mask"].bool()  # [B, P + T]
    nt = data.non_tensor_batch
    items = []
    for i in range(len(data)):
        if "prompt_len" in nt:
            prompt = prompts[i, : int(nt["prompt_len"][i])]
            page = responses[i, : int(nt["response_len"][i])]
        else:
            prompt, page = prompts[i][mask[i, :width]], responses[i][mask[i, width:]]
        info = nt["extra_info"][i] if "extra_info" in nt else None
        items.append((prompt.tolist(), page.tolist(), dict(info or {})))
    return items
