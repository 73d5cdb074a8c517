"""Training data: plain-text and chat-JSONL documents, tokenized and packed into fixed-length rows.

Public API
  resolve_paths(specs, exclude=(), where="data.paths")   glob/dir/"stdlib:" specs -> sorted files (errors name the spec)
  load_tokenizer(spec, model_dir=None)                   "byte" | tokenizer.json file or dir | "auto"
  text_document(text, tokenizer)                         -> Document (BOS + text + EOS, every token a target)
  chat_document(obj, tokenizer, thinking="none")         -> Document (loss only on assistant tokens)
  assistant_spans(messages, thinking, tools)             -> (rendered text, [(start, end) char spans])
  Corpus.from_files(text_files, chat_files, tokenizer)   all documents, tokens held in one flat array
  PackedDataset(corpus, seq_len, seed)                   rows {tokens, segment_ids, loss_mask} [B, S] + resumable state

Row format (what `PackedDataset.next_rows(n)` returns; numpy int32 [n, S]):
  tokens       token ids; padding is the EOS id
  segment_ids  contiguous runs of equal ids, one run per document piece and one per run of padding, numbered
               1, 2, ... from the row start. This is `forward_train`'s `segment_ids`: every token sees only its
               own run, positions restart at the run start.
  token_mask   1 on document tokens, 0 on padding (what the router statistics count; prompts and BOS are 1)
  loss_mask    1 where the token at this position is a training target (it is predicted from the position
               before it, which the training step also requires to be in the same segment); 0 on padding, on
               prompt/system/user tokens of chat documents and on BOS.

Packing. Every document piece starts at a multiple of `align` (128: documents that start at multiples of 128
compute exactly as if each were alone, incl. the HCA 128-pooling and the CSA overlap), the gap to the next multiple
is a masked pad run. Documents come in a shuffled order (`numpy.random.default_rng([seed, epoch])`), one fresh
permutation per epoch. Splittable documents (plain text) fill rows completely: a document that does not fit in
the rest of a row continues at the start of the next row (its positions restart at 0 there; the first token of a
piece is never a target). Whole documents (chat samples) are never split unless longer than a row: one that does
not fit in the rest of the row starts a new row; one longer than a row is cut into row-length chunks.

Resumable position: the stream of rows is a pure function of (corpus, seq_len, align, seed); `state()` is
{"epoch", "index"} (the next row of that epoch's packing plan) and `set_state` jumps there exactly. The plan of an
epoch is recomputed from the document lengths alone (cheap), so nothing else needs saving.

Chat samples (one JSON object per line): {"messages": [...], "tools": [...]?, "thinking": "none"|"high"|"max"?}
in `v4jax.chat.encode_messages` format. The loss covers exactly the assistant turns' own text as the format
renders it: `{content}{tool calls}<EOS>` (chat mode, or an earlier turn whose reasoning the format drops) or
`{reasoning}</think>{content}{tool calls}<EOS>` (thinking mode) -- the tokens a model generates after
`<Assistant></think>` / `<Assistant><think>`. Spans come from rendering: turn i's text is the difference between
the rendering of messages[:i] (with the generation prompt) and of messages[:i+1] (without), used only where both
are prefixes of the full rendering. In thinking mode without tools the format drops the reasoning of assistant
turns before the last user turn; such a turn renders differently inside the conversation than it would as a reply,
so it is context (no loss) -- the model never produced it in that form. Tokens are assigned to a span by the
character offset of their first character (special tokens make the span boundaries token boundaries).
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from . import chat as chatfmt
from .tokenizer import Tokenizer, build_byte_tokenizer

ALIGN = 128
STDLIB_PREFIX = "stdlib:"


class DataError(ValueError):
    """Bad data input; the message names the offending path, line or field."""


# ---- paths -------------------------------------------------------------------------------------------
def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _is_third_party(path: str) -> bool:
    parts = path.replace(os.sep, "/").split("/")
    return "site-packages" in parts or "dist-packages" in parts


def _expand(spec: str) -> list[str]:
    """One spec -> matching regular files (unsorted). "stdlib:<glob>" is relative to the running interpreter's
    standard library (site-packages / dist-packages are not part of it and are skipped); a directory means every
    file below it; anything else is a glob (`**` recursive)."""
    stdlib = spec.startswith(STDLIB_PREFIX)
    pattern = spec[len(STDLIB_PREFIX):] if stdlib else os.path.expanduser(spec)
    if stdlib:
        pattern = os.path.join(stdlib_dir(), pattern)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    out = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if stdlib:
        root = stdlib_dir()
        out = [p for p in out if not _is_third_party(os.path.relpath(p, root))]
    return out


def resolve_paths(specs: Sequence[str] | str, exclude: Sequence[str] = (), where: str = "data.paths") -> list[str]:
    """Expand path specs into a sorted, de-duplicated list of files. Each spec must match at least one file
    (after `exclude`, a list of globs matched against the path and against the path relative to the stdlib for
    "stdlib:" specs; `fnmatch` semantics, `*` crosses directories)."""
    import fnmatch
    if isinstance(specs, str):
        specs = [specs]
    files: dict[str, None] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, str) or not spec:
            raise DataError(f"{where}[{i}]: expected a path or glob string, got {spec!r}")
        found = _expand(spec)
        if exclude:
            root = stdlib_dir()

            def excluded(p: str) -> bool:
                cands = [p, os.path.relpath(p, root)] if spec.startswith(STDLIB_PREFIX) else [p]
                return any(fnmatch.fnmatch(c, pat) for c in cands for pat in exclude)
            found = [p for p in found if not excluded(p)]
        if not found:
            shown = spec if not spec.startswith(STDLIB_PREFIX) else f"{spec} (= {os.path.join(stdlib_dir(), spec[7:])})"
            raise DataError(f"{where}[{i}]: {shown} matches no file")
        for p in sorted(found):
            files[os.path.abspath(p)] = None
    return list(files)


# ---- tokenizer ------------------------------------------------------------------------------------------
def load_tokenizer(spec: str | None, model_dir: str | None = None) -> Tokenizer:
    """"byte" -> the byte tokenizer; "auto"/None -> the checkpoint's tokenizer.json if `model_dir` has one, else
    the byte tokenizer; otherwise a tokenizer.json file or a directory holding one."""
    if spec in (None, "auto"):
        if model_dir and os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            return Tokenizer.from_dir(model_dir)
        return build_byte_tokenizer()
    if spec == "byte":
        return build_byte_tokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise DataError(f"data.tokenizer: {path}/ has no tokenizer.json")
        return Tokenizer.from_dir(path)
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    raise DataError(f"data.tokenizer: {spec!r} is not 'auto', 'byte', a tokenizer.json file or a directory")


# ---- documents ------------------------------------------------------------------------------------------
@dataclass
class Document:
    tokens: np.ndarray          # int32 [n]
    mask: np.ndarray            # uint8 [n]: 1 = this token is a training target
    splittable: bool = True     # may be continued in the next row (plain text) or not (chat samples)
    source: str = ""


def text_document(text: str, tokenizer: Tokenizer, *, add_bos: bool = True, add_eos: bool = True,
                  source: str = "", ids: Sequence[int] | None = None) -> Document:
    """BOS + text + EOS; every token but BOS is a target."""
    body = list(tokenizer.encode(text)) if ids is None else list(ids)
    toks = ([tokenizer.bos_id] if add_bos else []) + body + ([tokenizer.eos_id] if add_eos else [])
    mask = np.ones(len(toks), np.uint8)
    if add_bos:
        mask[0] = 0
    return Document(np.asarray(toks, np.int32), mask, True, source)


def assistant_spans(messages: Sequence[dict], thinking: Any = "none", tools: Sequence[dict] | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of the assistant turns that carry loss
    (see the module docstring)."""
    kw = dict(thinking=thinking, tools=tools)
    full = chatfmt.encode_messages(messages, add_generation_prompt=False, **kw)
    spans = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        before = chatfmt.encode_messages(messages[:i], add_generation_prompt=True, **kw) if i else (
            chatfmt.BOS)
        upto = chatfmt.encode_messages(messages[:i + 1], add_generation_prompt=False, **kw)
        if upto.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def chat_document(obj: Any, tokenizer: Tokenizer, thinking: Any = "none", *, source: str = "") -> Document:
    """One chat sample {"messages": [...], "tools"?, "thinking"?} -> Document with loss only on assistant text."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise DataError(f"{source}: expected an object with a 'messages' list")
    try:
        text, spans = assistant_spans(obj["messages"], obj.get("thinking", thinking), obj.get("tools"))
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{source}: {e}") from None
    if not spans:
        raise DataError(f"{source}: no assistant turn to train on")
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    starts = np.asarray([o[0] for o in enc.offsets], np.int64)
    mask = np.zeros(len(enc.ids), np.uint8)
    for a, b in spans:
        mask |= ((starts >= a) & (starts < b)).astype(np.uint8)
    return Document(np.asarray(enc.ids, np.int32), mask, False, source)


def read_chat_jsonl(path: str, tokenizer: Tokenizer, thinking: Any = "none") -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
            docs.append(chat_document(obj, tokenizer, thinking, source=f"{path}:{n}"))
    if not docs:
        raise DataError(f"{path}: no chat samples")
    return docs


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


# ---- corpus ---------------------------------------------------------------------------------------------
class Corpus:
    """All documents, tokens and masks held in flat arrays with offsets."""

    def __init__(self, docs: Sequence[Document]):
        if not docs:
            raise DataError("the corpus has no documents")
        lens = np.asarray([len(d.tokens) for d in docs], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.tokens = np.concatenate([d.tokens for d in docs]).astype(np.int32)
        self.mask = np.concatenate([d.mask for d in docs]).astype(np.uint8)
        self.splittable = np.asarray([d.splittable for d in docs], bool)
        self.sources = [d.source for d in docs]

    def __len__(self) -> int:
        return len(self.splittable)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def subset(self, idx: Iterable[int]) -> "Corpus":
        return Corpus([self.doc(int(i)) for i in idx])

    def doc(self, i: int) -> Document:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Document(self.tokens[a:b], self.mask[a:b], bool(self.splittable[i]), self.sources[i])

    @classmethod
    def from_files(cls, text_files: Sequence[str], chat_files: Sequence[str], tokenizer: Tokenizer, *,
                   thinking: Any = "none", add_bos: bool = True, add_eos: bool = True,
                   batch: int = 64) -> "Corpus":
        docs: list[Document] = []
        for i in range(0, len(text_files), batch):
            names = text_files[i:i + batch]
            texts = [read_text(p) for p in names]
            keep = [(p, t) for p, t in zip(names, texts) if t]
            ids = tokenizer.encode_batch([t for _, t in keep])
            docs += [text_document(t, tokenizer, add_bos=add_bos, add_eos=add_eos, source=p, ids=x)
                     for (p, t), x in zip(keep, ids)]
        for p in chat_files:
            docs += read_chat_jsonl(p, tokenizer, thinking)
        return cls(docs)

    def split(self, eval_fraction: float, seed: int) -> tuple["Corpus", "Corpus | None"]:
        """A deterministic held-out set of documents (at least one if eval_fraction > 0; none if only one doc)."""
        if eval_fraction <= 0 or len(self) < 2:
            return self, None
        n_eval = min(max(1, int(round(len(self) * eval_fraction))), len(self) - 1)
        perm = np.random.default_rng([seed, 1 << 20]).permutation(len(self))
        ev, tr = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
        return self.subset(tr), self.subset(ev)


# ---- packing --------------------------------------------------------------------------------------------
def _roundup(x: int, a: int) -> int:
    return -(-x // a) * a


def pack_plan(lengths: np.ndarray, splittable: np.ndarray, order: np.ndarray, seq_len: int,
              align: int = ALIGN) -> np.ndarray:
    """Pieces [P, 5] int64: (row, row_offset, doc, doc_offset, length), rows in increasing order. The last row
    may be partly filled. See the module docstring for the rules."""
    S = int(seq_len)
    pieces: list[tuple[int, int, int, int, int]] = []
    row, cur = 0, 0
    for d in order:
        d = int(d)
        L = int(lengths[d])
        if L == 0:
            continue
        if not splittable[d] and cur > 0 and (L > S or cur + L > S):
            row, cur = row + 1, 0
        off = 0
        while off < L:
            if cur >= S:
                row, cur = row + 1, 0
            n = min(L - off, S - cur)
            pieces.append((row, cur, d, off, n))
            off += n
            cur = _roundup(cur + n, align)
    return np.asarray(pieces, np.int64).reshape(-1, 5)


class PackedDataset:
    """An endless, deterministic stream of packed rows over a corpus (epoch after epoch)."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int = 0, *, align: int = ALIGN, pad_id: int = 1,
                 shuffle: bool = True):
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {seq_len}")
        self.corpus, self.seq_len, self.seed, self.align = corpus, int(seq_len), int(seed), int(align)
        self.pad_id, self.shuffle = int(pad_id), shuffle
        self.epoch, self.index = 0, 0
        self._plan_epoch, self._plan, self._row_start = None, None, None

    # plan of one epoch: pieces grouped by row
    def _epoch_plan(self, epoch: int):
        if self._plan_epoch != epoch:
            n = len(self.corpus)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            plan = pack_plan(self.corpus.lengths, self.corpus.splittable, order, self.seq_len, self.align)
            n_rows = int(plan[-1, 0]) + 1 if len(plan) else 0
            self._row_start = np.searchsorted(plan[:, 0], np.arange(n_rows + 1))
            self._plan, self._plan_epoch = plan, epoch
        return self._plan, self._row_start

    def rows_in_epoch(self, epoch: int | None = None) -> int:
        return len(self._epoch_plan(self.epoch if epoch is None else epoch)[1]) - 1

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def set_state(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.rows_in_epoch(epoch):
            raise DataError(f"data position {state} is outside the data (epoch {epoch} has "
                            f"{self.rows_in_epoch(epoch)} rows)")
        self.epoch, self.index = epoch, index

    def row(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        plan, rs = self._epoch_plan(epoch)
        S, c = self.seq_len, self.corpus
        tok = np.full(S, self.pad_id, np.int32)
        mask = np.zeros(S, np.uint8)
        label = np.zeros(S, np.int64)              # 0 = pad, k = k-th piece of the row
        for k, (_, ro, d, do, n) in enumerate(plan[rs[index]:rs[index + 1]], 1):
            a = c.offsets[d] + do
            tok[ro:ro + n] = c.tokens[a:a + n]
            mask[ro:ro + n] = c.mask[a:a + n]
            label[ro:ro + n] = k
        start = np.concatenate([[True], label[1:] != label[:-1]])
        seg = np.cumsum(start).astype(np.int32)
        return {"tokens": tok, "segment_ids": seg, "loss_mask": mask.astype(np.int32),
                "token_mask": (label > 0).astype(np.int32)}

    def next_rows(self, n: int) -> dict[str, np.ndarray]:
        """The next n rows ([n, S] arrays), advancing the position (into the next epoch when one ends)."""
        rows = []
        for _ in range(n):
            while self.index >= self.rows_in_epoch():
                self.epoch, self.index = self.epoch + 1, 0
            rows.append(self.row(self.epoch, self.index))
            self.index += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def epoch_rows(self, epoch: int = 0, limit: int | None = None) -> dict[str, np.ndarray]:
        """All rows of one epoch (or the first `limit`), without moving the position (evaluation sets)."""
        n = self.rows_in_epoch(epoch) if limit is None else min(limit, self.rows_in_epoch(epoch))
        rows = [self.row(epoch, i) for i in range(n)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
