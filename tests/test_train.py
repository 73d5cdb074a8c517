"""Training: config validation and overrides, the router-bias rule, and one compiled tiny trainer (module scope)
that shows the loss falling, bitwise-exact resume from a mid-run checkpoint, a real bias update and the HF export.
"""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import v4jax
from v4jax import train as T

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N_STEPS, HALF = 16, 8


def _base(tmp, out="run"):
    """A 3-block tiny model (window-only + hash, CSA, HCA, MTP) on a tiny repeated corpus; quant_sim off only to
    keep the one compile short."""
    corpus = tmp / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 30)
    return {
        "model": {"preset": "tiny", "overrides": {"num_hidden_layers": 3, "compress_ratios": [0, 4, 128, 0],
                                                  "num_hash_layers": 1, "quantized": False, "quant_sim": False}},
        "data": {"paths": [str(corpus / "*.txt")], "tokenizer": "byte"},
        "optimizer": {"name": "muon", "lr": 3e-3, "warmup": 0, "clip": 1.0},
        "batch": 2, "grad_accum": 2, "seq_len": 128, "steps": N_STEPS, "log_interval": 4,
        "checkpoint_interval": HALF, "out_dir": str(tmp / out), "seed": 0, "tensorboard": False,
    }


# ---- config ---------------------------------------------------------------------------------------------
def test_overrides_parse_and_type(tmp_path):
    raw = T.apply_overrides(_base(tmp_path), [
        "optimizer.lr=1e-3", "optimizer.name=adamw", "remat=false", "trainable=null", "grad_accum=1",
        "data.paths=[a.txt, 'b c.txt']", "model.overrides.quant_sim=true", "mesh.data=1", "steps=7"])
    assert raw["optimizer"]["lr"] == "1e-3"                        # YAML 1.1 reads 1e-3 as text ...
    assert raw["data"]["paths"] == ["a.txt", "b c.txt"] and raw["remat"] is False and raw["trainable"] is None
    assert raw["model"]["overrides"]["quant_sim"] is True and raw["steps"] == 7
    raw["data"]["paths"] = _base(tmp_path)["data"]["paths"]
    c = T.validate(raw)
    assert c["optimizer"]["lr"] == pytest.approx(1e-3) and isinstance(c["optimizer"]["lr"], float)  # ... coerced
    assert c["optimizer"]["name"] == "adamw" and c["mesh"]["tensor"] == 1 and c["balance_weight"] == 1e-4
    with pytest.raises(T.TrainConfigError, match="expected key=value"):
        T.parse_override("optimizer.lr")
    with pytest.raises(T.TrainConfigError, match=r"unknown config key 'optimizer\.lrr'; did you mean 'optimizer\.lr'"):
        T.apply_overrides({}, ["optimizer.lrr=1"])
    with pytest.raises(T.TrainConfigError, match="steps: expected an integer"):
        T.validate(T.apply_overrides(_base(tmp_path), ["steps=ten"]))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(lr=1e-3), r"unknown config key 'lr'; did you mean 'optimizer\.lr'"),
    (lambda c: c.update(stpes=5), r"unknown config key 'stpes'; did you mean 'steps'"),
    (lambda c: c["optimizer"].update(wamup=5), r"unknown config key 'optimizer\.wamup'; did you mean 'optimizer\.warmup'"),
    (lambda c: c["model"]["overrides"].update(quant_simm=False),
     r"unknown config key 'model\.overrides\.quant_simm'.*did you mean 'model\.overrides\.quant_sim'"),
    (lambda c: c["optimizer"].update(muon={"momentun": 0.9}), r"'optimizer\.muon\.momentun'; did you mean 'optimizer\.muon\.momentum'"),
    (lambda c: c["optimizer"].update(name="sgd"), r"optimizer\.name: 'sgd' is not one of \['muon', 'adamw'\]"),
    (lambda c: c["data"].update(paths=["/no/such/dir/*.txt"]), r"data\.paths\[0\]: /no/such/dir/\*\.txt matches no file"),
    (lambda c: c["data"].update(chat=["/no/such/chat.jsonl"]), r"data\.chat\[0\]: /no/such/chat\.jsonl matches no file"),
    (lambda c: c["model"].update(path="/no/such/ckpt", preset=None), r"model\.path: no such checkpoint directory /no/such/ckpt"),
    (lambda c: c["model"].update(path="/tmp"), r"exactly one of model\.preset .* or model\.path"),
    (lambda c: c.update(batch=3), r"batch 3 is not divisible by grad_accum 2"),
    (lambda c: c.update(batch=6, mesh={"data": 2}), r"micro-batch of 3 rows .* does not divide over mesh\.data = 2"),
    (lambda c: c.update(batch=4, mesh={"data": 2}),
     r"(asks for 2 devices, but v4jax\.sharding is not available|needs 2 devices, only 1 present)"),
    (lambda c: c.update(trainable="no_such_param"), r"trainable: 'no_such_param' matches no trainable parameter"),
    (lambda c: c.update(trainable="("), r"trainable: '\(' is not a valid regex"),
    (lambda c: c["optimizer"].update(warmup=100), r"optimizer\.warmup 100 must be between 0 and steps"),
    (lambda c: c["data"].update(tokenizer="/no/tok.json"), r"data\.tokenizer: no such file or directory /no/tok\.json"),
    (lambda c: c.update(loss_chunk=-1), r"loss_chunk: must be >= 0"),
    (lambda c: c.update(indexer_kl_mode="desne"), r"indexer_kl_mode: 'desne' is not one of .*did you mean 'dense'"),
    (lambda c: (c.update(indexer_kl_weight=1.0), c["model"]["overrides"].update(compress_ratios=[0, 128, 128, 0])),
     r"indexer_kl_weight 1\.0: the model has no CSA layer"),
])
def test_bad_configs_give_one_clear_error(tmp_path, change, message):
    c = _base(tmp_path)
    change(c)
    with pytest.raises(T.TrainConfigError, match=message):
        T.validate(c)


