"""The expensive objects the policy tests share, built once per session: the tiny GenPage checkpoint and the
vLLM engine on it (an engine start is the costliest thing a policy test does)."""

import pytest

from tests.policies.helpers import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_genpage(small_world, tmp_path_factory):
    """(model dir, model, tokenizer, rules) of the untrained tiny GenPage with the test rules (helpers.CONFIG),
    prompts of up to 20 history actions (the small world's history_max). Tests that change the model's config
    restore it."""
    directory = tmp_path_factory.mktemp("tiny_genpage")
    return tiny_checkpoint(small_world, directory, max_history=small_world.config.history_max)


@pytest.fixture(scope="session")
def generation_llm(tiny_genpage):
    """vLLM engine on `tiny_genpage` as PageGenerator builds it: the entry-point rule processor (on every
    request that does not opt out), the hybrid-decoding processor (only on requests that ask for it) and
    processed (masked) log-probs. Tests that use it are `engine` tests (tests/conftest.py refuses them unmarked)."""
    from policies.generate import make_generation_llm

    llm = make_generation_llm(tiny_genpage[0], seed=0)
    yield llm
    # Stop the engine process now: left to the interpreter's exit it is killed after pytest closed its output.
    llm.llm_engine.engine_core.shutdown()
