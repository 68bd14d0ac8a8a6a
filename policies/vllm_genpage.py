"""GenPage for vLLM: vLLM's Llama with the fused (ID + projected content) input embedding.

Parameter names equal the Hugging Face model's (`model.content_embeddings`, `model.content_proj.weight`,
and Llama's), so vLLM's standard weight loader reads `save_pretrained` checkpoints and verl's weight
updates unchanged. Fallback replacement is training-only and has no counterpart here.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class GenPageVllmModel(LlamaModel):
    def __init__(self, *, vllm_config, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        config = vllm_config.model_config.hf_config
        self.content_proj = nn.Linear(config.content_dim, config.hidden_size, bias=False)
        self.content_embeddings = nn.Parameter(torch.zeros(config.vocab_size, config.content_dim), requires_grad=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Same formula as policies.modeling_genpage.GenPageModel.embed (paper section 6.1).
        content = self.content_embeddings[input_ids].to(self.content_proj.weight.dtype)
        return self.embed_tokens(input_ids) + self.content_proj(content)


class GenPageForCausalLMVllm(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        config = vllm_config.model_config.hf_config
        self.output_content_proj = nn.Linear(config.content_dim, config.hidden_size, bias=False)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # Output-side content fusion, as GenPageForCausalLM.compute_logits (single rank: no vocab sharding).
        logits = super().compute_logits(hidden_states)
        content = self.model.content_embeddings.to(hidden_states.dtype)
        return logits + (hidden_states @ self.output_content_proj.weight) @ content.T

    def _init_model(self, vllm_config, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        return GenPageVllmModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