def test_cli_validate_only_and_errors(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_base(tmp_path)))
    assert T.main(["--config", str(p), "--validate-only", "optimizer.lr=1e-3"]) == 0
    assert T.main(["--config", str(p), "--validate-only", "optimizer.lrr=1e-3"]) == 2
    assert "did you mean 'optimizer.lr'" in capsys.readouterr().err
    assert T.main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_shipped_configs_validate(tmp_path):
    for name in ("tiny", "demo"):
        T.validate(T.load_config(str(CONFIGS / f"{name}.yaml")))
    # the fine-tuning examples start from a checkpoint directory (the shipped demo model)
    ck = tmp_path / "ck"
    ck.mkdir()
    T.validate(T.load_config(str(CONFIGS / "context_extension.yaml"), [f"model.path={ck}"]))
    c = T.validate(T.load_config(str(CONFIGS / "indexer_warmup.yaml"), [f"model.path={ck}"]))
    assert c["indexer_kl_weight"] > 0 and c["indexer_kl_mode"] == "dense" and c["trainable"]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    T.validate(T.load_config(str(CONFIGS / "sft_example.yaml"), [f"data.chat=[{chat}]", f"model.path={ck}"]))


def test_demo_model_size_and_layer_types():
    raw = T.load_config(str(CONFIGS / "demo.yaml"))
    c = T.validate(raw)
    cfg = T.model_config(c, 4096)
    kinds = {cfg.layer_kind(i) for i in range(cfg.n_layers)}
    assert kinds == {"swa", "csa", "hca"} and cfg.num_hash_layers >= 1 and cfg.n_mtp == 1
    assert cfg.num_hash_layers < cfg.n_layers and cfg.hc_mult > 1
    assert v4jax.params.count_params(cfg) * 2 <= 20e6        # <= 20 MB in bf16


def test_trainable_subsets_by_regex(tmp_path):
    c = T.validate(_base(tmp_path))
    cfg = T.model_config(c, None)
    flat = v4jax.params.abstract_flat(cfg, "bf16")
    every = T.trainable_names(c, cfg, flat)
    assert "embed.weight" in every and "mtp.0.e_proj.weight" in every
    assert not any(n.endswith(("gate.bias", "tid2eid")) for n in every)      # rule-updated / integer leaves
    c["trainable"] = r"^layers\.[0-9]+\.attn\."
    sub = T.trainable_names(c, cfg, flat)
    assert sub and all(n.startswith("layers.") and ".attn." in n for n in sub) and len(sub) < len(every)
    c["trainable"], c["mtp_weight"] = None, 0.0
    assert not any(n.startswith("mtp.") for n in T.trainable_names(c, cfg, flat))   # MTP not run: frozen
    assert [r for r, _ in T.score_blocks(cfg, True)] == [1, 2, 3] and T.score_blocks(cfg, False)[-1][0] == 2


