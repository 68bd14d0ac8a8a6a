"""Business rules of a homepage as allowed-token masks (paper section 6.3) and format rewards (section 5.3).

One engine, written once as pure tensor functions over a *page state*:

    state (what the page so far is) ──rule_parts──> per rule: allowed titles / rows / [EOP]
        ──allowed──> the mask-mode rules together [..., V]      ──rule_masks──> {rule: [..., V]} (audit)

The state has any leading shape: `[N]` for one decoding step of N requests (the vLLM logits processor, HF
generation) or `[B, T]` for every position of a batch of full sequences at once (mask replay inside
GenPage's forward, where the trainer computes log-probs; the format reward). `policies/rules_reference.py`
is the same rules written as a plain per-position loop; property tests check the two agree.

Rules (each with an enforcement mode: "mask" = hard, never violated; "reward" = scored by the format reward;
"off"):
- structure: the page is rows, each a row token then min..max entity tokens; min..max rows; ends with [EOP].
  A row may only be opened when enough titles satisfying the entity rules in force remain to fill it, and
  while the page has fewer than min_rows rows the masks let a row grow past min_row_len only when the rows
  still needed stay fillable (a look-ahead of the masks, not part of the audit), so masks never dead-end.
- dedup: no title twice, no row twice.
- category: a row holds only titles its definition in the dataset's row taxonomy makes eligible (an attribute
  match, a boolean column, a recency window, an explicit list); a history row (Continue Watching) only titles
  the user partially watched, read from the prompt's history.
- maturity: a restricted profile (e.g. kids, read from the prompt) sees only the titles the dataset's
  `restricted_profiles` column allows for it.
- pinning: a configured row sits at a fixed row position (when it can be filled at that point).
- critical_rows: a configured row (e.g. Continue Watching) appears within the first k rows (when it can be
  filled), and the page cannot end before it.
"Can be filled" means: at least min_row_len titles satisfying the entity rules not set to "off" remain. A pin
or critical row that cannot be filled for this user is void (it does not block the page).

A checkpoint carries its ruleset in two parts, so every process that loads it has the same rules: the config and
the per-row facts (row tokens, history rows, duration buckets) in config.json (`GenPageConfig.business_rules`),
and the per-title tables in a file of their own, `business_rules.npz`, as bit-packed uint8 arrays over
the vocabulary (V / 8 bytes per row or profile: a catalog of 10^5 titles and 100 rows is 1.25 MB there, and
config.json stays a few KB). config.json names the file and its SHA-256, so a file that does not belong to the
config is refused at load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from common.config import option
from policies.data import pad_batch
from policies.tokenizer import GenPageTokenizer

RULES = ("structure", "dedup", "category", "maturity", "pinning", "critical_rows")
RuleMode = Literal["mask", "reward", "off"]  # hard mask, soft format reward, not enforced
MODES = typing.get_args(RuleMode)
ENTITY_RULES = ("dedup", "category", "maturity")  # rules that decide which titles can fill a row
RULESET_VERSION = 3
# The per-title tables, beside config.json in a checkpoint. NumPy's .npz, read without pickle: not .safetensors,
# which vLLM's and HF's weight loaders take for a weights file of the model.
RULES_FILE = "business_rules.npz"
HEADER_TABLES = ("vocab_size", "eop_id", "page_id", "row_ids", "row_tokens", "history_rows", "partial_duration_buckets")


@dataclass(frozen=True)
class PageShape:
    """Structure bounds of a page."""

    min_rows: int = option(3, "fewest rows on a page")
    max_rows: int = option(6, "most rows on a page")
    min_row_len: int = option(3, "fewest titles in a row")
    max_row_len: int = option(8, "most titles in a row")

    @property
    def max_tokens(self) -> int:
        """The longest page in tokens: every row token, every title, [EOP]."""
        return self.max_rows * (1 + self.max_row_len) + 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_rows <= self.max_rows:
            raise ValueError(f"rules.shape: need 1 <= min_rows <= max_rows, got {self.min_rows}, {self.max_rows}")
        if not 1 <= self.min_row_len <= self.max_row_len:
            raise ValueError(f"rules.shape: need 1 <= min_row_len <= max_row_len, got {self.min_row_len}, {self.max_row_len}")


@dataclass(frozen=True)
class RuleModes:
    """Enforcement of each rule: "mask" (hard), "reward" (soft, format reward), or "off"."""

    structure: RuleMode = option("mask", "rows of min..max titles, min..max rows, [EOP] at the end")
    dedup: RuleMode = option("mask", "no title or row twice")
    category: RuleMode = option("mask", "titles match their row's category")
    maturity: RuleMode = option("mask", "kids profiles see kids-safe titles only")
    pinning: RuleMode = option("mask", "pinned rows at their positions")
    critical_rows: RuleMode = option("mask", "critical rows within their first k rows")

    def __post_init__(self) -> None:
        for name in RULES:
            if getattr(self, name) not in MODES:
                raise ValueError(f"rules.modes.{name} must be one of {MODES}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RuleConfig:
    """The business rules of a deployment (saved with the checkpoint). shape, pinned_rows and critical_rows left
    at None take the dataset's (dataset.yaml `page`, `pinned_rows`, `critical_rows`)."""

    shape: PageShape | None = option(None, "page structure bounds")
    modes: RuleModes = option(factory=RuleModes, help="enforcement per rule")
    pinned_rows: dict | None = option(None, "row id -> 0-based row position, e.g. {trending_now: 0}")
    critical_rows: dict | None = option(None, "row id -> must be within the first k rows, e.g. {continue_watching: 2}")
    format_weights: dict = option(factory=dict, help="rule -> weight of one violation in the format reward (default 1)")

    def resolve(self, schema) -> "RuleConfig":
        """Fills what is left at None from a `homepage.dataset.DatasetSchema`."""
        return dataclasses.replace(
            self, shape=self.shape or PageShape(**dataclasses.asdict(schema.page)),
            pinned_rows=dict(schema.pinned_rows) if self.pinned_rows is None else self.pinned_rows,
            critical_rows=dict(schema.critical_rows) if self.critical_rows is None else self.critical_rows)

    def check(self, row_ids) -> None:
        """Raises ValueError naming the field when the config does not fit the rows (or is unresolved)."""
        if self.shape is None or self.pinned_rows is None or self.critical_rows is None:
            raise ValueError("rules: shape, pinned_rows and critical_rows must be set (RuleConfig.resolve(schema))")
        s = self.shape
        for row, pos in self.pinned_rows.items():
            if row not in row_ids:
                raise ValueError(f"rules.pinned_rows: unknown row {row!r}; known rows: {list(row_ids)}")
            if not isinstance(pos, int) or not 0 <= pos < s.max_rows:
                raise ValueError(f"rules.pinned_rows.{row}: position must be an integer in [0, max_rows={s.max_rows})")
        if len(set(self.pinned_rows.values())) != len(self.pinned_rows):
            raise ValueError("rules.pinned_rows: two rows pinned at the same position")
        for row, k in self.critical_rows.items():
            if row not in row_ids:
                raise ValueError(f"rules.critical_rows: unknown row {row!r}; known rows: {list(row_ids)}")
            if row in self.pinned_rows:
                raise ValueError(f"rules.critical_rows: {row} is also pinned; keep one of the two")
            if not isinstance(k, int) or not 1 <= k <= s.max_rows:
                raise ValueError(f"rules.critical_rows.{row}: k must be an integer in [1, max_rows={s.max_rows}]")
        slots = [self.critical_slot(r) for r in self.critical_rows]
        if any(sl is None for sl in slots):
            raise ValueError("rules.critical_rows: every position within k is pinned; raise k or move the pin")
        if len(set(slots)) != len(slots):
            raise ValueError("rules.critical_rows: two critical rows would be forced into the same position; use different k")
        unknown = set(self.format_weights) - set(RULES)
        if unknown:
            raise ValueError(f"rules.format_weights: unknown rule(s) {sorted(unknown)}; rules: {list(RULES)}")

    def critical_slot(self, row: str) -> int | None:
        """The last row position < k not taken by a pin: where a critical row is forced if still missing."""
        free = [p for p in range(self.critical_rows[row]) if p not in self.pinned_rows.values()]
        return free[-1] if free else None


