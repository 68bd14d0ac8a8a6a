"""The GenPage domain tokenizer (paper section 2): user context -> prompt tokens, homepage -> page tokens.

Prompt:  [BOS] [PROFILE] lang:* ptype:* [REQUEST] daypart:* dow:* dev:* [HIST] (ent:* act:* tb:* db:*)* [PAGE]
Page:    (row:* ent:* ent:* ...)* [EOP]        one token per row and per entity, in layout order

Continuous signals are bucketized (time since an action, share watched, hour of day). Unknown rows and
entities map to fallback tokens (paper section 6.2): `row:<unk>`, and `ent:<unk_movie|show|game>` chosen by
the id's type prefix, else `ent:<unk>`. The vocabulary is a real Hugging Face tokenizer
(`PreTrainedTokenizerFast` over a WordLevel model, with a chat template whose generation prompt is
`[PAGE]`), so verl and vLLM load it with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from homepage.catalog import ENTITY_TYPES, LANGUAGES, ROW_IDS
from homepage.logs import Context, Impression
from homepage.pages import Page, Row
from homepage.users import ACTIONS, DEVICES, PROFILE_TYPES

TOKENIZER_CONFIG_FILE = "genpage_tokenizer.json"
TOKENIZER_FORMAT_VERSION = 1

PAD, BOS, EOP, PAGE, PROFILE, REQUEST, HIST, UNK = "[PAD]", "[BOS]", "[EOP]", "[PAGE]", "[PROFILE]", "[REQUEST]", "[HIST]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOP, PAGE, PROFILE, REQUEST, HIST, UNK)
ROW_FALLBACK = "row:<unk>"
ENTITY_FALLBACK = "ent:<unk>"
ENTITY_TYPE_FALLBACKS = tuple(f"ent:<unk_{t}>" for t in ENTITY_TYPES)
DAYPARTS = ("night", "morning", "afternoon", "evening", "late")
DAYPART_START_HOURS = (0, 6, 12, 17, 22)  # hour h belongs to the last start <= h
TIME_BUCKET_EDGES_DAYS = (1.0, 3.0, 7.0, 14.0, 30.0, 90.0)  # 7 buckets
DURATION_BUCKET_EDGES = (0.05, 0.25, 0.5, 0.9)  # share watched; 5 buckets

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} " + PAGE + "{% endif %}"
)

# Token kinds, for masks and metrics downstream.
KIND_SPECIAL, KIND_CONTEXT, KIND_ROW, KIND_ENTITY = 0, 1, 2, 3


def daypart(hour: int) -> str:
    return DAYPARTS[int(np.searchsorted(DAYPART_START_HOURS, hour, side="right")) - 1]


def time_bucket(days_ago: float) -> int:
    return int(np.searchsorted(TIME_BUCKET_EDGES_DAYS, days_ago, side="right"))


def duration_bucket(watch_fraction: float) -> int:
    return int(np.searchsorted(DURATION_BUCKET_EDGES, watch_fraction, side="right"))


class PageDecodeError(ValueError):
    pass


@dataclass
class EncodeStats:
    """Counts of what encoding had to approximate; nothing is dropped silently."""

    impressions: int = 0
    unknown_entities: int = 0  # mapped to an entity fallback token
    unknown_rows: int = 0  # mapped to row:<unk>
    unknown_context_values: int = 0  # e.g. a language outside the vocabulary -> lang:<unk>
    truncated_history_actions: int = 0  # oldest actions cut to fit max_history
    by_field: dict[str, int] = field(default_factory=dict)


class GenPageTokenizer:
    """Domain tokenizer over a fixed vocabulary built from a catalog's entity ids and the row ids."""

    def __init__(self, entity_ids: Sequence[str], row_ids: Sequence[str] = ROW_IDS, max_history: int = 24):
        self.entity_ids = list(entity_ids)
        self.row_ids = list(row_ids)
        self.max_history = max_history
        tokens: list[str] = list(SPECIAL_TOKENS)
        kinds: list[int] = [KIND_SPECIAL] * len(SPECIAL_TOKENS)
        context = (
            [f"lang:{x}" for x in LANGUAGES] + ["lang:<unk>"]
            + [f"ptype:{x}" for x in PROFILE_TYPES]
            + [f"daypart:{x}" for x in DAYPARTS]
            + [f"dow:{i}" for i in range(7)]
            + [f"dev:{x}" for x in DEVICES]
            + [f"act:{x}" for x in ACTIONS]
            + [f"tb:{i}" for i in range(len(TIME_BUCKET_EDGES_DAYS) + 1)]
            + [f"db:{i}" for i in range(len(DURATION_BUCKET_EDGES) + 1)]
        )
        tokens += context
        kinds += [KIND_CONTEXT] * len(context)
        rows = [f"row:{r}" for r in self.row_ids] + [ROW_FALLBACK]
        tokens += rows
        kinds += [KIND_ROW] * len(rows)
        ents = list(ENTITY_TYPE_FALLBACKS) + [ENTITY_FALLBACK] + [f"ent:{e}" for e in self.entity_ids]
        tokens += ents
        kinds += [KIND_ENTITY] * len(ents)
        if len(set(tokens)) != len(tokens):
            dup = sorted({t for t in tokens if tokens.count(t) > 1})[:5]
            raise ValueError(f"duplicate tokens in the vocabulary (ids must be unique), e.g. {dup}")
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.token_kind = np.array(kinds, dtype=np.int8)  # [V]
        self.pad_id, self.bos_id, self.eop_id, self.page_id = (self.vocab[t] for t in (PAD, BOS, EOP, PAGE))
        self.row_fallback_id = self.vocab[ROW_FALLBACK]
        self.entity_fallback_ids = {t: self.vocab[f] for t, f in zip(ENTITY_TYPES, ENTITY_TYPE_FALLBACKS)}
        self.entity_fallback_id = self.vocab[ENTITY_FALLBACK]
        self._hf = None

    # -- vocabulary --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def first_entity_id(self) -> int:
        """Token id of the first catalog entity (after the entity fallbacks); entity i has id first + i."""
        return self.vocab[f"ent:{self.entity_ids[0]}"] if self.entity_ids else len(self.tokens)

    def entity_token(self, entity_id: str, stats: EncodeStats | None = None) -> int:
        tok = self.vocab.get(f"ent:{entity_id}")
        if tok is not None:
            return tok
        if stats is not None:
            stats.unknown_entities += 1
        prefix = entity_id.split("_", 1)[0]
        return self.entity_fallback_ids.get(prefix, self.entity_fallback_id)

    def row_token(self, row_id: str, stats: EncodeStats | None = None) -> int:
        tok = self.vocab.get(f"row:{row_id}")
        if tok is None:
            if stats is not None:
                stats.unknown_rows += 1
            return self.row_fallback_id
        return tok

    def _context_token(self, name: str, value, stats: EncodeStats | None) -> int:
        tok = self.vocab.get(f"{name}:{value}")
        if tok is None:
            if stats is not None:
                stats.unknown_context_values += 1
                stats.by_field[name] = stats.by_field.get(name, 0) + 1
            fallback = self.vocab.get(f"{name}:<unk>")
            if fallback is None:
                raise ValueError(f"context field '{name}': value {value!r} has no token and no fallback")
            return fallback
        return tok

    # -- encoding ----------------------------------------------------------------------------------------
    def encode_context(self, ctx: Context, stats: EncodeStats | None = None) -> list[int]:
        """Prompt token ids, ending with the [PAGE] generation prompt."""
        v = self.vocab
        ids = [v[BOS], v[PROFILE], self._context_token("lang", ctx.language, stats),
               self._context_token("ptype", ctx.profile_type, stats), v[REQUEST],
               v[f"daypart:{daypart(ctx.hour)}"], v[f"dow:{int(ctx.day_of_week)}"],
               self._context_token("dev", ctx.device, stats), v[HIST]]
        history = ctx.history
        if len(history) > self.max_history:
            if stats is not None:
                stats.truncated_history_actions += len(history) - self.max_history
            history = history[-self.max_history:]  # keep the most recent
        for h in history:
            ids += [self.entity_token(h.entity_id, stats), self._context_token("act", h.action, stats),
                    v[f"tb:{time_bucket(h.days_ago)}"], v[f"db:{duration_bucket(h.watch_fraction)}"]]
        ids.append(self.page_id)
        return ids

    def encode_page(self, page: Page, stats: EncodeStats | None = None) -> list[int]:
        ids: list[int] = []
        for row in page.rows:
            ids.append(self.row_token(row.row_id, stats))
            ids += [self.entity_token(e, stats) for e in row.entity_ids]
        ids.append(self.eop_id)
        return ids

    def encode(self, impression: Impression, stats: EncodeStats | None = None) -> tuple[list[int], list[int]]:
        """impression -> (prompt_ids, page_ids)."""
        if stats is not None:
            stats.impressions += 1
        return self.encode_context(impression.context, stats), self.encode_page(impression.page, stats)

    def prompt_text(self, ctx: Context) -> str:
        """The prompt as text without the [PAGE] generation prompt (what the chat template wraps)."""
        return " ".join(self.tokens[i] for i in self.encode_context(ctx)[:-1])

    # -- decoding ----------------------------------------------------------------------------------------
    def decode(self, page_ids: Iterable[int], strict: bool = True) -> Page:
        """Page token ids -> Page. Stops at [EOP]; padding after it is ignored.

        strict: raise PageDecodeError on an entity before any row, a non-page token, or a missing [EOP]
        (model output under constrained decoding never has them); otherwise skip such tokens.
        """
        rows: list[Row] = []
        row_id: str | None = None
        ents: list[str] = []
        ended = False
        for pos, t in enumerate(int(x) for x in page_ids):
            if t == self.eop_id:
                ended = True
                break
            kind = self.token_kind[t] if 0 <= t < len(self.tokens) else -1
            if kind == KIND_ROW:
                if row_id is not None:
                    rows.append(Row(row_id, tuple(ents)))
                row_id, ents = self.tokens[t][len("row:"):], []
            elif kind == KIND_ENTITY and row_id is not None:
                ents.append(self.tokens[t][len("ent:"):])
            elif strict:
                what = "an entity before any row" if kind == KIND_ENTITY else f"token {t} ({self._name(t)})"
                raise PageDecodeError(f"position {pos}: {what} is not valid in a page")
        if strict and not ended:
            raise PageDecodeError("page ends without the end-of-page token [EOP]")
        if row_id is not None:
            rows.append(Row(row_id, tuple(ents)))
        return Page(tuple(rows))

    def _name(self, t: int) -> str:
        return self.tokens[t] if 0 <= t < len(self.tokens) else "out of vocabulary"

    # -- Hugging Face ------------------------------------------------------------------------------------
    def hf_tokenizer(self):
        """The vocabulary as a `PreTrainedTokenizerFast` (built once)."""
        if self._hf is None:
            from tokenizers import Tokenizer
            from tokenizers.models import WordLevel
            from tokenizers.pre_tokenizers import WhitespaceSplit
            from transformers import PreTrainedTokenizerFast

            tok = Tokenizer(WordLevel(vocab=self.vocab, unk_token=UNK))
            tok.pre_tokenizer = WhitespaceSplit()
            self._hf = PreTrainedTokenizerFast(
                tokenizer_object=tok, bos_token=BOS, eos_token=EOP, pad_token=PAD, unk_token=UNK,
                additional_special_tokens=[PAGE, PROFILE, REQUEST, HIST], chat_template=CHAT_TEMPLATE,
                padding_side="left", model_max_length=4096,
            )
        return self._hf

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.hf_tokenizer().save_pretrained(directory)
        config = {
            "format_version": TOKENIZER_FORMAT_VERSION, "entity_ids": self.entity_ids, "row_ids": self.row_ids,
            "max_history": self.max_history,
        }
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "GenPageTokenizer":
        path = Path(directory) / TOKENIZER_CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a GenPage tokenizer directory (save one with save_pretrained)")
        config = json.loads(path.read_text())
        if config.get("format_version") != TOKENIZER_FORMAT_VERSION:
            raise ValueError(f"{path}: tokenizer format {config.get('format_version')}, expected {TOKENIZER_FORMAT_VERSION}")
        tok = cls(config["entity_ids"], config["row_ids"], config["max_history"])
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(directory)
        if hf.get_vocab() != tok.vocab:
            raise ValueError(f"{directory}: tokenizer.json vocabulary differs from {TOKENIZER_CONFIG_FILE}")
        tok._hf = hf
        return tok
