"""What the policy tests share: the test rules (page shape, pinned and critical rows), prompts of the small world,
random walks under the masks, and the untrained tiny GenPage checkpoint the generation tests run on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from homepage.catalog import CONTINUE_WATCHING, ENTITY_TYPES, TRENDING
from homepage.world import world_contexts
from policies.build import ModelSize, build_model
from policies.rules import PageShape, RuleConfig, build_ruleset
from tests.toy import toy_tokenizer, world_dataset

SHAPE = PageShape(min_rows=2, max_rows=4, min_row_len=3, max_row_len=5)
CONFIG = RuleConfig(shape=SHAPE, pinned_rows={TRENDING: 0}, critical_rows={CONTINUE_WATCHING: 3})


def prompt_of(world, tok, user: int, seed: int = 0) -> list[int]:
    req = world.sample_requests(np.random.default_rng(seed), np.array([user]))
    return tok.encode_context(world_contexts(world, np.array([user]), req)[0])


def walk(rules, tok, prompt, rng, max_len=60, noise=0.0):
    """Writes a page choosing among allowed tokens (or, with probability `noise`, any token)."""
    page = []
    for _ in range(max_len):
        allowed = rules.allowed_step([prompt], [page])[0].numpy()
        assert allowed.any(), f"dead end after {page}"
        pool = np.arange(len(tok)) if rng.random() < noise else np.flatnonzero(allowed)
        t = int(rng.choice(pool))
        page.append(t)
        if t == tok.eop_id:
            break
    return page


def tiny_checkpoint(world, directory: Path, max_history: int = 20):
    """An untrained 1-layer GenPage with the test rules (2-4 rows of 3-5 titles, trending pinned first,
    Continue Watching within 3 rows) saved with its tokenizer. Returns (model dir, model, tokenizer, rules)."""
    c = world.catalog
    tok = toy_tokenizer(c.entity_ids, max_history, [ENTITY_TYPES[t] for t in c.entity_type])
    rules = build_ruleset(tok, world_dataset(world, directory / "data"), CONFIG)
    rng = np.random.default_rng(0)
    content = {e: rng.normal(size=8).astype(np.float32) for e in c.entity_ids}
    model = build_model(tok, content, ModelSize(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)).eval()
    model.attach_rules(rules)
    model.save_pretrained(directory / "model")
    tok.save_pretrained(directory / "model")
    return directory / "model", model, tok, rules


def sample_prompts(world, tok):
    users = np.concatenate([np.flatnonzero(world.users.profile_type == 1)[:6], np.arange(18)])  # kids profiles too
    return [prompt_of(world, tok, int(u), seed=i) for i, u in enumerate(users)]
