"""Training: config validation and overrides, the router-bias rule, and one compiled tiny trainer (module scope)
that shows the loss falling, bitwise-exact resume from a mid-run checkpoint, a real bias update and the HF export.
"""
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