# ---- the router-bias rule -------------------------------------------------------------------------------
def test_bias_rule_on_synthetic_loads():
    bias = jnp.zeros(4, jnp.float32)
    new = T.router_bias_update(bias, jnp.array([10.0, 2.0, 4.0, 4.0]), 0.001)
    np.testing.assert_array_equal(np.asarray(new), np.float32([-0.001, 0.001, 0.001, 0.001]))
    # routing with a skewed score: repeated updates move the loads toward balance
    E, k, T_ = 8, 2, 512
    key = jax.random.key(0)
    scores = jax.random.normal(key, (T_, E)) * 0.02 + jnp.linspace(0, 0.05, E)   # later experts favoured

    def loads(b):
        _, ids = jax.lax.top_k(scores + b, k)
        return jnp.bincount(ids.reshape(-1), length=E).astype(jnp.float32)

    b = jnp.zeros(E)
    first = loads(b)
    for _ in range(100):
        b = T.router_bias_update(b, loads(b), 0.001)
    last = loads(b)
    assert float(last.max() / last.mean()) < 0.5 * float(first.max() / first.mean())
    assert float(jnp.std(last)) < 0.3 * float(jnp.std(first))


def test_flops_params_counts_active_experts_only():
    cfg = v4jax.ModelConfig.preset("tiny")
    full = T.flops_params(cfg)
    dense = cfg.replace(num_experts_per_tok=cfg.n_routed_experts)
    assert T.flops_params(dense) > full > 0
    assert T.flops_params(cfg, with_mtp=False) < full


# ---- one compiled trainer -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    logs = []
    tr = T.Trainer(_base(tmp), log=logs.append)
    init_params = jax.tree.map(np.asarray, tr.params())
    hist = tr.run()
    path = tr.export()
    final = jax.tree.map(np.asarray, tr.params())
    tr.close()
    return {"tmp": tmp, "hist": hist, "logs": logs, "export": path, "final": final, "init": init_params,
            "out": Path(tr.out_dir)}


