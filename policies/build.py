"""Building a fresh GenPage model for a tokenizer and catalog, and what a checkpoint directory holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from common.config import option

from policies.modeling_genpage import GenPageConfig, GenPageForCausalLM
from policies.tokenizer import GenPageTokenizer


@dataclass(frozen=True)
class ModelSize:
    """Transformer shape. Defaults: the toy model for 2 CPU cores (head_dim 64: vLLM's CPU attention
    backend rejects smaller heads)."""

    hidden_size: int = option(128, "width of the residual stream")
    num_hidden_layers: int = option(4, "decoder layers")
    num_attention_heads: int = option(2, "heads of size hidden_size / num_attention_heads (keep 64)")
    intermediate_size: int = option(384, "gated MLP width")
    max_position_embeddings: int = option(256, "longest prompt + page")
    fallback_prob: float = option(0.05, "training-time fallback-token replacement rate (paper section 6.2)")
    rope_theta: float = option(10000.0, "base of the rotary position embedding's frequencies (the Llama default)")

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("model.hidden_size must be a multiple of model.num_attention_heads")
        if self.hidden_size // self.num_attention_heads < 32:
            raise ValueError("model head_dim (hidden_size / num_attention_heads) must be >= 32 for vLLM's CPU backend; use 64")
        if not 0.0 <= self.fallback_prob < 1.0:
            raise ValueError("model.fallback_prob must be in [0, 1)")


def token_fallback_map(tok: GenPageTokenizer) -> list[int]:
    """Per token: its fallback token id (entity -> type fallback, row -> row:<unk>), else -1."""
    out = [-1] * len(tok)
    for e in tok.entity_ids:
        out[tok.vocab[f"ent:{e}"]] = tok.fallback_of(e)
    for r in tok.row_ids:
        out[tok.vocab[f"row:{r}"]] = tok.row_fallback_id
    return out


def load_content(catalog_path: str | Path) -> dict[str, np.ndarray]:
    table = pq.read_table(catalog_path, columns=["entity_id", "content_embedding"])
    return {e: np.asarray(v, dtype=np.float32) for e, v in zip(table.column(0).to_pylist(), table.column(1).to_pylist())}


def content_matrix(tok: GenPageTokenizer, content: dict[str, np.ndarray], dim: int) -> torch.Tensor:
    """[V, C]: each entity token's content embedding; zeros elsewhere (and for titles without one)."""
    m = torch.zeros(len(tok), dim)
    for e, vec in content.items():
        t = tok.vocab.get(f"ent:{e}")
        if t is not None:
            m[t] = torch.as_tensor(vec)
    return m


def build_model(tok: GenPageTokenizer, content: dict[str, np.ndarray], size: ModelSize, seed: int = 0) -> GenPageForCausalLM:
    dim = len(next(iter(content.values()))) if content else 0
    config = GenPageConfig(
        vocab_size=len(tok),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        max_position_embeddings=size.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta},
        tie_word_embeddings=False,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eop_id,
        content_dim=dim,
        fallback_prob=size.fallback_prob,
        token_fallback=token_fallback_map(tok),
        page_token_id=tok.page_id,
        architectures=["GenPageForCausalLM"],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = GenPageForCausalLM(config)
    model.set_content_embeddings(content_matrix(tok, content, dim))
    return model

