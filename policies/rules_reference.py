"""The business rules written as a plain loop over one (prompt, page prefix): the readable specification.

Slow (Python sets, one position at a time) and independent of the tensor engine in `policies/rules.py`;
tests check that the engine's vectorized masks (one decoding step, and all positions of full sequences)
equal these, rule by rule.
"""

from __future__ import annotations

from policies.rules import ENTITY_RULES, RuleSet


def _ids(mask) -> set[int]:
    return set(mask.nonzero().flatten().tolist())


def prompt_facts(rules: RuleSet, prompt: list[int]) -> tuple[set[int], set[int]]:
    """(titles partially watched in the history, titles the prompt's profile may see).
    History = (entity, action, time, duration)."""
    t = rules.tables
    entities, partial = _ids(rules.is_entity), set(t["partial_duration_buckets"])
    resumable = {tok for j, tok in enumerate(prompt[:-3]) if tok in entities and prompt[j + 3] in partial}
    allowed = set(range(t["vocab_size"]))
    for token, mask in rules.restricted.items():
        if token in prompt:
            allowed &= _ids(mask)
    return resumable, allowed


def reference_rule_masks(rules: RuleSet, prompt: list[int], prefix: list[int], plan: bool = False) -> dict[str, set[int]]:
    """{rule: allowed next tokens} after `prefix`; every token is allowed once the page has ended. plan: the
    structure rule with the masks' look-ahead (see RuleSet._extra_titles_ok)."""
    t, c, s = rules.tables, rules.config, rules.config.shape
    V = t["vocab_size"]
    every = set(range(V))
    if t["eop_id"] in prefix:
        return {r: every for r in rules.audited_rules}
    entities = _ids(rules.is_entity)
    row_token = t["row_tokens"]
    token_row = {v: k for k, v in row_token.items()}
    history_rows = set(t["history_rows"])
    resumable, profile_ok = prompt_facts(rules, prompt)

    rows = [token_row[x] for x in prefix if x in token_row]
    used = set(prefix)
    n_rows = len(rows)
    row_len = 0
    for x in reversed(prefix):
        if x in token_row:
            break
        row_len += 1
    in_row = n_rows > 0
    if not in_row:
        row_len = 0
    row_done = not in_row or row_len >= s.min_row_len

    def eligible(row: str) -> set[int]:
        return resumable if row in history_rows else rules.eligible_ids(row)

    on = {r: getattr(c.modes, r) != "off" for r in ENTITY_RULES}

    def fillable(row: str) -> int:
        """Titles the row could still be filled with under the entity rules in force."""
        fill = set(entities)
        if on["dedup"]:
            fill -= used
        if on["maturity"]:
            fill &= profile_ok
        if on["category"]:
            fill &= eligible(row)
        return len(fill)

    def openable(row: str) -> bool:
        return not (on["dedup"] and row_token[row] in used) and fillable(row) >= s.min_row_len

    def extra_titles_ok() -> bool:
        """Look-ahead of the masks: a title beyond min_row_len while rows are still needed only if the k
        rows still needed stay fillable (k unused, unpinned rows with >= k * min_row_len + 1 titles)."""
        k = max(s.min_rows - n_rows, 0)
        free = [r for r in rules.row_ids if r not in c.pinned_rows and not (on["dedup"] and row_token[r] in used)]
        strong = sum(fillable(r) >= k * s.min_row_len + 1 for r in free)
        return k == 0 or strong >= k or not any(openable(r) for r in rules.row_ids)

    all_rows = set(row_token.values())
    eop = t["eop_id"]
    out: dict[str, set[int]] = {}
    if "structure" in rules.audited_rules:
        m = set()
        if in_row and row_len < s.max_row_len and (not plan or row_len < s.min_row_len or extra_titles_ok()):
            m |= entities
        if row_done and n_rows < s.max_rows:
            m |= {row_token[r] for r in rules.row_ids if openable(r)}
        if in_row and row_done and n_rows >= s.min_rows:
            m.add(eop)
        out["structure"] = m
    if "dedup" in rules.audited_rules:
        out["dedup"] = every - (used & (entities | all_rows))
    if "category" in rules.audited_rules:
        out["category"] = (every - entities) | (eligible(rows[-1]) if in_row else entities)
    if "maturity" in rules.audited_rules:
        out["maturity"] = (every - entities) | (entities & profile_ok)
    if "pinning" in rules.audited_rules:
        pins = c.pinned_rows
        here = next((r for r, p in pins.items() if p == n_rows), None)
        if here is not None and openable(here):
            rows_ok = {row_token[here]}
        else:
            rows_ok = {row_token[r] for r in rules.row_ids if r not in pins or pins[r] == n_rows}
        m = (every - all_rows - {eop}) | rows_ok
        if not any(p >= n_rows and openable(r) for r, p in pins.items()):
            m.add(eop)
        out["pinning"] = m
    if "critical_rows" in rules.audited_rules:
        missing = {r for r in c.critical_rows if row_token[r] not in used and openable(r)}
        forced = [r for r in missing if c.critical_slot(r) == n_rows]
        rows_ok = {row_token[r] for r in forced} if forced else all_rows
        m = (every - all_rows - {eop}) | rows_ok
        if not any(c.critical_slot(r) >= n_rows for r in missing):
            m.add(eop)
        out["critical_rows"] = m
    return out


def reference_allowed(rules: RuleSet, prompt: list[int], prefix: list[int]) -> set[int]:
    """The mask-mode rules together; [EOP] when they leave nothing."""
    masks = reference_rule_masks(rules, prompt, prefix, plan=True)
    allowed = set(range(rules.tables["vocab_size"]))
    for r in rules.masked_rules:
        allowed &= masks[r]
    return allowed or {rules.tables["eop_id"]}