def test_loss_falls(run_a):
    losses = [h["loss"] for h in run_a["hist"]]
    assert len(losses) == N_STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    mtp = [h["mtp_loss"] for h in run_a["hist"]]
    assert np.mean(mtp[-3:]) < np.mean(mtp[:3])
    # progress lines and metrics.jsonl
    lines = [l for l in run_a["logs"] if l.startswith("step ")]
    assert any(l.startswith(f"step {N_STEPS}/{N_STEPS} | loss") and "tok/s" in l and "MFU" in l for l in lines)
    recs = [json.loads(l) for l in (run_a["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, N_STEPS + 1))
    assert {"loss", "mtp_loss", "balance", "gnorm", "lr", "tok_per_s", "mfu"} <= set(recs[0])
    # hash layer 0 has no bias; a frozen leaf stays put, trainable ones move
    init, final = v4jax.params.flatten(run_a["init"]), v4jax.params.flatten(run_a["final"])
    assert np.array_equal(init["layers.0.ffn.gate.tid2eid"], final["layers.0.ffn.gate.tid2eid"])
    assert not np.array_equal(init["layers.1.attn.wq_a.weight"], final["layers.1.attn.wq_a.weight"])


def test_resume_is_exact_and_bias_moves_toward_balance(run_a):
    c = _base(run_a["tmp"], out="resumed")
    c.update(resume=str(run_a["out"] / "checkpoints"), resume_step=HALF)
    tr = T.Trainer(c, log=lambda s: None)
    assert tr.step == HALF
    name = "layers.2.ffn.gate.bias"
    before = np.asarray(tr.state["frozen"][name])
    h1 = tr.run(HALF + 1)
    after = np.asarray(tr.state["frozen"][name])
    load = h1[0]["load"][2]
    np.testing.assert_allclose(after - before, 0.001 * np.sign(load.mean() - load), atol=1e-6)
    assert np.any(after != before)
    h2 = tr.run()
    tr.close()
    want = [h["loss"] for h in run_a["hist"][HALF:]]
    got = [h["loss"] for h in h1 + h2]
    assert got == want                                             # bitwise-identical losses after the restart
    assert [h["gnorm"] for h in h1 + h2] == [h["gnorm"] for h in run_a["hist"][HALF:]]


def test_final_export_loads(run_a):
    cfg, params = v4jax.load(run_a["export"], dtype="bf16")
    assert cfg.num_hidden_layers == 3 and not cfg.quantized
    got = v4jax.params.flatten(jax.tree.map(np.asarray, params))
    want = v4jax.params.flatten(run_a["final"])
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k].astype(np.float32), want[k].astype(np.float32), err_msg=k)
    assert os.path.isfile(os.path.join(run_a["export"], "tokenizer.json"))


# ---- losses: router statistics over real tokens, chunked cross-entropy, indexer KL ------------------------
EXACT = dict(quant_sim=False, compute_dtype="float32")


def _small_cfg(**kw):
    """3 blocks (window-only + hash, CSA, HCA) + MTP, fp32 without the quantisation simulations."""
    return v4jax.ModelConfig.preset("tiny", num_hidden_layers=3, compress_ratios=(0, 4, 128, 0), num_hash_layers=1,
                                    quantized=False, **EXACT, **kw)


@pytest.fixture(scope="module")
def small():
    cfg = _small_cfg()
    return cfg, v4jax.init_params(cfg, jax.random.key(0), dtype="bf16")


def test_router_stats_ignore_padding(small):
    """Appending pad tokens (token_mask False) changes neither the expert loads nor the balance losses: the
    model is causal, so the real tokens route exactly as in the unpadded batch."""
    cfg, params = small
    B, S0, pad = 2, 45, 19
    toks = jax.random.randint(jax.random.key(3), (B, S0), 2, cfg.vocab_size)
    seg = jnp.asarray(np.r_[np.ones(20), np.full(S0 - 20, 2)].astype(np.int32))[None].repeat(B, 0)
    f = jax.jit(lambda t, s, m: v4jax.forward_train(cfg, params, t, s, token_mask=m, remat=False, logits=False))
    ref = f(toks, seg, jnp.ones((B, S0), bool))
    padded = f(jnp.concatenate([toks, jnp.ones((B, pad), toks.dtype)], 1),
               jnp.concatenate([seg, jnp.full((B, pad), 3, seg.dtype)], 1),
               jnp.arange(S0 + pad)[None].repeat(B, 0) < S0)
    L, k = cfg.n_layers, cfg.num_experts_per_tok
    np.testing.assert_array_equal(np.asarray(padded["load"][:L]), np.asarray(ref["load"][:L]))
    np.testing.assert_allclose(np.asarray(padded["balance"][:L]), np.asarray(ref["balance"][:L]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ref["load"].sum(-1)), B * S0 * k)
    # MTP position i embeds token i+1: the last real position (its next token is a pad) does not count
    np.testing.assert_allclose(float(padded["load"][L].sum()), B * (S0 - 1) * k)


def test_router_stats_mask_equals_slicing():
    cfg = _small_cfg()
    rng = np.random.default_rng(0)
    B, S, E, k = 3, 11, cfg.n_routed_experts, cfg.num_experts_per_tok
    ids = jnp.asarray(np.argsort(rng.random((B, S, E)), -1)[..., :k])
    a = jnp.asarray(rng.random((B, S, E)) + 0.1, jnp.float32)
    n = [11, 7, 0]                                                    # the last row is all padding
    mask = jnp.arange(S)[None] < jnp.asarray(n)[:, None]
    got = v4jax.losses.router_stats(cfg, ids, a, mask)
    want_load = sum(np.bincount(np.asarray(ids[b, :n[b]]).ravel(), minlength=E) for b in range(B))
    np.testing.assert_array_equal(np.asarray(got["load"]), want_load)
    bal = []
    for b in range(2):
        one = v4jax.losses.router_stats(cfg, ids[b:b + 1, :n[b]], a[b:b + 1, :n[b]], jnp.ones((1, n[b]), bool))
        bal.append(float(one["balance"]))
    np.testing.assert_allclose(float(got["balance"]), np.mean(bal), rtol=1e-6)
    # all tokens real: the unmasked statistics of moe.router_stats
    full = v4jax.losses.router_stats(cfg, ids, a, jnp.ones((B, S), bool))
    old = v4jax.moe.router_stats(cfg, ids.reshape(B * S, k), a.reshape(B * S, E), B)
    np.testing.assert_array_equal(np.asarray(full["load"]), np.asarray(old["load"]))
    np.testing.assert_allclose(float(full["balance"]), float(old["balance"]), rtol=1e-6)


def test_pad_token_mask_from_packed_rows(tmp_path):
    from v4jax import data as D
    tok = D.load_tokenizer("byte")
    docs = ["abc " * 40, "xy" * 5]
    chat = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n")
    corpus = D.Corpus.from_files([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], [str(tmp_path / "c.jsonl")],
                                 tok)
    ds = D.PackedDataset(corpus, 384, 0, pad_id=tok.eos_id, shuffle=False)
    rows = ds.epoch_rows(0)
    got = T.pad_token_mask(rows, tok.eos_id)
    # ground truth from the packing plan: a token is real iff some document piece covers it
    plan, rs = ds._epoch_plan(0)
    want = np.zeros_like(got)
    for r in range(len(rs) - 1):
        for (_, ro, _, _, n) in plan[rs[r]:rs[r + 1]]:
            want[r, ro:ro + n] = True
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rows["token_mask"].astype(bool), want)      # what data.py marks itself
    assert (~got).any() and got.any()
    # tokens whose loss is masked (the chat prompt, BOS) are real tokens
    assert (got & (rows["loss_mask"] == 0)).any()