class PageState(NamedTuple):
    """What a page prefix is, for any leading shape S ([N] one step, [B, T] all positions).

    active:    [*S] bool, a page is being written (the prompt ended, [EOP] not yet written)
    used:      [*S, V] bool, tokens already on the page
    n_rows:    [*S] long, rows opened so far
    row_len:   [*S] long, tokens since the current row token (0 when no row is open)
    cur_row:   [*S] long, index (in the ruleset's row order) of the open row, -1 before the first row
    resumable:  [*S or broadcastable, V] bool, titles partially watched in the prompt's history
    profile_ok: [*S or broadcastable, V] bool, titles the prompt's profile may see (restricted profiles)
    """

    active: torch.Tensor
    used: torch.Tensor
    n_rows: torch.Tensor
    row_len: torch.Tensor
    cur_row: torch.Tensor
    resumable: torch.Tensor
    profile_ok: torch.Tensor


class RulePart(NamedTuple):
    """What one rule allows, by token kind (None: no restriction). Broadcastable to state shape [*S]:

    entities: [*S, V] or broadcastable, read at title tokens
    rows:     [*S, R] row tokens, in the ruleset's row order
    eop:      [*S] the [EOP] token
    other:    whether tokens that are none of these (prompt tokens, fallbacks, padding) are allowed
    """

    entities: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    eop: torch.Tensor | None = None
    other: bool = True


class FormatReport(NamedTuple):
    """Format reward of N pages: score [N] (<= 0: minus the weighted violations of reward-mode rules) and
    violations {rule: [N] counts} for every rule not off (mask-mode rules too, as an audit)."""

    score: np.ndarray
    violations: dict


