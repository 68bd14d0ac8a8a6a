"""The GenPage domain tokenizer (paper section 2): user context -> prompt tokens, homepage -> page tokens.

Prompt:  [BOS] [PROFILE] lang:* ptype:* [REQUEST] hour:* dow:* dev:* [HIST] (ent:* act:* tb:* db:*)* [PAGE]
Page:    (row:* ent:* ent:* ...)* [EOP]        one token per row and per entity, in layout order

Every vocabulary comes from the dataset (`ContextVocab.from_schema`): its context values, history action
types, bucket edges (hour, day of week, days since an action, share watched), entity types and rows; the whole
of it is saved with every checkpoint (`genpage_tokenizer.json`), so loading never rebuilds it from anything
else. Continuous signals are bucketized. Unknown values map to fallback tokens, counted in `EncodeStats`
(paper section 6.2): `row:<unk>`, `ent:<unk_TYPE>` for a title of a known type missing from the vocabulary
(the training-time fallback swap), `ent:<unk>` for an unknown id, `lang:<unk>` and so on for context values
outside a learned vocabulary. The vocabulary is a real Hugging Face tokenizer (`PreTrainedTokenizerFast` over a
WordLevel model, with a chat template whose generation prompt is `[PAGE]`), so verl and vLLM load it with
`AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from homepage.logs import Context, Impression
from homepage.pages import Page, Row

TOKENIZER_CONFIG_FILE = "genpage_tokenizer.json"
TOKENIZER_FORMAT_VERSION = 2

PAD, BOS, EOP, PAGE, PROFILE, REQUEST, HIST, UNK = "[PAD]", "[BOS]", "[EOP]", "[PAGE]", "[PROFILE]", "[REQUEST]", "[HIST]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, EOP, PAGE, PROFILE, REQUEST, HIST, UNK)
ROW_FALLBACK = "row:<unk>"
ENTITY_PREFIX = "ent:"  # entity tokens: catalog titles "ent:<id>" and their fallbacks "ent:<unk...>"
ENTITY_FALLBACK = "ent:<unk>"
CATEGORICAL_PREFIX = {"language": "lang", "profile_type": "ptype", "device": "dev", "action": "act"}

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} " + PAGE + "{% endif %}"
)

# Token kinds, for masks and metrics downstream.
KIND_SPECIAL, KIND_CONTEXT, KIND_ROW, KIND_ENTITY = 0, 1, 2, 3


def is_title_token(token: str) -> bool:
    """Whether a token's text is a catalog title's ("ent:<id>"), not an entity fallback ("ent:<unk...>"): the
    check for token text (verl's decoded responses, an HF tokenizer's vocabulary)."""
    return token.startswith(ENTITY_PREFIX) and not token.startswith(ENTITY_PREFIX + "<")


def bucket(edges: Sequence[float], x: float) -> int:
    """Index of the bucket of x: b such that edges[b-1] <= x < edges[b] (len(edges) + 1 buckets)."""
    return int(np.searchsorted(edges, x, side="right"))


@dataclass(frozen=True)
class ContextVocab:
    """The prompt's vocabularies: categorical values and bucket edges (from the dataset's schema)."""

    languages: tuple[str, ...]
    profile_types: tuple[str, ...]
    devices: tuple[str, ...]
    actions: tuple[str, ...]
    hour_edges: tuple[float, ...]
    day_of_week_edges: tuple[float, ...]
    days_ago_edges: tuple[float, ...]
    watch_fraction_edges: tuple[float, ...]
    partial_watch: tuple[float, float]  # share watched that makes a title resumable

    @property
    def partial_buckets(self) -> tuple[int, ...]:
        """Duration buckets lying within partial_watch (the prompt only knows buckets)."""
        lo, hi = self.partial_watch
        bounds = (0.0, *self.watch_fraction_edges, float("inf"))
        return tuple(b for b in range(len(bounds) - 1) if bounds[b] >= lo and bounds[b + 1] <= hi)

    @classmethod
    def from_schema(cls, schema, logs=None) -> "ContextVocab":
        """From a `homepage.dataset.DatasetSchema`; vocabularies marked "learned" are counted in `logs` (a log
        table; train-split rows when it has a split column) and keep values seen at least min_count times."""
        import pyarrow.compute as pc

        # train-split rows of one column at a time, counted by Arrow: no copy of the table's train rows and no
        # Python object per value, so the cost is one column, not the log (every stage builds this tokenizer)
        train = None
        if logs is not None and "split" in logs.column_names:
            train = pc.equal(logs.column("split"), "train")

        def values(vocab, column: str, nested: bool = False) -> tuple[str, ...]:
            if vocab.closed:
                return tuple(vocab.values)
            if logs is None:
                raise ValueError(f"'{column}' is learned from the logs: pass the log table")
            col = logs.column(column) if train is None else pc.filter(logs.column(column), train)
            if nested:
                col = pc.list_flatten(col)
            counts = pc.value_counts(col)  # [distinct] {values, counts}
            kept = pc.filter(counts.field("values"), pc.greater_equal(counts.field("counts"), vocab.min_count))
            return tuple(sorted(v for v in kept.to_pylist() if v is not None))

        return cls(
            values(schema.context["language"], "language"), values(schema.context["profile_type"], "profile_type"),
            values(schema.context["device"], "device"), values(schema.actions, "history_actions", nested=True),
            schema.numeric_edges["hour"], schema.numeric_edges["day_of_week"], schema.days_ago_edges,
            schema.watch_fraction_edges, schema.partial_watch,
        )

    def tokens(self) -> list[str]:
        out: list[str] = []
        for name, vals in (("language", self.languages), ("profile_type", self.profile_types)):
            out += [f"{CATEGORICAL_PREFIX[name]}:{x}" for x in vals] + [f"{CATEGORICAL_PREFIX[name]}:<unk>"]
        out += [f"hour:{i}" for i in range(len(self.hour_edges) + 1)]
        out += [f"dow:{i}" for i in range(len(self.day_of_week_edges) + 1)]
        out += [f"dev:{x}" for x in self.devices] + ["dev:<unk>"]
        out += [f"act:{x}" for x in self.actions] + ["act:<unk>"]
        out += [f"tb:{i}" for i in range(len(self.days_ago_edges) + 1)]
        out += [f"db:{i}" for i in range(len(self.watch_fraction_edges) + 1)]
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ContextVocab":
        return cls(**{k: tuple(v) for k, v in data.items()})


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
    """Domain tokenizer over a fixed vocabulary: the context vocabularies, the rows and the catalog's titles.

    entity_types: per entity its type (its fallback token is `ent:<unk_TYPE>`); None = one fallback for all."""

    def __init__(self, entity_ids: Sequence[str], vocab: ContextVocab, row_ids: Sequence[str],
                 entity_types: Sequence[str] | None = None, max_history: int = 24):
        self.entity_ids = list(entity_ids)
        self.context_vocab = vocab
        self.row_ids = list(row_ids)
        self.entity_types = list(entity_types) if entity_types is not None else None
        if self.entity_types is not None and len(self.entity_types) != len(self.entity_ids):
            raise ValueError(f"{len(self.entity_types)} entity types for {len(self.entity_ids)} entity ids")
        self.max_history = max_history
        tokens: list[str] = list(SPECIAL_TOKENS)
        kinds: list[int] = [KIND_SPECIAL] * len(SPECIAL_TOKENS)
        context = vocab.tokens()
        tokens += context
        kinds += [KIND_CONTEXT] * len(context)
        rows = [f"row:{r}" for r in self.row_ids] + [ROW_FALLBACK]
        tokens += rows
        kinds += [KIND_ROW] * len(rows)
        types = list(dict.fromkeys(self.entity_types or []))
        ents = [f"ent:<unk_{t}>" for t in types] + [ENTITY_FALLBACK] + [f"ent:{e}" for e in self.entity_ids]
        tokens += ents
        kinds += [KIND_ENTITY] * len(ents)
        if len(set(tokens)) != len(tokens):
            dup = sorted({t for t in tokens if tokens.count(t) > 1})[:5]
            raise ValueError(f"duplicate tokens in the vocabulary (ids must be unique), e.g. {dup}")
        bad = [t for t in tokens if any(c.isspace() for c in t)]
        if bad:
            raise ValueError(f"tokens may not contain whitespace (ids are split on it), e.g. {bad[:3]}")
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.token_kind = np.array(kinds, dtype=np.int8)  # [V]
        self.pad_id, self.bos_id, self.eop_id, self.page_id = (self.vocab[t] for t in (PAD, BOS, EOP, PAGE))
        self.row_fallback_id = self.vocab[ROW_FALLBACK]
        self.entity_fallback_ids = {t: self.vocab[f"ent:<unk_{t}>"] for t in types}
        self.entity_fallback_id = self.vocab[ENTITY_FALLBACK]
        self._hf = None

    @classmethod
    def from_dataset(cls, dataset, logs=None) -> "GenPageTokenizer":
        """The tokenizer of a `homepage.dataset.Dataset` (logs: the log table, for learned vocabularies)."""
        s = dataset.schema
        return cls(dataset.entity_ids, ContextVocab.from_schema(s, logs), s.row_ids, dataset.entity_types, s.max_history)

    def fallback_of(self, entity_id: str) -> int:
        """The fallback token of a catalog title: its type's, else the generic one."""
        if self.entity_types is None:
            return self.entity_fallback_id
        i = self.vocab[f"ent:{entity_id}"] - self.first_entity_id
        return self.entity_fallback_ids[self.entity_types[i]]

    def same_vocabulary(self, other: "GenPageTokenizer") -> str | None:
        """None when both encode identically, else what differs (for 'checkpoint from another dataset' errors)."""
        if self.tokens == other.tokens and self.context_vocab == other.context_vocab:
            return None
        mine, theirs = set(self.tokens), set(other.tokens)
        only_a, only_b = sorted(mine - theirs)[:3], sorted(theirs - mine)[:3]
        if only_a or only_b:
            return f"tokens only in one of them: {only_a} vs {only_b}"
        return "the same tokens in another order, or other bucket edges"

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
        return self.entity_fallback_id

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
    PROMPT_FIXED_TOKENS = 9  # [BOS] [PROFILE] lang ptype [REQUEST] hour dow dev [HIST]
    HISTORY_ACTION_TOKENS = 4  # title, action, days-ago bucket, watched-share bucket

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt `encode_context` writes: a full history, then [PAGE]."""
        return self.PROMPT_FIXED_TOKENS + self.HISTORY_ACTION_TOKENS * self.max_history + 1

    def encode_context(self, ctx: Context, stats: EncodeStats | None = None) -> list[int]:
        """Prompt token ids, ending with the [PAGE] generation prompt."""
        v, cv = self.vocab, self.context_vocab
        ids = [v[BOS], v[PROFILE], self._context_token("lang", ctx.language, stats),
               self._context_token("ptype", ctx.profile_type, stats), v[REQUEST],
               v[f"hour:{bucket(cv.hour_edges, ctx.hour)}"], v[f"dow:{bucket(cv.day_of_week_edges, ctx.day_of_week)}"],
               self._context_token("dev", ctx.device, stats), v[HIST]]
        history = ctx.history
        if len(history) > self.max_history:
            if stats is not None:
                stats.truncated_history_actions += len(history) - self.max_history
            history = history[-self.max_history:]  # keep the most recent
        for h in history:
            ids += [self.entity_token(h.entity_id, stats), self._context_token("act", h.action, stats),
                    v[f"tb:{bucket(cv.days_ago_edges, h.days_ago)}"], v[f"db:{bucket(cv.watch_fraction_edges, h.watch_fraction)}"]]
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
            "format_version": TOKENIZER_FORMAT_VERSION, "entity_ids": self.entity_ids, "entity_types": self.entity_types,
            "row_ids": self.row_ids, "context_vocab": self.context_vocab.to_dict(), "max_history": self.max_history,
        }
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "GenPageTokenizer":
        path = Path(directory) / TOKENIZER_CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a GenPage tokenizer directory (save one with save_pretrained)")
        config = json.loads(path.read_text())
        if config.get("format_version") != TOKENIZER_FORMAT_VERSION:
            raise ValueError(f"{path}: tokenizer format {config.get('format_version')}, expected {TOKENIZER_FORMAT_VERSION}: "
                             "rebuild the checkpoint from its dataset directory")
        tok = cls(config["entity_ids"], ContextVocab.from_dict(config["context_vocab"]), config["row_ids"],
                  config["entity_types"], config["max_history"])
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(directory)
        if hf.get_vocab() != tok.vocab:
            raise ValueError(f"{directory}: tokenizer.json vocabulary differs from {TOKENIZER_CONFIG_FILE}")
        tok._hf = hf
        return tok


def check_tokenizer_matches(tok: GenPageTokenizer, dataset, logs, what: str) -> None:
    """Raises homepage.dataset.DatasetError when `tok` (a checkpoint's tokenizer) does not encode `dataset` (with
    its log table `logs`) the way the dataset's own tokenizer does: the checkpoint was made from another dataset."""
    from homepage.dataset import DatasetError

    diff = tok.same_vocabulary(GenPageTokenizer.from_dataset(dataset, logs))
    if diff is not None:
        raise DatasetError(f"{what} was made from another dataset than {dataset.root} ({diff}): retrain it on this "
                           "dataset, or point data_dir=... at the dataset it was made from")
