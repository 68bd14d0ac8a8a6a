"""Token sequences from impression logs: (prompt ids, page ids) pairs and padded training batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from homepage.logs import iter_impressions, log_parts
from policies.tokenizer import EncodeStats, GenPageTokenizer

IGNORE_INDEX = -100  # labels of prompt and padding positions (no loss)


class TokenLists(Sequence):
    """Token-id lists stored flat: item i is values[starts[i]:ends[i]] as a list[int]. `values` may be a
    memory-mapped cache file (EncodedLogs), so a subset is new (starts, ends) over the same values, not a copy."""

    def __init__(self, values: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.values, self.starts, self.ends = values, np.asarray(starts, np.int64), np.asarray(ends, np.int64)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> "TokenLists":
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        ends = np.cumsum(lengths)
        values = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(ends[-1]) if len(ends) else 0)
        return cls(values, ends - lengths, ends)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.values[self.starts[i]:self.ends[i]].tolist()

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts  # [N]

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token with the index of its list, in order.  -> (list index [T], token id [T])"""
        lengths = self.lengths()
        index = np.repeat(np.arange(len(self)), lengths)
        first = np.cumsum(lengths) - lengths  # each list's position in the output
        return index, np.asarray(self.values)[self.starts[index] + np.arange(int(lengths.sum())) - first[index]]

    def take(self, idx) -> "TokenLists":
        idx = np.asarray(idx, dtype=np.int64)
        return TokenLists(self.values, self.starts[idx], self.ends[idx])

    def contains_any(self, token_ids: Sequence[int], chunk: int = 65_536) -> np.ndarray:
        """Whether each list holds any of `token_ids`, `chunk` lists at a time (memory holds their tokens, never
        a mask over all of `values`).  -> [N] bool"""
        ids = np.asarray(list(token_ids), dtype=np.int64)
        out = np.zeros(len(self), dtype=bool)
        for a in range(0, len(self), chunk):
            part = TokenLists(self.values, self.starts[a:a + chunk], self.ends[a:a + chunk])
            index, tokens = part.flat()  # [T'] each token's list within the chunk, and the token
            out[a:a + len(part)] = np.bincount(index[np.isin(tokens, ids)], minlength=len(part)) > 0
        return out


@dataclass
class PageSequences:
    """Encoded impressions. prompts[i] ends with [PAGE]; pages[i] ends with [EOP] (lists of token ids, or a
    TokenLists over an encoded cache)."""

    prompts: Sequence[list[int]]
    pages: Sequence[list[int]]
    user_ids: Sequence[str]
    page_reward: np.ndarray  # [N] observed page reward
    stats: EncodeStats

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx) -> "PageSequences":
        idx = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
        pick = lambda xs: xs.take(idx) if isinstance(xs, TokenLists) else [xs[i] for i in idx]  # noqa: E731
        users = self.user_ids[idx] if isinstance(self.user_ids, np.ndarray) else [self.user_ids[i] for i in idx]
        return PageSequences(pick(self.prompts), pick(self.pages), users, self.page_reward[idx], self.stats)


ENCODE_CHUNK = 20_000  # impressions turned into Python objects at once while encoding (bounds memory, not speed)
ENCODER_VERSION = 1  # bump when the encoded arrays change meaning: old cache entries are then never read


