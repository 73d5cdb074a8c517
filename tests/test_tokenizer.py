"""Tokenizer wrapper and the self-built byte-level / BPE tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from v4jax import chat
from v4jax.chat import ASSISTANT, BOS, EOS, SPECIAL_TOKENS, THINK_END, THINK_START, USER
from v4jax.tokenizer import Tokenizer, build_byte_tokenizer, train_bpe_tokenizer

SAMPLE = (
    "Plain ASCII, tabs\tand\nnewlines\r\n, 中文：小柴胡冲剂和布洛芬能一起吃吗？ 22°C 💡 "
    "【{cursor_id}†L1】 ｜ ▁ \x00 émoji 👩‍👩‍👧"
)


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return build_byte_tokenizer()


def test_byte_tokenizer_round_trip(byte_tok):
    ids = byte_tok.encode(SAMPLE)
    assert byte_tok.decode(ids) == SAMPLE
    assert len(ids) == len(SAMPLE.encode("utf-8"))  # pure byte level: one id per byte
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)


def test_special_tokens_are_single_ids(byte_tok):
    assert byte_tok.bos_id == 0 and byte_tok.eos_id == 1
    for tok in SPECIAL_TOKENS:
        assert byte_tok.encode(tok) == [byte_tok.token_id(tok)]
    text = f"{BOS}{USER}你好{ASSISTANT}{THINK_START}推理{THINK_END}答案{EOS}"
    ids = byte_tok.encode(text)
    assert ids[:2] == [byte_tok.bos_id, byte_tok.token_id(USER)]
    assert ids[-1] == byte_tok.eos_id
    assert byte_tok.decode(ids) == text
    assert byte_tok.decode(ids, skip_special_tokens=True) == "你好推理答案"
    assert byte_tok.encode("x", add_bos=True)[0] == byte_tok.bos_id
    assert byte_tok.vocab_size == len(SPECIAL_TOKENS) + 256


def test_golden_prompt_round_trip(byte_tok):
    gold = Path(__file__).resolve().parents[2] / "shared" / "v4" / "encoding-tests"
    if not gold.is_dir():
        pytest.skip("golden cases not available")
    for path in sorted(gold.glob("test_output_*.txt")):
        text = path.read_text(encoding="utf-8")
        assert byte_tok.decode(byte_tok.encode(text)) == text


def test_token_id_missing_names_token(byte_tok):
    with pytest.raises(KeyError, match="no_such_token"):
        byte_tok.token_id("<｜no_such_token｜>")


def test_train_bpe_round_trip(tmp_path):
    src = Path(json.__file__).parent  # a few KB of stdlib source
    files = sorted(src.glob("*.py"))
    assert sum(f.stat().st_size for f in files) > 4000
    tok = train_bpe_tokenizer(files, vocab_size=600)
    assert tok.vocab_size == 600
    assert tok.bos_id == 0 and tok.eos_id == 1
    text = files[0].read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    for t in SPECIAL_TOKENS:
        assert tok.encode(t) == [tok.token_id(t)]

    # from an iterator of strings, with this repo's own source
    texts = [Path(chat.__file__).read_text(encoding="utf-8")]
    tok2 = train_bpe_tokenizer(iter(texts), vocab_size=400, special_tokens=[BOS, EOS])
    assert tok2.decode(tok2.encode(texts[0])) == texts[0]
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(texts, vocab_size=100)


def test_save_load_round_trip(tmp_path, byte_tok):
    written = byte_tok.save(tmp_path / "ckpt")
    assert written == tmp_path / "ckpt" / "tokenizer.json"
    loaded = Tokenizer.from_dir(tmp_path / "ckpt")
    assert loaded.vocab_size == byte_tok.vocab_size
    assert loaded.encode(SAMPLE + EOS) == byte_tok.encode(SAMPLE + EOS)
    assert loaded.decode(loaded.encode(SAMPLE)) == SAMPLE
    assert (loaded.bos_id, loaded.eos_id) == (0, 1)

    # BOS / EOS names are read from tokenizer_config.json when present
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": USER}, "eos_token": ASSISTANT}), encoding="utf-8")
    custom = Tokenizer.from_dir(tmp_path / "ckpt")
    assert (custom.bos_id, custom.eos_id) == (byte_tok.token_id(USER), byte_tok.token_id(ASSISTANT))


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)