class RuleSet:
    """The rules of one deployment over one vocabulary: per-token tables + config. Build with
    `build_ruleset`, save with `attach_rules`, load with `from_pretrained` / `from_model_config`."""

    def __init__(self, config: RuleConfig, tables: dict):
        self.row_ids = tuple(tables["row_ids"])
        config.check(self.row_ids)
        self.config, self.tables = config, tables
        V = tables["vocab_size"]
        self.vocab_size = V
        self.eop_id, self.page_id = tables["eop_id"], tables["page_id"]
        R = len(self.row_ids)
        self.row_token = torch.tensor([tables["row_tokens"][r] for r in self.row_ids])  # [R]
        self.row_index = torch.full((V,), -1, dtype=torch.long)  # [V] token -> row index, -1 for non-rows
        self.row_index[self.row_token] = torch.arange(R)
        self.is_row = self.row_index >= 0  # [V]
        self.row_of = {int(t): i for i, t in enumerate(self.row_token.tolist())}  # token -> row index (per-token loops)
        self.is_entity = unpack_mask(tables["entities"], V)  # [V] known catalog titles (no fallback tokens)
        self.is_partial = _ids_mask(tables["partial_duration_buckets"], V)  # [V]
        history = set(tables["history_rows"])
        self.is_history_row = torch.tensor([r in history for r in self.row_ids], dtype=torch.bool)  # [R]
        self.row_elig = torch.stack([  # [R, V]; history rows: per prompt (resumable)
            torch.zeros(V, dtype=torch.bool) if r in history else unpack_mask(tables["row_eligible"][r], V)
            for r in self.row_ids])
        self.restricted = {int(t): unpack_mask(m, V) for t, m in tables["restricted"].items()}  # profile token -> [V]
        s = config.shape
        self.pin_at = torch.full((s.max_rows + 1,), -1, dtype=torch.long)  # [max_rows+1] row index pinned at position
        self.pin_pos = torch.full((R,), -1, dtype=torch.long)  # [R] pinned position of a row, -1 none
        for row, pos in config.pinned_rows.items():
            self.pin_at[pos] = self.row_ids.index(row)
            self.pin_pos[self.row_ids.index(row)] = pos
        self.crit_slot = torch.full((R,), -1, dtype=torch.long)  # [R] position a critical row is forced to, -1 none
        for row in config.critical_rows:
            self.crit_slot[self.row_ids.index(row)] = config.critical_slot(row)
        self.masked_rules = tuple(r for r in RULES if getattr(config.modes, r) == "mask")
        self.reward_rules = tuple(r for r in RULES if getattr(config.modes, r) == "reward")
        self.audited_rules = tuple(r for r in RULES if getattr(config.modes, r) != "off")

    def eligible_ids(self, row: str) -> set[int]:
        """Token ids a non-history row may hold (for per-token loops and inspection)."""
        return set(self.row_elig[self.row_ids.index(row)].nonzero().flatten().tolist())

    # -- serialization ----------------------------------------------------------------------------------------
    def serialize(self) -> tuple[dict, bytes]:
        """-> (the header for config.json's business_rules, the bytes of RULES_FILE). The file holds
        entities [V/8], row_eligible [R', V/8] (the non-history rows, in row_ids order) and restricted [P, V/8]
        (one row per restricted profile token, in header order), all uint8 bit-packed masks."""
        t = self.tables
        history = set(t["history_rows"])
        eligible_rows = [r for r in self.row_ids if r not in history]
        profiles = sorted(t["restricted"], key=int)
        width = (self.vocab_size + 7) // 8
        arrays = {
            "entities": t["entities"],
            "row_eligible": np.stack([t["row_eligible"][r] for r in eligible_rows]) if eligible_rows
            else np.zeros((0, width), np.uint8),
            "restricted": np.stack([t["restricted"][p] for p in profiles]) if profiles else np.zeros((0, width), np.uint8),
        }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
        header = {
            "version": RULESET_VERSION, "config": _config_to_dict(self.config), "file": RULES_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
            **{k: t[k] for k in HEADER_TABLES},  # the per-row facts: small, kept in config.json
            "eligible_rows": eligible_rows, "restricted_profiles": [int(p) for p in profiles],
        }
        return header, data

    def header(self) -> dict:
        """What config.json's business_rules holds for this ruleset (see serialize)."""
        return self.serialize()[0]

    def write_tables(self, model_dir: str | Path) -> dict:
        """Writes RULES_FILE into model_dir (atomically: a kill leaves the old file or none) -> its header."""
        header, data = self.serialize()
        path = Path(model_dir) / RULES_FILE
        tmp = path.with_name(f".{RULES_FILE}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return header

    @classmethod
    def from_header(cls, header: dict, model_dir: str | Path) -> "RuleSet":
        """The ruleset a config.json header names, with its tables read from model_dir."""
        from common.config import from_dict

        if header.get("version") != RULESET_VERSION:
            raise ValueError(f"{model_dir}/config.json: business_rules version {header.get('version')!r} is not "
                             f"{RULESET_VERSION}: rebuild the ruleset with `python -m policies.rules --model {model_dir}`")
        path = Path(model_dir) / header["file"]
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: config.json's business_rules name it; copy the checkpoint "
                                    f"whole, or rebuild it with `python -m policies.rules --model {model_dir}`")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != header["sha256"]:
            raise ValueError(f"{path} does not match config.json's business_rules (SHA-256 differs): the file belongs "
                             f"to another ruleset; rebuild with `python -m policies.rules --model {model_dir}`")
        arrays = dict(np.load(io.BytesIO(data), allow_pickle=False))
        tables = {k: header[k] for k in HEADER_TABLES}
        tables["entities"] = arrays["entities"]
        tables["row_eligible"] = dict(zip(header["eligible_rows"], arrays["row_eligible"]))
        tables["restricted"] = {str(p): m for p, m in zip(header["restricted_profiles"], arrays["restricted"])}
        return cls(from_dict(RuleConfig, header["config"], f"{model_dir}/config.json business_rules.config"), tables)

    @classmethod
    def from_model_config(cls, config, model_dir: str | Path | None = None) -> "RuleSet | None":
        """The ruleset of a loaded HF config (None without one); its tables come from model_dir, by default the
        directory the config was loaded from."""
        header = getattr(config, "business_rules", None)
        if not header:
            return None
        model_dir = model_dir or getattr(config, "name_or_path", "")
        if not model_dir:
            raise ValueError(f"config.business_rules names {header.get('file')}, but the config was not loaded from a "
                             "checkpoint directory: pass model_dir, or attach the RuleSet to the model (attach_rules)")
        return cls.from_header(header, model_dir)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "RuleSet":
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        if not cfg.get("business_rules"):
            raise ValueError(f"{model_dir}/config.json has no business_rules: attach them with `python -m policies.rules --model {model_dir}`")
        return cls.from_header(cfg["business_rules"], model_dir)

    def with_modes(self, **modes: RuleMode) -> "RuleSet":
        """The same tables with some rules' modes changed (e.g. category="reward")."""
        config = dataclasses.replace(self.config, modes=dataclasses.replace(self.config.modes, **modes))
        return RuleSet(config, self.tables)

    # -- page states ------------------------------------------------------------------------------------------
    def prompt_facts(self, input_ids: torch.Tensor, page_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T], page_start [B] (index of the first page token) -> resumable [B, V], profile_ok [B, V].

        History actions are quadruples (entity, action, time bucket, duration bucket): a title is resumable
        when the duration bucket 3 tokens after it (still in the prompt) is a partial-watch bucket."""
        B, T = input_ids.shape
        pos = torch.arange(T)
        in_prompt = pos[None, :] < page_start[:, None]  # [B, T]
        profile_ok = torch.ones(B, self.vocab_size, dtype=torch.bool)
        for token, allowed in self.restricted.items():
            hit = ((input_ids == token) & in_prompt).any(-1)  # [B] the prompt has this restricted profile
            profile_ok &= allowed | ~hit[:, None]
        resumable = torch.zeros(B, self.vocab_size, dtype=torch.bool)
        if T > 3:
            ent = self.is_entity[input_ids[:, :-3]] & self.is_partial[input_ids[:, 3:]] & in_prompt[:, 3:]  # [B, T-3]
            b, j = ent.nonzero(as_tuple=True)
            resumable[b, input_ids[b, j]] = True
        return resumable, profile_ok

    def state_all_positions(self, input_ids: torch.Tensor, page_start: torch.Tensor) -> PageState:
        """State after each position of full sequences: input_ids [B, T], page_start [B] -> PageState [B, T].

        Position t's state describes the page tokens in [page_start, t]; it is active from page_start - 1
        (the [PAGE] token, which predicts the first page token) until an [EOP] is written."""
        B, T = input_ids.shape
        pos = torch.arange(T)[None, :]  # [1, T]
        in_page = pos >= page_start[:, None]  # [B, T]
        eop = (input_ids == self.eop_id) & in_page
        active = (pos >= page_start[:, None] - 1) & (eop.long().cumsum(-1) == 0)  # [B, T]
        is_row = self.is_row[input_ids] & in_page  # [B, T]
        n_rows = is_row.long().cumsum(-1)
        last_row = torch.where(is_row, pos, torch.full_like(input_ids, -1)).cummax(-1).values  # [B, T]
        cur_row = torch.where(last_row >= 0, self.row_index[input_ids.gather(1, last_row.clamp(min=0))], -1)
        row_len = torch.where(last_row >= 0, pos - last_row, 0)
        # token v is on the page by position t iff its first page position is <= t
        first = torch.full((B, self.vocab_size), T, dtype=torch.long)
        first.scatter_reduce_(1, input_ids, torch.where(in_page, pos, T).expand(B, T), reduce="amin")  # [B, V]
        used = first[:, None, :] <= pos[:, :, None]  # [B, T, V]
        resumable, profile_ok = self.prompt_facts(input_ids, page_start)
        return PageState(active, used, n_rows, row_len, cur_row, resumable[:, None, :], profile_ok[:, None, :])

    def state_step(self, prompts: list[list[int]], prefixes: list[list[int]]) -> PageState:
        """State after each of N page prefixes (one decoding step) -> PageState [N]."""
        N = len(prompts)
        W = max(len(p) for p in prompts)
        ids = torch.full((N, W), self.page_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        resumable, profile_ok = self.prompt_facts(ids, torch.tensor([len(p) for p in prompts]))
        used = torch.zeros(N, self.vocab_size, dtype=torch.bool)
        active = torch.ones(N, dtype=torch.bool)
        n_rows, row_len, cur_row = (torch.zeros(N, dtype=torch.long) for _ in range(3))
        cur_row -= 1
        for i, prefix in enumerate(prefixes):
            st = IncrementalPage(self)
            st.extend(prefix)
            active[i], n_rows[i], row_len[i], cur_row[i] = st.active, st.n_rows, st.row_len, st.cur_row
            used[i, list(st.used)] = True
        return PageState(active, used, n_rows, row_len, cur_row, resumable, profile_ok)

    # -- masks ------------------------------------------------------------------------------------------------
    def rule_parts(self, st: PageState, rules: tuple[str, ...], plan: bool = False) -> dict[str, RulePart]:
        """What each rule allows, split by token kind (see RulePart); broadcastable tensors, None = anything.

        plan: add the structure rule's look-ahead (masks only, never the audit): while the page still needs
        rows to reach min_rows, a row takes titles beyond min_row_len only where the rows still needed stay
        fillable (see `_extra_titles_ok`)."""
        c, s = self.config, self.config.shape
        entity_on = {r: getattr(c.modes, r) != "off" for r in ENTITY_RULES}
        n_rows, row_len, cur_row = st.n_rows, st.row_len, st.cur_row
        in_row = cur_row >= 0
        row_done = ~in_row | (row_len >= s.min_row_len)

        # Titles each row could still be filled with under the entity rules in force -> openable [*S, R].
        fill = self.is_entity.expand(st.used.shape)  # [*S, V]
        if entity_on["dedup"]:
            fill = fill & ~st.used
        if entity_on["maturity"]:
            fill = fill & st.profile_ok
        R = len(self.row_ids)
        if entity_on["category"]:
            counts = fill.float() @ self.row_elig.T.float()  # [*S, R]
            if self.is_history_row.any():
                resumable = (fill & st.resumable).sum(-1).float()  # [*S]
                counts = torch.where(self.is_history_row, resumable[..., None], counts)
        else:
            counts = fill.sum(-1, keepdim=True).float().expand(*fill.shape[:-1], R)
        row_used = st.used[..., self.row_token]  # [*S, R]
        openable = counts >= s.min_row_len  # [*S, R]
        if entity_on["dedup"]:
            openable = openable & ~row_used

        out = {}
        if "structure" in rules:
            titles = in_row & (row_len < s.max_row_len)  # [*S]
            if plan:
                titles = titles & ((row_len < s.min_row_len) | self._extra_titles_ok(
                    n_rows, counts, row_used & entity_on["dedup"], openable))
            out["structure"] = RulePart(
                entities=titles[..., None],
                rows=openable & (row_done & (n_rows < s.max_rows))[..., None],
                eop=in_row & row_done & (n_rows >= s.min_rows),
                other=False,  # only rows, titles and [EOP] belong on a page
            )
        if "dedup" in rules:
            out["dedup"] = RulePart(entities=~st.used, rows=~row_used)
        if "category" in rules:
            row_elig = self.row_elig[cur_row.clamp(min=0)]  # [*S, V]
            row_elig = torch.where(self.is_history_row[cur_row.clamp(min=0)][..., None], st.resumable, row_elig)
            out["category"] = RulePart(entities=row_elig | ~in_row[..., None])
        if "maturity" in rules:
            out["maturity"] = RulePart(entities=st.profile_ok)
        if "pinning" in rules:
            pinned = self.pin_pos >= 0  # [R]
            here = self.pin_at[n_rows.clamp(max=s.max_rows)]  # [*S] row pinned at the next row position, -1 none
            binds = (here >= 0) & openable.gather(-1, here.clamp(min=0)[..., None]).squeeze(-1)  # [*S]
            rows_ok = ~pinned | (self.pin_pos == n_rows[..., None])  # [*S, R] pinned rows only at their position
            rows_ok = torch.where(binds[..., None], torch.arange(len(self.row_ids)) == here[..., None], rows_ok)
            pending = pinned & (self.pin_pos >= n_rows[..., None]) & openable  # [*S, R] pins still to fill
            out["pinning"] = RulePart(rows=rows_ok, eop=~pending.any(-1))
        if "critical_rows" in rules:
            crit = self.crit_slot >= 0  # [R]
            missing = crit & ~row_used & openable  # [*S, R] critical rows not yet placed that can be
            forced = missing & (self.crit_slot == n_rows[..., None])  # [*S, R]
            rows_ok = forced | ~forced.any(-1, keepdim=True)
            out["critical_rows"] = RulePart(rows=rows_ok, eop=~(missing & (self.crit_slot >= n_rows[..., None])).any(-1))
        return out

    def _extra_titles_ok(self, n_rows: torch.Tensor, counts: torch.Tensor, row_used: torch.Tensor,
                         openable: torch.Tensor) -> torch.Tensor:
        """[*S] may the open row take a title beyond min_row_len? (n_rows [*S]; counts, row_used, openable
        [*S, R]: fillable titles per row, rows on the page that cannot be opened again, rows that could be opened.)

        With k = min_rows - n_rows rows still needed and m = min_row_len: if k unused, unpinned rows each have
        >= k*m fillable titles, filling them one after another always works (each loses at most (k-1)*m titles
        to the others). One more title lowers every count by at most 1, so it is allowed where k rows have
        >= k*m + 1; opening any openable row keeps the condition, and the titles a new row needs up to m are
        paid for by the margin it was opened with. Where the condition fails from the start (a small pool, e.g.
        a kids profile on a small catalog) rows close at min_row_len while any row can be opened (best effort:
        the fewest titles used); where none can, the page cannot reach min_rows anyway and titles stay allowed
        (the audit counts the short page)."""
        s = self.config.shape
        k = (s.min_rows - n_rows).clamp(min=0)  # [*S] rows still needed
        free = (self.pin_pos < 0) & ~row_used  # [*S, R] rows that can be opened at any position
        strong = ((counts >= (k * s.min_row_len + 1)[..., None]) & free).sum(-1)  # [*S]
        return (k == 0) | (strong >= k) | ~openable.any(-1)

    def _assemble(self, part: RulePart, st: PageState) -> torch.Tensor:
        """A RulePart -> allowed [*S, V]; every token allowed where no page is being written."""
        shape = (*st.n_rows.shape, self.vocab_size)
        ent = torch.ones(shape, dtype=torch.bool) if part.entities is None else part.entities.expand(shape)
        out = torch.where(self.is_entity, ent, torch.tensor(part.other))  # [*S, V]
        if part.rows is not None:
            out[..., self.row_token] = part.rows.expand(*shape[:-1], len(self.row_ids))
        if part.eop is not None:
            out[..., self.eop_id] = part.eop
        return out | ~st.active[..., None]

    def rule_masks(self, st: PageState, rules: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Allowed tokens of each rule, {rule: [*S, V] bool}. Inactive states (prompt, after [EOP]) allow all."""
        parts = self.rule_parts(st, self.audited_rules if rules is None else rules)
        return {r: self._assemble(p, st) for r, p in parts.items()}

    def allowed(self, st: PageState) -> torch.Tensor:
        """Allowed-token mask [*S, V] of the mask-mode rules together for page states [*S]; where they leave
        nothing, [EOP] (a page can always end)."""
        parts = list(self.rule_parts(st, self.masked_rules, plan=True).values())

        def both(a, b):
            return b if a is None else a if b is None else a & b

        merged = RulePart(None, None, None, True)
        for p in parts:
            merged = RulePart(both(merged.entities, p.entities), both(merged.rows, p.rows), both(merged.eop, p.eop),
                              merged.other and p.other)
        allowed = self._assemble(merged, st)
        allowed[..., self.eop_id] |= ~allowed.any(-1)
        return allowed

    def allowed_step(self, prompts: list[list[int]], prefixes: list[list[int]]) -> torch.Tensor:
        """[N, V] allowed next tokens after N (prompt, page prefix) pairs."""
        return self.allowed(self.state_step(prompts, prefixes))

    def allowed_active(self, input_ids: torch.Tensor, page_start: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The active (row, position) pairs of input_ids [B, T] and the tokens allowed after each: b [N], t [N],
        allowed [N, V]. Every other position allows every token. The rules run on these positions only (a page is a
        few dozen of a sequence's ~150 positions), so the cost grows with the pages, not with B x T x V."""
        st = self.state_all_positions(input_ids, page_start)
        b, t = st.active.nonzero(as_tuple=True)  # [N] active (row, position) pairs
        active = PageState(st.active[b, t], st.used[b, t], st.n_rows[b, t], st.row_len[b, t], st.cur_row[b, t],
                           st.resumable[b, 0], st.profile_ok[b, 0])  # [N] states; resumable, profile_ok [B, 1, V]
        return b, t, self.allowed(active)

    def allowed_all_positions(self, input_ids: torch.Tensor, page_start: torch.Tensor) -> torch.Tensor:
        """[B, T, V]: at position t, the tokens allowed at t + 1 (all True outside an active page)."""
        b, t, allowed = self.allowed_active(input_ids, page_start)
        out = torch.ones(*input_ids.shape, self.vocab_size, dtype=torch.bool)
        out[b, t] = allowed
        return out

    def mask_logits(self, logits: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mask replay for the trainer: logits [B, T, V] of full sequences -> disallowed tokens set to
        finfo.min / 2 (finite: entropy stays defined). Sequences are found by the [PAGE] token; packed rows
        (position_ids restarting at 0 inside a row) are split per sequence. attention_mask [B, T] (optional): a
        restart inside padding is not a sequence (verl pads position_ids with 0s after each row's end), so
        padded rows take the one batch-wide pass instead of the per-sequence loop. Only the active positions'
        logits [N, V] are masked: no [B, T, V] mask is built."""
        neg = torch.finfo(logits.dtype).min / 2
        segments = _segments(input_ids, position_ids, attention_mask)
        if all(len(seg) == 1 for seg in segments):  # padded batch: one sequence per row, all rows at once
            is_page = input_ids == self.page_id
            T = input_ids.shape[1]
            page_start = torch.where(is_page.any(-1), is_page.long().argmax(-1) + 1, T + 1)  # [B]
            b, t, allowed = self.allowed_active(input_ids.cpu(), page_start.cpu())  # [N], [N], [N, V]
            b, t, allowed = b.to(logits.device), t.to(logits.device), allowed.to(logits.device)
            return logits.index_put((b, t), logits[b, t].masked_fill(~allowed, neg))  # a new tensor, as masked_fill
        for b, segs in enumerate(segments):
            for lo, hi in segs:
                ids = input_ids[b, lo:hi][None].cpu()  # [1, L]
                hit = (ids[0] == self.page_id).nonzero()
                if len(hit) == 0:
                    continue  # no page in this sequence (e.g. a bare prompt): nothing to mask
                _, t, allowed = self.allowed_active(ids, hit[:1, 0] + 1)  # [N], [N, V]
                t, allowed = t.to(logits.device) + lo, allowed.to(logits.device)
                logits[b, t] = logits[b, t].masked_fill(~allowed, neg)
        return logits

    # -- format reward ----------------------------------------------------------------------------------------
    def violations(self, prompts: list[list[int]], pages: list[list[int]]) -> dict[str, np.ndarray]:
        """{rule: [N] number of page tokens the rule forbids} for every rule not off (a page without [EOP]
        counts one more structure violation), plus "total" (of the mask-mode rules)."""
        ids, page_start, nxt, valid = _pack(prompts, pages, self.page_id)
        st = self.state_all_positions(ids, page_start)
        masks = self.rule_masks(st, self.audited_rules)
        unfinished = np.array([int(self.eop_id not in p) for p in pages])
        out = {}
        for r, m in masks.items():
            ok = m[:, :-1].gather(-1, nxt[..., None]).squeeze(-1)  # [B, T-1] the written token was allowed
            out[r] = ((~ok) & valid).sum(-1).numpy() + (unfinished if r == "structure" else 0)
        out["total"] = sum((out[r] for r in self.masked_rules), np.zeros(len(pages), dtype=np.int64))
        return out

    def format_reward(self, prompts: list[list[int]], pages: list[list[int]]) -> FormatReport:
        """Score [N] = -sum over reward-mode rules of weight x violations, and the per-rule violation counts."""
        v = self.violations(prompts, pages)
        score = np.zeros(len(pages))
        for r in self.reward_rules:
            score -= self.config.format_weights.get(r, 1.0) * v[r]
        return FormatReport(score, v)


class IncrementalPage:
    """A page prefix's state updated token by token (the vLLM logits processor keeps one per request)."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        self.used: set[int] = set()
        self.active, self.n_rows, self.row_len, self.cur_row = True, 0, 0, -1
        self.seen = 0  # tokens consumed

    def extend(self, tokens) -> None:
        r = self.rules
        for t in tokens:
            self.seen += 1
            if not self.active:
                continue
            if t == r.eop_id:
                self.active = False
                continue
            self.used.add(int(t))
            if t in r.row_of:
                self.n_rows += 1
                self.cur_row, self.row_len = r.row_of[t], 0
            elif self.cur_row >= 0:
                self.row_len += 1


def build_ruleset(tok: GenPageTokenizer, dataset, config: RuleConfig = RuleConfig()) -> RuleSet:
    """Per-token tables from the tokenizer and a `homepage.dataset.Dataset` (its row taxonomy, restricted
    profiles and history buckets); config's unset shape, pins and critical rows come from the dataset."""
    schema = dataset.schema
    if list(tok.row_ids) != list(schema.row_ids):
        raise ValueError(f"the tokenizer's rows {tok.row_ids[:5]}... are not the dataset's {list(schema.row_ids)[:5]}...: "
                         "the checkpoint was made from another dataset")
    V = len(tok)
    token_of = np.array([tok.vocab.get(f"ent:{e}", -1) for e in dataset.entity_ids])  # [N] catalog -> token, -1 unknown
    known = token_of >= 0

    def to_vocab(mask: np.ndarray) -> np.ndarray:  # [N] bool over the catalog -> packed [V / 8] uint8
        out = np.zeros(V, dtype=bool)
        out[token_of[known & mask]] = True
        return pack_mask(out)

    cv = tok.context_vocab
    restricted = {}
    for profile, allowed in dataset.allowed_for_profile().items():
        token = tok.vocab.get(f"ptype:{profile}")
        if token is None:
            raise ValueError(f"restricted profile {profile!r} has no token (not a profile_type value of the logs)")
        restricted[str(token)] = to_vocab(allowed)
    tables = {
        "vocab_size": V, "eop_id": tok.eop_id, "page_id": tok.page_id, "row_ids": list(schema.row_ids),
        "row_tokens": {r: tok.vocab[f"row:{r}"] for r in schema.row_ids},
        "entities": to_vocab(np.ones(len(token_of), dtype=bool)),
        "row_eligible": {r: to_vocab(m) for r, m in dataset.row_eligibility().items()},
        "history_rows": [r.id for r in schema.rows if r.kind == "history"],
        "restricted": restricted,
        "partial_duration_buckets": [tok.vocab[f"db:{b}"] for b in cv.partial_buckets],
    }
    return RuleSet(config.resolve(schema), tables)


def dataset_ruleset(data_dir: str | Path, config: RuleConfig = RuleConfig(), tok: GenPageTokenizer | None = None) -> RuleSet:
    """The ruleset of a dataset directory (with `tok`, a checkpoint's tokenizer, else the dataset's own)."""
    from homepage.dataset import load_dataset

    dataset = load_dataset(data_dir)
    if tok is None:
        from homepage.logs import read_logs

        tok = GenPageTokenizer.from_dataset(dataset, read_logs(dataset.logs)[0])
    return build_ruleset(tok, dataset, config)


def attach_rules(model_dir: str | Path, ruleset: RuleSet, mask_logits: bool | None = None) -> None:
    """Writes the ruleset into a checkpoint: its tables file, then config.json's header (and optionally the
    mask-replay switch)."""
    header = ruleset.write_tables(model_dir)
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["business_rules"] = header
    if mask_logits is not None:
        cfg["mask_logits"] = mask_logits
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """[V] bool -> [ceil(V / 8)] uint8, its bits."""
    return np.packbits(np.asarray(mask, dtype=bool))


def unpack_mask(packed: np.ndarray, V: int) -> torch.Tensor:
    """The inverse of pack_mask -> [V] bool."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8))[:V]
    return torch.from_numpy(bits.astype(bool))


def _ids_mask(ids: list[int], V: int) -> torch.Tensor:
    m = torch.zeros(V, dtype=torch.bool)
    m[torch.as_tensor(ids, dtype=torch.long)] = True
    return m


def _config_to_dict(config: RuleConfig) -> dict:
    return dataclasses.asdict(config)


def _pack(prompts: list[list[int]], pages: list[list[int]], pad: int):
    """Right-padded prompt+page batch -> ids [B, T], page_start [B], next tokens [B, T-1], valid [B, T-1]
    (position t predicts a page token at t + 1)."""
    ids, mask = pad_batch([p + g for p, g in zip(prompts, pages)], pad)  # [B, T]
    page_start = torch.tensor([len(p) for p in prompts])
    valid = mask.bool() & (torch.arange(ids.shape[1])[None, :] >= page_start[:, None])  # [B, T] page positions
    return ids, page_start, ids[:, 1:], valid[:, 1:]


def _segments(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
              attention_mask: torch.Tensor | None = None) -> list[list[tuple[int, int]]]:
    """Per batch row, [lo, hi) spans of separate sequences: the whole row, or (packed rows) spans where
    position_ids restart at 0; with attention_mask [B, T], spans of padding only are not sequences."""
    B, T = input_ids.shape
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != B:
        return [[(0, T)] for _ in range(B)]
    real = None
    if attention_mask is not None and attention_mask.shape == input_ids.shape:
        real = attention_mask.bool()
    out = []
    for b in range(B):
        starts = (position_ids[b] == 0).nonzero().flatten().tolist()
        starts = [s for s in starts if s > 0 and position_ids[b, s - 1] != 0]  # left padding repeats 0s
        bounds = [0] + starts + [T]
        spans = list(zip(bounds[:-1], bounds[1:]))
        if real is not None:
            spans = [(lo, hi) for lo, hi in spans if real[b, lo:hi].any()] or spans[:1]
        out.append(spans)
    return out


if __name__ == "__main__":
    import argparse

    from common.config import load_config

    parser = argparse.ArgumentParser(description=f"Attach business rules to a GenPage checkpoint ({RULES_FILE} and config.json).")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--data", default="runs/world", help="dataset directory (catalog, row taxonomy, logs)")
    parser.add_argument("--config", default=None, help="YAML with RuleConfig fields (default: the default rules)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. modes.category=reward")
    args = parser.parse_args()
    attach_rules(args.model, dataset_ruleset(args.data, load_config(RuleConfig, args.config, args.overrides),
                                             GenPageTokenizer.from_pretrained(args.model)))
    print(f"business rules written into {args.model}/{RULES_FILE} and config.json")