@dataclass
class EncodedLogs:
    """Every impression of a validated log table, encoded once: prompts and pages as TokenLists, each row's split,
    user and page reward. Held in memory, or as memory-mapped arrays in a cache directory (`encode_logs`): no Python list per sequence,
    and the next stage on the same logs and tokenizer skips encoding."""

    prompts: TokenLists
    pages: TokenLists
    split: np.ndarray  # [N] str
    user_ids: np.ndarray  # [N] str
    page_reward: np.ndarray  # [N] float32
    stats: EncodeStats
    cache_dir: Path | None = None  # where the arrays live (None: in memory)
    from_cache: bool = False  # read from an earlier stage's encoding

    def __len__(self) -> int:
        return len(self.split)

    def select(self, tok: GenPageTokenizer, split: str | None = None, min_page_reward: float | None = None,
               exclude_entities: frozenset[str] = frozenset()) -> tuple[PageSequences, dict[str, int]]:
        """One split, positive pages only, or without some titles (in the prompt's history or on the page).
        -> (sequences, counts of impressions left out by each filter, in that order: reported, never silent)"""
        keep = np.ones(len(self), dtype=bool)
        skipped = {"other_split": 0, "not_positive": 0, "holds_excluded_title": 0}
        if split is not None:
            out = self.split != split
            skipped["other_split"] = int(out.sum())
            keep &= ~out
        if min_page_reward is not None:
            out = keep & (self.page_reward <= min_page_reward)
            skipped["not_positive"] = int(out.sum())
            keep &= ~out
        if exclude_entities:
            ids = [tok.vocab[f"ent:{e}"] for e in exclude_entities if f"ent:{e}" in tok.vocab]
            out = keep & (self.prompts.contains_any(ids) | self.pages.contains_any(ids))
            skipped["holds_excluded_title"] = int(out.sum())
            keep &= ~out
        idx = np.flatnonzero(keep)
        return PageSequences(self.prompts.take(idx), self.pages.take(idx), self.user_ids[idx],
                             self.page_reward[idx], self.stats), skipped


ENCODED_ARRAYS = (("prompt_values", np.int32), ("page_values", np.int32), ("prompt_len", np.int64),
                  ("page_len", np.int64), ("split", str), ("user_ids", str), ("page_reward", np.float32))


def _encode_chunks(table: pa.Table, tok: GenPageTokenizer, stats: EncodeStats, progress: bool):
    """Chunk by chunk of ENCODE_CHUNK rows: flat prompt and page token arrays, their lengths and per-row columns.
    -> iterator of {name: array} (ENCODED_ARRAYS)"""
    from tqdm import tqdm

    chunks = range(0, table.num_rows, ENCODE_CHUNK)
    for s in tqdm(chunks, desc="encode", unit="chunk", disable=not progress or len(chunks) < 2):
        pv, gv, pl, gl, sp, us, rw = [], [], [], [], [], [], []
        for imp in iter_impressions(table.slice(s, ENCODE_CHUNK)):
            p, g = tok.encode(imp, stats)
            pv.extend(p), gv.extend(g), pl.append(len(p)), gl.append(len(g))
            sp.append(imp.split), us.append(imp.context.user_id), rw.append(imp.page_reward)
        yield {name: np.asarray(values, dtype=dtype) for (name, dtype), values in zip(ENCODED_ARRAYS, (pv, gv, pl, gl, sp, us, rw))}


def _finish(a: dict) -> dict:
    """Lengths turned into end offsets: the arrays EncodedLogs is built from."""
    out = {k: v for k, v in a.items() if not k.endswith("_len")}
    for name in ("prompt", "page"):
        out[f"{name}_ends"] = np.cumsum(a[f"{name}_len"], dtype=np.int64)
    return out


def _encode_arrays(table: pa.Table, tok: GenPageTokenizer, progress: bool) -> tuple[dict, EncodeStats]:
    """The whole table encoded in memory (EncodedLogs' arrays)."""
    stats = EncodeStats()
    parts = list(_encode_chunks(table, tok, stats, progress))
    cat = {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, dtype) for name, dtype in ENCODED_ARRAYS}
    return _finish(cat), stats


def _encode_to_dir(table: pa.Table, tok: GenPageTokenizer, out: Path, progress: bool) -> EncodeStats:
    """The whole table encoded into out/<array>.npy, chunk by chunk: memory holds one chunk of impressions (and
    one chunk of an array while the files are joined), never the whole encoding."""
    stats = EncodeStats()
    parts = out / "chunks"
    parts.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, chunk in enumerate(_encode_chunks(table, tok, stats, progress)):
        for name, value in chunk.items():
            np.save(parts / f"{name}.{i}.npy", value)
        n += 1
    for name, dtype in ENCODED_ARRAYS:
        pieces = [np.load(parts / f"{name}.{i}.npy", mmap_mode="r") for i in range(n)]
        if dtype is str:  # fixed-width strings: the widest chunk's width
            dtype = max((p.dtype for p in pieces), key=lambda d: d.itemsize, default=np.dtype("<U1"))
        final = name.replace("_len", "_ends")
        whole = np.lib.format.open_memmap(out / f"{final}.npy", mode="w+", dtype=dtype,
                                          shape=(sum(len(p) for p in pieces),))
        at, offset = 0, 0
        for p in pieces:
            if final.endswith("_ends"):  # lengths -> end offsets across chunks
                whole[at:at + len(p)] = np.cumsum(p, dtype=np.int64) + offset
                offset = int(whole[at + len(p) - 1]) if len(p) else offset
            else:
                whole[at:at + len(p)] = p
            at += len(p)
        whole.flush()
        del whole, pieces
    import shutil

    shutil.rmtree(parts)
    return stats


