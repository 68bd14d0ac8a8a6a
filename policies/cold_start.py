"""Cold start (paper sections 6.1-6.2): a title unseen in training, added with only its content embedding.

`add_cold_entities` gives it its type's fallback ID embedding plus its own projected content; the report
checks that the model then places it near titles with similar content, against random titles and against
an ID-only control (the fallback embedding without content, identical for every new title).
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.T


@torch.no_grad()
def cold_start_report(model, tok, content: dict[str, np.ndarray], cold: list[str], k: int = 5) -> dict:
    """For each held-out title: model-embedding cosine to its k content neighbours vs to all known titles,
    and the neighbours' mean rank percentile among all known titles (1.0 = closest, 0.5 = chance)."""
    m = copy.deepcopy(model).eval()
    cold_ids = [tok.vocab[f"ent:{e}"] for e in cold]
    m.add_cold_entities(cold_ids, torch.tensor(np.stack([content[e] for e in cold])))
    known = [e for e in tok.entity_ids if e not in set(cold)]
    known_ids = torch.tensor([tok.vocab[f"ent:{e}"] for e in known])
    emb_known = m.model.embed(known_ids[None])[0]  # [K, H]
    emb_cold = m.model.embed(torch.tensor(cold_ids)[None])[0]  # [n, H]
    id_only = m.model.embed_tokens(m.model.token_fallback[torch.tensor(cold_ids)])  # [n, H]
    c_known = torch.tensor(np.stack([content[e] for e in known]))
    c_cold = torch.tensor(np.stack([content[e] for e in cold]))
    neighbours = _cosine(c_cold, c_known).topk(k, dim=-1).indices  # [n, k]

    def stats(emb: torch.Tensor) -> tuple[float, float, float]:
        sim = _cosine(emb, emb_known)  # [n, K]
        rank = sim.argsort(dim=-1).argsort(dim=-1).float() / (sim.shape[1] - 1)  # 1.0 = most similar
        return (float(sim.gather(1, neighbours).mean()), float(sim.mean()), float(rank.gather(1, neighbours).mean()))

    sim_nb, sim_all, pct = stats(emb_cold)
    _, _, pct_id = stats(id_only + 1e-6 * torch.randn_like(id_only))
    return {
        "titles": cold,
        "neighbours_k": k,
        "sim_to_content_neighbours": sim_nb,
        "sim_to_random_titles": sim_all,
        "neighbour_rank_percentile": pct,
        "id_only_neighbour_rank_percentile": pct_id,
    }
