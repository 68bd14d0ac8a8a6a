"""Paginated homepage generation with in-session feedback (paper section 2.3).

The first page holds the first `rows_per_page` rows. The user browses it (an environment's session model draws
the session), and the next page is generated from a prompt that holds what happened:

    [BOS] ... [HIST] (history) (in-session actions on earlier pages) [PAGE] (rows of earlier pages) -> next rows

In-session actions are written like history actions, most recent last, with time bucket 0 (minutes ago) and
the share watched: abandon -> act:abandon, short or long play -> act:play, binge -> act:binge, a thumbs-up ->
act:thumbs_up (the tokenizer keeps the newest `max_history` actions). No new tokens: the vocabulary is the
model's. The rows of earlier pages sit after [PAGE] as the page so far, so the rule engine counts them: no
title or row repeats across pages, pins, critical rows and max_rows hold for the homepage as a whole, and a
title the user started in this session becomes eligible for Continue Watching. A page ends when the model
would open a row beyond its quota (policies.hybrid.control_logits); [EOP] ends the homepage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from homepage.logs import Context, HistoryAction
from homepage.pages import Page
from policies.hybrid import HybridConfig

# browse(contexts, pages, rng) -> per page (in-session history actions in page order, {entity id: what the user
# did}): an interactive environment's session model (homepage.world.SimulatorEnvironment.browse).
Browse = Callable[[Sequence[Context], Sequence[Page], np.random.Generator], list[tuple[list[HistoryAction], dict[str, str]]]]


@dataclass
class Session:
    """One user's paginated homepage.

    pages: the rows of each page, in order; feedback: per page, {entity id: feedback name (+ thumbs up)} for
    the titles the user acted on; page_ids: all pages' tokens as one page ([EOP] appended when the model
    ended the homepage); prompts: the prompt each page was generated from; decode_steps: forward passes over
    all pages; ended: the model wrote [EOP]."""

    pages: list[Page] = field(default_factory=list)
    feedback: list[dict[str, str]] = field(default_factory=list)
    page_ids: list[int] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    decode_steps: int = 0
    ended: bool = False


def paginate(gen, contexts: Sequence[Context], browse: Browse, rows_per_page: int, n_pages: int,
             temperature: float = 0.0, hybrid: HybridConfig = HybridConfig(), rng: np.random.Generator | None = None
             ) -> list[Session]:
    """Up to n_pages pages of rows_per_page rows for each context, with the feedback `browse` draws between
    pages. gen: a policies.generate.PageGenerator."""
    from dataclasses import replace

    from policies.evaluation import pages_from_tokens

    if rows_per_page < 1 or n_pages < 1:
        raise ValueError("paginate: rows_per_page and n_pages must be >= 1")
    rng = rng or np.random.default_rng(0)
    tok = gen.tok
    contexts = list(contexts)
    sessions = [Session() for _ in contexts]
    extra: list[list[HistoryAction]] = [[] for _ in contexts]  # in-session actions so far
    n_rows = [0] * len(contexts)
    for _ in range(n_pages):
        live = [b for b, s in enumerate(sessions) if not s.ended]
        if not live:
            break
        prompts = [tok.encode_context(replace(contexts[b], history=contexts[b].history + tuple(extra[b]))) for b in live]
        results = gen.decode(prompts, prefixes=[sessions[b].page_ids for b in live], temperature=temperature,
                             hybrid=hybrid, row_limits=[n_rows[b] + rows_per_page for b in live])
        chunks = []
        for b, p, res in zip(live, prompts, results):
            r, s = res[0], sessions[b]
            s.prompts.append(p)
            s.decode_steps += r.decode_steps
            s.ended = tok.eop_id in r.page_ids or not r.at_row_limit  # [EOP], or out of token budget
            chunk = [t for t in r.page_ids if t != tok.eop_id]
            s.page_ids += chunk
            chunks.append(chunk + [tok.eop_id])
        pages, _ = pages_from_tokens(tok, chunks)
        outcomes = browse([contexts[b] for b in live], pages, rng)
        for i, b in enumerate(live):
            page = tok.decode(chunks[i], strict=False)
            n_rows[b] += len(page.rows)
            actions, summary = outcomes[i]
            extra[b] += actions
            sessions[b].pages.append(page)
            sessions[b].feedback.append(summary)
    for s in sessions:
        if s.ended and s.page_ids[-1:] != [tok.eop_id]:
            s.page_ids.append(tok.eop_id)
    return sessions