def _from_arrays(a: dict, stats: EncodeStats, cache_dir: Path | None = None, from_cache: bool = False) -> EncodedLogs:
    def lists(name: str) -> TokenLists:
        ends = np.asarray(a[f"{name}_ends"])
        return TokenLists(a[f"{name}_values"], np.concatenate([[0], ends[:-1]]) if len(ends) else ends, ends)

    return EncodedLogs(lists("prompt"), lists("page"), np.asarray(a["split"]), np.asarray(a["user_ids"]),
                       np.asarray(a["page_reward"]), stats, cache_dir, from_cache)


def encoding_key(table: pa.Table, tok: GenPageTokenizer, sources: Sequence[Path] = ()) -> str:
    """What the encoding depends on: the encoder version, the tokenizer's whole vocabulary, the source files'
    bytes (the dataset's log files) and the validated table's rows (their count and impression ids: bad rows
    quarantined away change it)."""
    import hashlib
    import json

    from homepage.dataset import hash_files

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"encoder": ENCODER_VERSION, "tokens": tok.tokens, "max_history": tok.max_history,
                         "rows": table.num_rows}).encode())
    hash_files(h, sources)
    h.update(np.ascontiguousarray(table.column("impression_id").to_numpy()).tobytes())
    return h.hexdigest()


def encode_logs(table: pa.Table, tok: GenPageTokenizer, cache_root: str | Path | None = None,
                sources: Sequence[Path] = (), progress: bool = True) -> EncodedLogs:
    """Every impression of `table` encoded (EncodedLogs). cache_root: reuse the encoding an earlier stage left
    under cache_root/<encoding_key> (memory-mapped), or write it there (to a temporary name renamed when whole:
    a kill never leaves half an entry). None: encode in memory."""
    import json
    import os
    import shutil

    if cache_root is None:
        arrays, stats = _encode_arrays(table, tok, progress)
        return _from_arrays(arrays, stats)
    entry = Path(cache_root) / encoding_key(table, tok, sources)
    if not (entry / "meta.json").exists():
        from homepage.dataset import remove_stale_entries

        remove_stale_entries(entry)
        tmp = entry.with_name(f".tmp_{entry.name}_{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        stats = _encode_to_dir(table, tok, tmp, progress)
        (tmp / "meta.json").write_text(json.dumps({"encoder": ENCODER_VERSION, "rows": table.num_rows,
                                                   "stats": dataclasses.asdict(stats)}))
        try:
            tmp.rename(entry)
        except OSError:  # another rank or stage wrote the same entry meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        if not (entry / "meta.json").exists():
            raise RuntimeError(f"could not write the encoding cache entry {entry}")
        fresh = True
    else:
        fresh = False
    meta = json.loads((entry / "meta.json").read_text())
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in entry.glob("*.npy")}
    return _from_arrays(arrays, EncodeStats(**meta["stats"]), entry, from_cache=not fresh)


def encode_stage_logs(cfg, dataset, table: pa.Table, tok: GenPageTokenizer, ranks=None) -> EncodedLogs:
    """A stage's encoding of its validated logs (cfg: a `common.config.StageConfig`): from cfg.cache_dir when an
    earlier stage left it there, else encoded and cached. Under torchrun rank 0 encodes, the others then read its
    entry (ranks: common.distributed.Ranks)."""
    from common import distributed

    ranks = ranks or distributed.Ranks()
    cache = cfg.cache_dir or None
    if ranks.is_main or cache is None:
        encoded = encode_logs(table, tok, cache, log_parts(dataset.logs), progress=ranks.is_main)
    distributed.barrier(ranks)
    if not ranks.is_main and cache is not None:
        encoded = encode_logs(table, tok, cache, log_parts(dataset.logs), progress=False)
    return encoded


