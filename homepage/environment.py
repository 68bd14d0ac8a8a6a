"""Ground truth as a plug-in: the environment protocol and its loader.

An environment knows the true expected page reward of (context, page) pairs, which no log can tell (logs hold
one sampled outcome of one page per context). The simulator implements it (`homepage.world.SimulatorEnvironment`);
a team with its own simulator or a trusted counterfactual estimator plugs theirs by a dotted path in a recipe
config (`environment=my_pkg.my_module:MyEnvironment`), the way verl takes `custom_reward_function.path`. Every
`true_*` figure comes through it and exists only when one is configured.
"""

from __future__ import annotations

import importlib
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from homepage.logs import Context
from homepage.pages import Page

AUTO = "auto"  # recipe configs: the environment the dataset directory declares (dataset.yaml `environment`)


@runtime_checkable
class Environment(Protocol):
    """Built as `cls(dataset)` from a `homepage.dataset.Dataset`."""

    def true_page_reward(self, contexts: Sequence[Context], pages: Sequence[Page]) -> np.ndarray:
        """[B] exact expected page reward of page b shown in context b."""
        ...


def sample_contexts(env: Environment, n: int, split: str, seed: int) -> list[Context] | None:
    """n contexts of `split` users from environments that can sample them (optional), else None."""
    fn = getattr(env, "sample_contexts", None)
    return fn(n, split, seed) if fn is not None else None


def log_impressions(env: Environment, contexts: Sequence[Context], pages: Sequence[Page], rng: np.random.Generator,
                    first_id: int, policy: str):
    """Serves page b in context b and logs the outcome as a log table (docs/log_schema.md), for environments that
    can (optional: the simulator can; a team serves the policy online and brings the logs), else None."""
    fn = getattr(env, "log_impressions", None)
    return fn(contexts, pages, rng, first_id, policy) if fn is not None else None


def import_object(path: str):
    """'pkg.module:name' or 'pkg.module.name' -> the object."""
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not name:
        raise ValueError(f"environment {path!r}: expected a dotted path 'package.module:ClassName'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"environment {path!r} cannot be imported ({e}); check the dotted path and that the "
                         "module is on PYTHONPATH") from None


def load_environment(spec: str | None, dataset) -> Environment | None:
    """The configured environment of `dataset`: spec '' / None = none, 'auto' = the one dataset.yaml declares
    (none if it declares none), else a dotted path. Raises ValueError when the object lacks true_page_reward."""
    if spec == AUTO:
        spec = dataset.schema.environment
    if not spec:
        return None
    env = import_object(spec)(dataset)
    if not isinstance(env, Environment):
        raise ValueError(f"environment {spec!r} has no true_page_reward(contexts, pages) method (homepage.environment)")
    return env
