"""Data pipeline: path specs, packing (document isolation, 128-alignment, masks), determinism, resume, chat masks."""
import json
import os

import numpy as np
import pytest

from v4jax import chat
from v4jax import data as D
from v4jax.tokenizer import build_byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def _doc(n, d, splittable=True):
    toks = (np.arange(n, dtype=np.int32) + 1000 * d)
    mask = np.ones(n, np.uint8)
    mask[0] = 0
    return D.Document(toks, mask, splittable, f"doc{d}")


def _corpus(lengths, splittable=True):
    return D.Corpus([_doc(n, d, splittable if isinstance(splittable, bool) else splittable[d])
                     for d, n in enumerate(lengths)])


# ---- paths ---------------------------------------------------------------------------------------------
def test_resolve_paths_stdlib_globs_dirs_and_errors(tmp_path):
    files = D.resolve_paths(["stdlib:json/*.py"])
    assert files and all(f.endswith(".py") and "/json/" in f for f in files)
    assert files == sorted(files)
    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "b.md", "sub/c.txt"):
        (tmp_path / name).write_text("x")
    assert len(D.resolve_paths([str(tmp_path)])) == 3                      # a directory: every file below it
    assert len(D.resolve_paths([str(tmp_path / "**" / "*.txt")])) == 2     # recursive glob
    assert len(D.resolve_paths([str(tmp_path)], exclude=["*.md"])) == 2
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(D.DataError, match=r"data\.paths\[1\]: .*nope/\*\.txt matches no file"):
        D.resolve_paths([str(tmp_path / "a.txt"), missing])
    with pytest.raises(D.DataError, match="stdlib:no_such_module"):
        D.resolve_paths(["stdlib:no_such_module/*.py"])
    # stdlib: never includes third-party packages
    assert not any("site-packages" in f for f in D.resolve_paths(["stdlib:**/__init__.py"]))


# ---- packing -------------------------------------------------------------------------------------------
def _check_rows(ds, rows, corpus):
    """Every run of a row is a piece of one document (tokens equal to the source slice) or a masked pad run;
    pieces start at multiples of 128; ids are contiguous runs numbered 1, 2, ..."""
    S = ds.seq_len
    seen = {}
    for r in range(rows["tokens"].shape[0]):
        tok, seg, mask = rows["tokens"][r], rows["segment_ids"][r], rows["loss_mask"][r]
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
        for s in np.unique(seg):
            idx = np.nonzero(seg == s)[0]
            a, b = idx[0], idx[-1] + 1
            assert np.array_equal(idx, np.arange(a, b))            # contiguous run
            piece = tok[a:b]
            if np.all(piece == ds.pad_id) and not np.any(mask[a:b]):
                continue                                            # a pad run
            assert a % 128 == 0, f"document piece starts at {a}"
            d = int(piece[0]) // 1000
            off = int(piece[0]) % 1000
            src = corpus.doc(d)
            assert np.array_equal(piece, src.tokens[off:off + (b - a)])
            assert np.array_equal(mask[a:b], src.mask[off:off + (b - a)])
            seen.setdefault(d, []).append((off, b - a))
        assert len(tok) == S
    return seen


def test_packing_alignment_isolation_and_coverage():
    lengths = [5, 300, 128, 1, 700, 129, 60, 255, 40]
    corpus = _corpus(lengths)
    ds = D.PackedDataset(corpus, 256, seed=3, pad_id=999)
    rows = ds.epoch_rows(0)
    seen = _check_rows(ds, rows, corpus)
    for d, n in enumerate(lengths):                                 # every token of every document exactly once
        pieces = sorted(seen[d])
        assert pieces[0][0] == 0 and sum(p[1] for p in pieces) == n
        assert all(a + m == b for (a, m), (b, _) in zip(pieces, pieces[1:]))
    # pads carry no loss, and the training targets never cross a segment boundary
    from v4jax.train import _targets
    import jax.numpy as jnp
    w = np.asarray(_targets(jnp.asarray(rows["segment_ids"]), jnp.asarray(rows["loss_mask"]), 1))[:, :-1]
    same = rows["segment_ids"][:, 1:] == rows["segment_ids"][:, :-1]
    assert np.all(w[~same] == 0)
    pad = rows["tokens"] == 999
    assert np.all(rows["loss_mask"][pad] == 0)
    # targets: exactly the in-document next tokens (document token t+1 follows t)
    tgt_ok = (rows["tokens"][:, 1:] == rows["tokens"][:, :-1] + 1)
    assert np.all(tgt_ok[w > 0])


def test_whole_documents_not_split_unless_longer_than_a_row():
    lengths = [100, 200, 90, 600, 30]
    corpus = _corpus(lengths, splittable=False)
    ds = D.PackedDataset(corpus, 256, seed=0, pad_id=999)
    seen = _check_rows(ds, ds.epoch_rows(0), corpus)
    for d, n in enumerate(lengths):
        if n <= 256:
            assert seen[d] == [(0, n)]
        else:
            assert [m for _, m in sorted(seen[d])] == [256, 256, 88]


