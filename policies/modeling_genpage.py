"""GenPage as a registered Hugging Face architecture (paper sections 4, 6.1, 6.2).

A decoder-only transformer in the modern LLM shape (RoPE, RMSNorm, gated SiLU MLP, sdpa attention), built
from transformers' Llama modules so that parameter names match vLLM's Llama loader, with:
- untied input embedding and output projection (section 4);
- semantic embedding fusion (section 6.1): input embedding of token t = E[t] + W_c c[t], where c[t] is the
  title's content embedding (zero for non-entity tokens), kept in the checkpoint as a frozen parameter.
  The output side is fused the same way with its own projection: logit_t = h . (U[t] + W_o c[t]). Untied
  ID embeddings alone make copying a title from the history into the page a per-title association to learn;
  the shared content term gives every title the same route (and a new title a score from its content);
- fallback tokens (section 6.2): in training, with probability `fallback_prob`, an entity or row input token's
  ID embedding is swapped for its fallback token's (content kept), so a title known only by its content
  embedding still gets a meaningful representation (`add_cold_entities`).

Importing this module registers `GenPageConfig` (model_type "genpage") with AutoConfig,
`GenPageForCausalLM` with AutoModelForCausalLM, and `GenPageForPageReward` (the reward model: a page score
read off the backbone by the head `config.reward_head` names) with AutoModelForSequenceClassification, and
names both classes in the `transformers` namespace: tools that resolve a checkpoint's `config.architectures[0]`
there (TRL's `create_model_from_path`, which builds GRPOTrainer's reference model) then load a GenPage checkpoint
as it is. Checkpoints carry no `auto_map`: verl reads any auto_map as remote code and copies its modules into every
checkpoint it exports.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from policies.reward_heads import get_reward_readout


@strict
class GenPageConfig(LlamaConfig):
    r"""Llama-shaped config plus GenPage's fields.

    content_dim: size of the per-token content embedding fused into the input embedding (0 disables fusion).
    fallback_prob: training-time probability of swapping an entity/row input ID embedding for its fallback's.
    token_fallback: per token id, the fallback token id (entities -> type fallback, rows -> row:<unk>), -1 for
        tokens without one. Length vocab_size.
    page_token_id: id of the [PAGE] token that ends every prompt (the prompt/page boundary).
    reward_mean, reward_std: the reward model's target normalization (paper section 5.3): it predicts
        (page_reward - reward_mean) / reward_std; set by recipes/train_rm.py, unused by the generator.
    business_rules: the header of the deployment's ruleset (policies.rules.RuleSet.header(): its config, per-row
        facts, and the name and SHA-256 of the per-title tables file beside config.json), so every process
        that loads the checkpoint (trainer, vLLM workers, evaluation) enforces the same rules.
    mask_logits: replay the rule mask inside `forward` on full sequences (paper section 6.3): the trainer's
        log-probs are then those of the masked distribution vLLM sampled from. Incremental decoding with a
        KV cache is masked by the logits-processor adapters instead (vLLM, policies.hf_generation).
    length_bucket_rows: forwards without a KV cache over a right-padded batch (training, log-probs, scoring)
        run rows of similar length together, each group cut to its own longest row, in groups of at least
        this many rows (0: one padded batch). Same result per row (attention never reaches padding); less
        compute where lengths vary (contexts of 9..90 tokens plus pages of 10..55).
    reward_head: how the reward model reads its page score, a read-out registered in policies.reward_heads
        (its training side in reward_model.heads). "entity_feedback" (what recipes/train_rm.py trains by
        default): the sum over the page tokens (rows, titles, [EOP]: the tokens after the last [PAGE]) of each
        token's expected reward under its predicted feedback (a distribution over the dataset's feedback types
        plus a thumbs-up probability, trainable on the logged feedback); "entity_sum": the same sum of a
        regressed per-token reward (trainable on the logged entity rewards); "last": one scalar read at the
        end-of-page position (the paper's sequence-regression head). A bare config gets "entity_sum", the
        per-token head that needs no reward system.
    feedback_rewards: "entity_feedback" head: the reward system's reward of each feedback type, in the order
        of the dataset's feedback types (reward_model.data.entity_targets reads them off the logs).
    thumbs_up_reward: "entity_feedback" head: the reward a thumbs-up adds.
    """

    model_type = "genpage"

    content_dim: int = 16
    fallback_prob: float = 0.0
    token_fallback: list[int] | None = None
    page_token_id: int | None = None
    reward_mean: float = 0.0
    reward_std: float = 1.0
    business_rules: dict | None = None
    mask_logits: bool = False
    reward_head: str = "entity_sum"
    feedback_rewards: list[float] | None = None
    thumbs_up_reward: float = 0.0
    length_bucket_rows: int = 16


class GenPageModel(LlamaModel):
    """Llama backbone whose input embedding fuses content embeddings and applies fallback replacement."""

    config_class = GenPageConfig

    def __init__(self, config: GenPageConfig):
        super().__init__(config)
        self.content_proj = nn.Linear(config.content_dim, config.hidden_size, bias=False)
        # A frozen parameter rather than a buffer: it travels with weight updates (verl -> vLLM) unchanged.
        self.content_embeddings = nn.Parameter(torch.zeros(config.vocab_size, config.content_dim), requires_grad=False)
        fallback = config.token_fallback or [-1] * config.vocab_size
        if len(fallback) != config.vocab_size:
            raise ValueError(f"token_fallback has {len(fallback)} entries, expected vocab_size={config.vocab_size}")
        self.register_buffer("token_fallback", torch.tensor(fallback, dtype=torch.long), persistent=False)
        self.post_init()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, H]: ID embedding (possibly of the fallback token) + projected content."""
        ids = input_ids
        if self.training and self.config.fallback_prob > 0:
            fb = self.token_fallback[input_ids]  # [B, T]
            swap = (fb >= 0) & (torch.rand(input_ids.shape, device=input_ids.device) < self.config.fallback_prob)
            ids = torch.where(swap, fb, input_ids)
        content = self.content_embeddings[input_ids].to(self.content_proj.weight.dtype)  # [B, T, C] original title
        return self.embed_tokens(ids) + self.content_proj(content)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        buckets = self.length_buckets(attention_mask, kwargs)
        if buckets is None:
            return super().forward(input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)
        T = inputs_embeds.shape[1]
        hidden = []
        for rows, L in buckets:  # rows of one group, longest first; L = the group's longest row
            h = super().forward(inputs_embeds=inputs_embeds[rows, :L], attention_mask=attention_mask[rows, :L],
                                position_ids=None if position_ids is None else position_ids[rows, :L],
                                **{**kwargs, "use_cache": False}).last_hidden_state  # [b, L, H]
            hidden.append(nn.functional.pad(h, (0, 0, 0, T - L)))  # padding positions: zeros
        order = torch.cat([rows for rows, _ in buckets])  # [B] row of each output position
        return BaseModelOutputWithPast(last_hidden_state=torch.cat(hidden)[torch.argsort(order)])  # [B, T, H]

    def length_buckets(self, attention_mask: torch.Tensor | None, kwargs: dict) -> list[tuple[torch.Tensor, int]] | None:
        """Groups of rows of similar length, [(row indices, longest length)], for a right-padded batch
        attention_mask [B, T] in a forward without KV cache; None where grouping does not apply or saves
        less than 10% of the padded tokens."""
        n = self.config.length_bucket_rows
        if (not n or attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[0] < 2 * n
                or kwargs.get("use_cache") or kwargs.get("past_key_values") is not None
                or kwargs.get("cache_position") is not None or kwargs.get("output_hidden_states")
                or kwargs.get("output_attentions")):
            return None
        B, T = attention_mask.shape
        lengths = attention_mask.bool().sum(-1)  # [B]
        if not torch.equal(attention_mask.bool(), torch.arange(T, device=lengths.device) < lengths[:, None]):
            return None  # not right-padded (e.g. left padding for generation)
        order = torch.argsort(lengths, descending=True, stable=True)
        groups = [(rows, int(lengths[rows[0]])) for rows in order.tensor_split(B // n)]
        if sum(len(rows) * L for rows, L in groups) > 0.9 * B * T:
            return None
        return groups


class _FrozenContentMixin:
    """After from_pretrained: the content table stays frozen (loading materializes parameters with
    requires_grad=True), and the non-persistent fallback map is rebuilt from the config (loading initializes
    on the meta device, which leaves non-persistent buffers undefined). The checkpoint's rules are read at load
    (their directory may be gone by the time they are needed) and their tables file is written with every
    save_pretrained, so a copy made by saving carries them."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.model.content_embeddings.requires_grad_(False)
        fallback = model.config.token_fallback or [-1] * model.config.vocab_size
        model.model.token_fallback = torch.tensor(fallback, dtype=torch.long, device=model.model.content_embeddings.device)
        if model.config.business_rules:
            model.rules  # noqa: B018 (read now, from the directory it was loaded from)
        return model

    @property
    def rules(self):
        """The checkpoint's RuleSet: the one attached, else the one config.business_rules names (read once
        from the directory the config was loaded from)."""
        if getattr(self, "_rules", None) is None:
            from policies.rules import RuleSet

            self._rules = RuleSet.from_model_config(self.config)
            if self._rules is None:
                raise ValueError("config.business_rules is empty: attach rules with `model.attach_rules(rules)` or "
                                 "`python -m policies.rules --model DIR`")
        return self._rules

    def attach_rules(self, rules) -> None:
        """Makes `rules` this model's ruleset: held here, its header in the config, its tables file written by
        save_pretrained."""
        self._rules = rules
        self.config.business_rules = rules.header()

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.config.business_rules and kwargs.get("is_main_process", True):
            self.rules.write_tables(save_directory)


class GenPageForCausalLM(_FrozenContentMixin, LlamaForCausalLM):
    """The page generator: next-token logits over the domain vocabulary, untied output projection."""

    config_class = GenPageConfig
    _tied_weights_keys: dict = {}

    def __init__(self, config: GenPageConfig):
        if config.tie_word_embeddings:
            raise ValueError("GenPage keeps input and output embeddings untied (paper section 4): set tie_word_embeddings=False")
        LlamaPreTrainedModel.__init__(self, config)
        self.model = GenPageModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.output_content_proj = nn.Linear(config.content_dim, config.hidden_size, bias=False)
        self.post_init()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, T, V]: h . U[t] + (h W_o) . c[t]."""
        content = self.model.content_embeddings.to(hidden.dtype)  # [V, C]
        return self.lm_head(hidden) + (hidden @ self.output_content_proj.weight) @ content.T

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.compute_logits(hidden[:, keep])
        if self.config.mask_logits and input_ids is not None and logits.shape[1] == input_ids.shape[1] and not _has_cache(past_key_values):
            logits = self.rules.mask_logits(logits, input_ids, position_ids, attention_mask)
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    def set_content_embeddings(self, content: torch.Tensor) -> None:
        """content: [V, C] per-token content vectors (zeros for tokens without content)."""
        with torch.no_grad():
            self.model.content_embeddings.copy_(content)

    @torch.no_grad()
    def add_cold_entities(self, token_ids: list[int], content: torch.Tensor) -> None:
        """Gives tokens of titles unseen in training their content and their fallback's ID embedding.

        token_ids: vocabulary ids of the new titles; content: [n, C] their content embeddings. The output
        projection row is set to the fallback's too, so the titles can be generated before any training.
        """
        fb = self.model.token_fallback[torch.tensor(token_ids)]
        if (fb < 0).any():
            raise ValueError("add_cold_entities: some token ids have no fallback token (not entity tokens)")
        self.model.content_embeddings[token_ids] = content.to(self.model.content_embeddings.dtype)
        self.model.embed_tokens.weight[token_ids] = self.model.embed_tokens.weight[fb]
        self.lm_head.weight[token_ids] = self.lm_head.weight[fb]


def _has_cache(past_key_values) -> bool:
    if past_key_values is None:
        return False
    get = getattr(past_key_values, "get_seq_length", None)
    return bool(get()) if get is not None else True


@dataclass
class PageRewardOutput(SequenceClassifierOutputWithPast):
    """logits [B, 1]: the standardized page score, (page_reward - reward_mean) / reward_std.
    token_rewards [B, T]: with the "entity_feedback" and "entity_sum" heads, each page token's reward in
    reward units (0 outside the page); the page reward is their sum.
    feedback_logits [B, T, F + 1]: with the "entity_feedback" head, each token's feedback-type logits [..., :F]
    and thumbs-up logit [..., F]."""

    token_rewards: torch.Tensor | None = None
    feedback_logits: torch.Tensor | None = None


class GenPageForPageReward(_FrozenContentMixin, LlamaPreTrainedModel):
    """Sequence regression on the same backbone (paper section 5.3). `config.reward_head` names the read-out
    (policies.reward_heads): the reward-model trainer's default, "entity_feedback", scores a page as the sum
    over its tokens of each title's expected reward under its predicted feedback distribution (and thumbs-up);
    "entity_sum" sums a regressed per-token reward; "last" reads one scalar at the end-of-page position. Either
    way `logits` is the standardized page score; `config.reward_mean` / `reward_std` (set by the reward-model
    trainer) map it to reward units."""

    config_class = GenPageConfig

    def __init__(self, config: GenPageConfig):
        super().__init__(config)
        outputs = get_reward_readout(config.reward_head).outputs(config)  # raises on an unknown or incomplete head
        self.model = GenPageModel(config)
        self.score = nn.Linear(config.hidden_size, outputs, bias=True)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> PageRewardOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state  # [B, T, H]
        read = get_reward_readout(self.config.reward_head).read(self.score, hidden, input_ids, attention_mask, self.config)
        loss = None
        if labels is not None:
            loss = nn.functional.mse_loss(read.logits.squeeze(-1).float(), labels.float())
        return PageRewardOutput(loss=loss, logits=read.logits, token_rewards=read.token_rewards,
                                feedback_logits=read.feedback_logits)


AutoConfig.register("genpage", GenPageConfig, exist_ok=True)
AutoModelForCausalLM.register(GenPageConfig, GenPageForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(GenPageConfig, GenPageForPageReward, exist_ok=True)
# Found by name as well (module docstring); sys.modules' entry, since transformers swaps its lazy module on import.
for _cls in (GenPageForCausalLM, GenPageForPageReward):
    setattr(sys.modules["transformers"], _cls.__name__, _cls)
