"""Tokenizer wrapper around HF ``tokenizers`` plus small self-built tokenizers for tests and demos.

* :class:`Tokenizer` loads the real ``tokenizer.json`` shipped in a V4 checkpoint directory
  (:meth:`Tokenizer.from_dir`) and exposes ``encode`` / ``decode`` / ``token_id`` / ``bos_id`` /
  ``eos_id`` / ``vocab_size``. Special tokens written in the text (``<｜User｜>``, ``<think>``, ...)
  always encode to their single ids; BOS is only added on request (the V4 config has
  ``add_bos_token: false``; chat prompts carry BOS as text).
* :func:`build_byte_tokenizer` builds, without any download, a pure byte-level tokenizer (the 256
  byte symbols, no merges) with the V4 special tokens as added special tokens: special tokens
  first (BOS = 0, EOS = 1 as in V4), then byte ``b`` at id ``len(special_tokens) + b``.
* :func:`train_bpe_tokenizer` trains a byte-level BPE tokenizer on text (files or an iterator).

Both self-built tokenizers round-trip arbitrary UTF-8 text exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from .chat import BOS, EOS, SPECIAL_TOKENS

__all__ = [
    "Tokenizer",
    "build_byte_tokenizer",
    "train_bpe_tokenizer",
    "byte_to_unicode",
]

PathLike = Union[str, os.PathLike]


def _token_text(value) -> str | None:
    """A token from tokenizer_config.json: plain string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Thin wrapper around :class:`tokenizers.Tokenizer` with V4 conventions."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str = BOS, eos_token: str = EOS):
        self._tk = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token

    # ---- loading / saving -------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: PathLike, **kwargs) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(tokenizers.Tokenizer.from_file(str(path)), **kwargs)

    @classmethod
    def from_dir(cls, path: PathLike) -> "Tokenizer":
        """Load ``tokenizer.json`` from a checkpoint directory.

        BOS / EOS names come from ``tokenizer_config.json`` when present, else the V4 defaults.
        Raises FileNotFoundError ("<dir>/ has no tokenizer.json") when the file is absent.
        """
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{directory}/ has no tokenizer.json")
        kwargs = {}
        config = directory / "tokenizer_config.json"
        if config.is_file():
            try:
                cfg = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                cfg = {}
            bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
            if bos:
                kwargs["bos_token"] = bos
            if eos:
                kwargs["eos_token"] = eos
        return cls(tokenizers.Tokenizer.from_file(str(file)), **kwargs)

    def save(self, path: PathLike) -> Path:
        """Write ``tokenizer.json``: ``path`` is a directory (created if needed) or a ``.json`` file.

        Returns the path of the written file.
        """
        path = Path(path)
        if path.suffix == ".json" and not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            file = path
        else:
            path.mkdir(parents=True, exist_ok=True)
            file = path / "tokenizer.json"
        self._tk.save(str(file))
        return file

    # ---- core API ---------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tk

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in the text map to their single ids."""
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        encs = self._tk.encode_batch(list(texts), add_special_tokens=False)
        return [([self.bos_id] if add_bos else []) + list(e.ids) for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        """Id of a token given by its text (e.g. ``"<｜User｜>"``); KeyError naming it if absent."""
        idx = self._tk.token_to_id(name)
        if idx is None:
            raise KeyError(f"token {name!r} is not in the tokenizer vocabulary")
        return idx

    def id_to_token(self, idx: int) -> str:
        tok = self._tk.id_to_token(int(idx))
        if tok is None:
            raise KeyError(f"token id {idx} is out of range (vocab size {self.vocab_size})")
        return tok

    def has_token(self, name: str) -> bool:
        return self._tk.token_to_id(name) is not None

    @property
    def bos_id(self) -> int:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids in use, added tokens included (the model's embedding may be larger)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


# ---------------------------------------------------------------------------------------------
# Self-built tokenizers
# ---------------------------------------------------------------------------------------------


def byte_to_unicode() -> dict[int, str]:
    """The byte -> printable character table used by byte-level tokenizers (GPT-2 convention):
    printable Latin-1 bytes map to themselves, the others to code points 256, 257, ... in order."""
    keep = (
        set(range(ord("!"), ord("~") + 1))
        | set(range(ord("¡"), ord("¬") + 1))
        | set(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _check_specials(special_tokens: Sequence[str]) -> list[str]:
    specials = list(dict.fromkeys(special_tokens))
    for tok in specials:
        if not isinstance(tok, str) or not tok:
            raise ValueError(f"special tokens must be non-empty strings, got {tok!r}")
    return specials


def _byte_level_parts(tk: tokenizers.Tokenizer) -> None:
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()


def _default_bos_eos(specials: Sequence[str]) -> dict:
    kwargs = {}
    if BOS not in specials and specials:
        kwargs["bos_token"] = specials[0]
    if EOS not in specials and len(specials) > 1:
        kwargs["eos_token"] = specials[1]
    return kwargs


def build_byte_tokenizer(special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A pure byte-level tokenizer: ``special_tokens`` at ids 0..k-1, byte ``b`` at id ``k + b``.

    With the default V4 special tokens BOS is 0 and EOS is 1. Text round-trips exactly. If BOS /
    EOS are not among the special tokens, the first two special tokens play their roles.
    """
    specials = _check_specials(special_tokens)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for b, ch in byte_to_unicode().items():
        if ch in vocab:
            raise ValueError(f"special token {ch!r} collides with a byte symbol")
        vocab[ch] = len(specials) + b
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    _byte_level_parts(tk)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(tk, **_default_bos_eos(specials))


def _is_path(x) -> bool:
    return isinstance(x, os.PathLike) or (isinstance(x, str) and "\n" not in x and os.path.isfile(x))


def train_bpe_tokenizer(
    files_or_iterator: PathLike | Iterable[PathLike] | Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    *,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (special tokens first, full 256-byte alphabet).

    ``files_or_iterator`` is a file path, a list of file paths, or an iterable of text strings.
    ``vocab_size`` counts special tokens, the 256 byte symbols and the learned merges.
    """
    specials = _check_specials(special_tokens)
    if vocab_size < len(specials) + 256:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: need at least {len(specials) + 256} "
            f"({len(specials)} special tokens + 256 bytes)"
        )
    tk = tokenizers.Tokenizer(models.BPE())
    _byte_level_parts(tk)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if isinstance(files_or_iterator, (str, os.PathLike)):
        if not os.path.isfile(files_or_iterator):
            raise FileNotFoundError(f"no training file at {files_or_iterator}")
        tk.train([os.fspath(files_or_iterator)], trainer)
    else:
        items = list(files_or_iterator)
        if not items:
            raise ValueError("train_bpe_tokenizer: no training data given")
        if all(_is_path(x) for x in items):
            tk.train([os.fspath(x) for x in items], trainer)
        else:
            for x in items:
                if not isinstance(x, str):
                    raise TypeError(f"expected text strings or file paths, got {type(x).__name__}")
            tk.train_from_iterator(items, trainer, length=len(items))
    return Tokenizer(tk, **_default_bos_eos(specials))