def test_shuffle_is_deterministic_and_changes_per_epoch():
    corpus = _corpus([130 + 7 * i for i in range(30)])
    a = D.PackedDataset(corpus, 512, seed=1).next_rows(8)["tokens"]
    b = D.PackedDataset(corpus, 512, seed=1).next_rows(8)["tokens"]
    c = D.PackedDataset(corpus, 512, seed=2).next_rows(8)["tokens"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ds = D.PackedDataset(corpus, 512, seed=1)
    e0 = ds.epoch_rows(0)["tokens"]
    e1 = ds.epoch_rows(1)["tokens"]
    assert not np.array_equal(e0[:4], e1[:4])


def test_resume_position_exact_across_epochs():
    corpus = _corpus([100, 400, 37, 256, 900, 12])
    ds = D.PackedDataset(corpus, 256, seed=5)
    n = ds.rows_in_epoch(0)
    ds.next_rows(n - 1)                       # stop one row before the epoch ends
    state = ds.state()
    assert state == {"epoch": 0, "index": n - 1}
    want = ds.next_rows(n + 3)                # crosses into epoch 1
    assert ds.state()["epoch"] >= 1
    ds2 = D.PackedDataset(corpus, 256, seed=5)
    ds2.set_state(json.loads(json.dumps(state)))
    got = ds2.next_rows(n + 3)
    for k in want:
        assert np.array_equal(want[k], got[k])
    with pytest.raises(D.DataError, match="outside the data"):
        ds2.set_state({"epoch": 0, "index": n + 1})


def test_text_corpus_from_files(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.txt").write_text("")                          # empty files are skipped
    (tmp_path / "c.txt").write_bytes(b"caf\xe9")                 # undecodable bytes are replaced, not fatal
    c = D.Corpus.from_files(D.resolve_paths([str(tmp_path / "*.txt")]), [], tok)
    assert len(c) == 2
    d = c.doc(0)
    assert d.tokens[0] == tok.bos_id and d.tokens[-1] == tok.eos_id and d.mask[0] == 0 and d.mask[1:].all()
    assert tok.decode(d.tokens[1:-1]) == "hello world"
    tr, ev = c.split(0.5, seed=0)
    assert len(tr) == 1 and len(ev) == 1


# ---- chat ----------------------------------------------------------------------------------------------
def _masked_text(tok, doc):
    """Decoded runs of target tokens."""
    runs, cur = [], []
    for t, m in zip(doc.tokens, doc.mask):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


CONV = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!", "reasoning_content": "greet back"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"}]


def test_chat_mask_covers_exactly_assistant_turns(tok):
    doc = D.chat_document({"messages": CONV}, tok)
    text = tok.decode(doc.tokens)
    assert text == chat.encode_messages(CONV, add_generation_prompt=False)
    assert _masked_text(tok, doc) == ["hello!" + chat.EOS, "4" + chat.EOS]
    assert not doc.splittable


def test_chat_mask_thinking_mode(tok):
    doc = D.chat_document({"messages": CONV, "thinking": "high"}, tok)
    # the last turn is generated after <Assistant><think>: reasoning, </think>, answer, EOS are targets; the
    # earlier turn, whose reasoning the format drops inside the conversation, is context
    assert _masked_text(tok, doc) == ["add them" + chat.THINK_END + "4" + chat.EOS]
    # with tools every turn keeps its reasoning and is trained on
    tools = [{"type": "function", "function": {"name": "calc", "description": "c", "parameters": {}}}]
    msgs = CONV[:2] + [{"role": "assistant", "content": "", "reasoning_content": "use tool", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done", "reasoning_content": "ok"}]
    doc = D.chat_document({"messages": msgs, "tools": tools, "thinking": "high"}, tok)
    runs = _masked_text(tok, doc)
    assert len(runs) == 2
    assert runs[0].startswith("use tool" + chat.THINK_END) and chat.TOOL_CALLS_START in runs[0]
    assert runs[0].endswith(chat.EOS) and runs[1] == "ok" + chat.THINK_END + "done" + chat.EOS


def test_chat_jsonl_errors_and_packing(tmp_path, tok):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": CONV}) + "\n\n" + json.dumps({"messages": CONV[:3]}) + "\n")
    docs = D.read_chat_jsonl(str(p), tok)
    assert len(docs) == 2
    corpus = D.Corpus(docs)
    ds = D.PackedDataset(corpus, 512, seed=0)
    rows = ds.epoch_rows(0)
    starts = [np.nonzero(rows["tokens"][r] == tok.bos_id)[0] for r in range(len(rows["tokens"]))]
    assert all(s % 128 == 0 for r in starts for s in r)
    assert rows["loss_mask"].sum() == sum(int(d.mask.sum()) for d in docs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONV}) + "\n{not json\n")
    with pytest.raises(D.DataError, match=r"bad\.jsonl:2: not valid JSON"):
        D.read_chat_jsonl(str(bad), tok)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(D.DataError, match=r"bad\.jsonl:1: no assistant turn"):
        D.read_chat_jsonl(str(bad), tok)
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(D.DataError, match=r"bad\.jsonl:1: .*unknown role 'wizard'"):
        D.read_chat_jsonl(str(bad), tok)


def test_load_tokenizer_specs(tmp_path, tok):
    assert D.load_tokenizer("byte").vocab_size == tok.vocab_size
    assert D.load_tokenizer("auto", None).vocab_size == tok.vocab_size
    tok.save(tmp_path / "ck")
    assert D.load_tokenizer("auto", str(tmp_path / "ck")).vocab_size == tok.vocab_size
    assert D.load_tokenizer(str(tmp_path / "ck" / "tokenizer.json")).vocab_size == tok.vocab_size
    with pytest.raises(D.DataError, match="has no tokenizer.json"):
        D.load_tokenizer(str(tmp_path))
    with pytest.raises(D.DataError, match="not 'auto', 'byte'"):
        D.load_tokenizer(str(tmp_path / "missing.json"))