def encode_table(table: pa.Table, tok: GenPageTokenizer, split: str | None = None, min_page_reward: float | None = None,
                 exclude_entities: frozenset[str] = frozenset()) -> tuple[PageSequences, dict[str, int]]:
    """Encodes logged impressions in memory, optionally one split, positive pages only, or without some titles.

    Returns the sequences and counts of impressions left out by each filter (reported, never silent)."""
    other = 0
    if split is not None and "split" in table.column_names:  # only the split's rows are encoded
        part = table.filter(pc.equal(table.column("split"), split))
        other, table = table.num_rows - part.num_rows, part
    seqs, skipped = encode_logs(table, tok, progress=False).select(tok, split, min_page_reward, exclude_entities)
    return seqs, {**skipped, "other_split": skipped["other_split"] + other}


def split_logs(table: pa.Table, tok: GenPageTokenizer, split: str, encoded: EncodedLogs | None = None,
               columns: Sequence[str] | None = None) -> tuple[PageSequences, pa.Table]:
    """One split of validated logs (all impressions, positive or not), encoded; the table rows stay aligned
    with the sequences (row i of the returned table is sequence i), for the ground truth and per-token targets.
    encoded: the whole table's encoding (encode_logs), reused instead of encoding the split again.
    columns: only these columns of the split's rows (the returned table is a copy of them: of a memory-mapped
    log, only what the caller reads is copied into memory); needs `encoded`."""
    if columns is not None:
        if encoded is None:
            raise ValueError("split_logs: columns needs the table's encoding (encoded=)")
        part = table.select(list(columns)).filter(pc.equal(table.column("split"), split))
        return encoded.select(tok, split)[0], part
    part = table.filter(pc.equal(table.column("split"), split))
    if encoded is None:
        seqs, _ = encode_table(part, tok)
    else:
        seqs, _ = encoded.select(tok, split)
    return seqs, part


def pad_batch(seqs: Sequence[Sequence], pad_id: int | float, length: int | None = None, dtype: torch.dtype = torch.long,
              side: Literal["right", "left"] = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of different lengths (lists or numpy arrays) as one batch, each padded with pad_id after it
    (side="right": training, scoring, log-probs) or before it ("left": a prompt batch to generate from).

    length: the batch width T (at least the longest sequence); None: the longest sequence.
    -> (values [B, T] of dtype, attention_mask [B, T] long: 1 on each sequence's own positions)"""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # [B]
    longest = int(lengths.max()) if len(seqs) else 0
    T = longest if length is None else length
    if T < longest:
        raise ValueError(f"pad_batch: a sequence of {longest} tokens does not fit length={T}")
    pos = torch.arange(T)[None, :]  # [1, T]
    mask = pos < lengths[:, None] if side == "right" else pos >= T - lengths[:, None]  # [B, T]
    out = torch.full((len(seqs), T), pad_id, dtype=dtype)
    if len(seqs):  # the True positions of mask, row by row, are the sequences' values in order
        out[mask] = torch.cat([torch.as_tensor(s, dtype=dtype) for s in seqs])
    return out, mask.long()


def collate(prompts: list[list[int]], pages: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on page tokens only (paper section 5.1: the context is the prompt).

    Returns input_ids [B, T], attention_mask [B, T], labels [B, T] (IGNORE_INDEX outside pages).
    """
    ids, mask = pad_batch([p + g for p, g in zip(prompts, pages)], pad_id)
    labels, _ = pad_batch([[IGNORE_INDEX] * len(p) + g for p, g in zip(prompts, pages)], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def page_token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of page tokens and their count.  -> (scalar, scalar)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    targets = batch["labels"][:, 1:]  # [B, T-1]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    valid = targets != IGNORE_INDEX
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (nll * valid).sum(), valid.sum()