@pytest.mark.parametrize("chunk", [2, 8, 24, 48])
def test_chunked_xent_equals_unchunked(chunk):
    """Loss and gradients (hidden states and head) of the chunked cross-entropy equal the all-logits version;
    chunk // B positions per chunk, S = 29 not a multiple of any of them."""
    B, S, D, V = 2, 29, 32, 300
    ks = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(ks[0], (B, S, D), jnp.float32)
    head = {"weight": jax.random.normal(ks[1], (V, D), jnp.float32) * 0.3}
    tgt = jax.random.randint(ks[2], (B, S), 0, V)
    w = (jax.random.uniform(ks[3], (B, S)) > 0.3).astype(jnp.float32)

    def full(h, head):
        logits = jnp.einsum("bsd,vd->bsv", h, head["weight"], precision="highest")
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.sum(jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0] * w)

    f = jax.jit(jax.value_and_grad(lambda h, hd: v4jax.losses.xent_sum(hd, h, tgt, w, chunk), argnums=(0, 1)))
    (v, (gh, ghead)), (v0, (gh0, ghead0)) = f(h, head), jax.value_and_grad(full, argnums=(0, 1))(h, head)
    assert v4jax.losses.seq_chunk(chunk, B, S) < S
    np.testing.assert_allclose(float(v), float(v0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(gh0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ghead["weight"]), np.asarray(ghead0["weight"]), rtol=1e-5, atol=1e-6)


def _kl_numpy(cfg, q, kv, entries, sink, I, ds, tmask, k):
    """float64 KL(main attention || indexer) summed over the valid queries, written from the spec: per query the
    index list of attention.prefill (window rows of its document, then the top-k of the visible entries), one
    softmax with the sink per head; the compressed entries' probabilities summed over heads, L1-normalised."""
    q, kv, entries, I = (np.asarray(a, np.float64) for a in (q, kv, entries, I))
    sink, ds, tmask = np.asarray(sink, np.float64), np.asarray(ds), np.asarray(tmask)
    B, S, H, K = q.shape
    W, total = cfg.sliding_window, 0.0
    for b in range(B):
        for t in range(S):
            vis = [s for s in range(-(-ds[b, t] // 4), (t + 1) // 4)]
            if not tmask[b, t] or not vis:
                continue
            sel = sorted(vis, key=lambda s: -I[b, t, s])[:k]
            win = [j for j in range(max(0, t - W + 1), t + 1) if j >= ds[b, t]]
            z = np.concatenate([kv[b, win], entries[b, sel]]) @ q[b, t].T * K ** -0.5            # [T, H]
            e = np.exp(z - z.max(0))
            P = e / (e.sum(0) + np.exp(sink - z.max(0)))
            p = P[len(win):].sum(1)
            p /= p.sum()
            lq = I[b, t, sel] - np.log(np.exp(I[b, t, sel]).sum())
            total += np.sum(p * (np.log(p) - lq))
    return total


@pytest.mark.parametrize("topk", [8, 64])
def test_indexer_kl_matches_numpy(small, topk):
    """One CSA layer on two packed rows (document starts at 0 and 37; pads at the end of row 1): the KL over the
    top-8 selection (sparse stage; 17 entries) and over all entries (index_topk 64: dense), chunked or not."""
    from v4jax import attention, compressor, indexer, losses
    from v4jax.layers import rope_inv_freq, rope_table
    cfg, params = small
    cfg = cfg.replace(index_topk=topk)
    p = params["layers"]["1"]["attn"]
    B, S = 2, 70
    x = jax.random.normal(jax.random.key(1), (B, S, cfg.dim), jnp.float32)
    seg = jnp.asarray(np.stack([np.ones(S), np.r_[np.ones(37), np.full(S - 37, 2)]]).astype(np.int32))
    ds = attention.doc_starts(seg)
    tmask = jnp.ones((B, S), bool).at[1, 60:].set(False)
    got = [float(jax.jit(lambda x: losses.indexer_kl(cfg, p, 1, x, ds, tmask, c))(x)) for c in (0, 32)]
    @jax.jit
    def intermediates(x):     # the model's own q, kv, compressed entries and index scores
        inv = rope_inv_freq(cfg, 1)
        cos, sin = rope_table(jnp.arange(S)[None] - ds, inv)
        qr, q, kv = attention._qkv(cfg, p, x, cos, sin)
        entries, _ = compressor.prefill(cfg, p["compressor"], x, 4, cfg.head_dim, inv, doc_start=ds)
        keys, _ = compressor.prefill(cfg, p["indexer"]["compressor"], x, 4, cfg.index_head_dim, inv, indexer=True,
                                     doc_start=ds)
        return q, kv, entries, indexer.scores(*indexer.queries(cfg, p["indexer"], x, qr, cos, sin), keys)
    q, kv, entries, I = intermediates(x)
    want = _kl_numpy(cfg, q, kv, entries, p["attn_sink"], I, ds, tmask, min(topk, S // 4))
    assert want > 0
    np.testing.assert_allclose(got, [want, want], rtol=2e-5)
    n = int(losses.kl_query_mask(ds, tmask).sum())
    ds_, tm_ = np.asarray(ds), np.asarray(tmask)
    assert n == sum(1 for b in range(B) for t in range(S) if tm_[b, t] and (t + 1) // 4 > -(-ds_[b, t] // 4))


def test_indexer_kl_gradient_reaches_only_the_indexers(small):
    """The KL's gradient w.r.t. every parameter is non-zero exactly on the CSA layers' indexer weights."""
    cfg, params = small
    toks = jax.random.randint(jax.random.key(2), (2, 48), 2, cfg.vocab_size)

    def kl(p):
        o = v4jax.forward_train(cfg, p, toks, remat=True, with_mtp=False, logits=False, indexer_kl=True,
                                kl_chunk=32)
        return jnp.sum(o["indexer_kl"]) / o["indexer_kl_queries"]
    g = v4jax.params.flatten(jax.jit(jax.grad(kl, allow_int=True))(params))
    nonzero = {n for n, v in g.items() if jnp.issubdtype(v.dtype, jnp.floating) and float(jnp.max(jnp.abs(v))) > 0}
    assert nonzero and all(n.startswith("layers.1.attn.indexer.") for n in nonzero), sorted(nonzero)
    for n in ["wq_b.weight", "weights_proj.weight", "compressor.wkv.weight", "compressor.wgate.weight",
              "compressor.norm.weight"]:
        assert f"layers.1.attn.indexer.{n}" in nonzero, n


def test_indexer_warmup_config_trains_only_the_indexers(tmp_path):
    """configs/indexer_warmup.yaml on the 3-block tiny model: only indexer weights are trainable, they alone move
    (router biases included stay put), and the KL falls within a few steps."""
    raw = T.load_config(str(CONFIGS / "indexer_warmup.yaml"))
    base = _base(tmp_path)
    raw["model"] = {"preset": "tiny", "overrides": base["model"]["overrides"]}
    raw["data"] = {"paths": base["data"]["paths"], "tokenizer": "byte"}
    raw.update(batch=2, seq_len=128, steps=6, out_dir=str(tmp_path / "warm"), tensorboard=False,
               checkpoint_interval=0, log_interval=100)
    raw["optimizer"].update(lr=1e-2, warmup=0)
    tr = T.Trainer(raw, log=lambda s: None)
    assert tr.spec.indexer_kl_dense and tr.spec.indexer_kl_weight == 1.0 and not tr.with_mtp
    assert tr.names and all(".attn.indexer." in n for n in tr.names)
    assert T.forward_config(tr.spec, 128).index_topk == 32                  # dense: every one of the 32 entries
    before = v4jax.params.flatten(jax.tree.map(np.asarray, tr.params()))
    hist = tr.run()
    after = v4jax.params.flatten(jax.tree.map(np.asarray, tr.params()))
    tr.close()
    kl = [h["indexer_kl"] for h in hist]
    assert all(np.isfinite(kl)) and kl[-1] < 0.7 * kl[0], kl
    moved = {n for n in before if not np.array_equal(before[n], after[n])}
    assert moved and all(".attn.indexer." in n for n in moved), sorted(moved)


def test_train_losses_chunked_equal_unchunked(small):
    """The step's next-token + MTP cross-entropy on the tiny model: chunked (8 positions x 2 rows per chunk) and
    all-logits give the same loss and gradients; the all-logits version is the old one (forward_train's logits)."""
    cfg, params = small
    B, S = 2, 40
    toks = jax.random.randint(jax.random.key(4), (B, S), 2, cfg.vocab_size)
    seg = jnp.asarray(np.r_[np.ones(25), np.full(S - 25, 2)].astype(np.int32))[None].repeat(B, 0)
    mask = jnp.ones((B, S), jnp.int32).at[:, :3].set(0)
    spec = T.StepSpec(cfg=cfg, trainable=(), model_dtypes=(), master_dtype="float32", remat=False, with_mtp=True,
                      mtp_weight=0.3, balance_weight=0.0, bias_speed=0.0, bias_rows=(), balance_rows=(),
                      grad_accum=1, opt=None, loss_chunk=16)

    def ce(p, chunk):
        r = T.model_losses(dataclasses.replace(spec, loss_chunk=chunk), p, toks, seg, mask)
        return r["ce"] / r["n"] + 0.3 * r["mtp"] / r["n_mtp"]

    def old(p):     # the logits of forward_train and a plain log-softmax
        o = v4jax.forward_train(cfg, p, toks, seg, remat=False)
        tot = 0.0
        for shift, logits, wt in ((1, o["logits"], 1.0), (2, o["mtp_logits"], 0.3)):
            w = (mask[:, shift:] * (seg[:, shift:] == seg[:, :-shift])).astype(jnp.float32)
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-shift]), toks[:, shift:, None], -1)[..., 0]
            tot = tot - wt * jnp.sum(lp * w) / jnp.sum(w)
        return tot
    f = jax.jit(lambda p: [jax.value_and_grad(fn, allow_int=True)(p) for fn in
                           (lambda p: ce(p, 16), lambda p: ce(p, 0), old)])
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    (v, g), (v0, g0), (v1, g1) = f(p32)                       # fp32 weights: fp32 gradients
    np.testing.assert_allclose([float(v), float(v1)], float(v0), rtol=1e-6)
    g, g0, g1 = (v4jax.params.flatten(x) for x in (g, g0, g1))
    for n in g0:
        if jnp.issubdtype(g0[n].dtype, jnp.floating):
            scale = float(jnp.max(jnp.abs(g0[n].astype(jnp.float32)))) + 1e-30
            for other in (g, g1):
                err = float(jnp.max(jnp.abs(other[n].astype(jnp.float32) - g0[n].astype(jnp.float32))))
                assert err <= 1e-5 * scale, (n, err, scale)


def test_bench_train_rejects_batch_not_divisible_by_grad_accum():
    """`python -m v4jax.bench train --batch 2 --grad-accum 16` fails with one message, before building anything."""
    import argparse
    from v4jax import bench_train
    p = argparse.ArgumentParser()
    bench_train.add_parser(p.add_subparsers(dest="cmd"))
    for batch, accum in ((2, 16), (6, 4), (4, 0)):
        args = p.parse_args(["train", "--size", "tiny", "--batch", str(batch), "--grad-accum", str(accum)])
        with pytest.raises(SystemExit, match="must be a multiple of --grad-accum"):
            bench_train.bench_train(args)
