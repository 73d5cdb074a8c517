import json

import pytest

from v4jax.config import ConfigError, ModelConfig


@pytest.mark.parametrize("name,preset", [("config-v4-flash.json", "flash"), ("config-v4-pro.json", "pro")])
def test_from_hf_matches_preset(shared_v4, name, preset):
    cfg = ModelConfig.from_hf(shared_v4 / name)
    assert cfg == ModelConfig.preset(preset)
    assert cfg.quantized and cfg.expert_dtype == "fp4"
    assert cfg.rope_factor == 16 and cfg.original_max_position_embeddings == 65536


def test_layer_schedules():
    flash, pro = ModelConfig.preset("flash"), ModelConfig.preset("pro")
    assert [i for i in range(44) if flash.ratio(i) == 0] == [0, 1, 43]       # MTP (index 43) is SWA; 42 is CSA
    assert flash.ratio(42) == 4 and flash.ratio(41) == 128
    assert sum(flash.ratio(i) == 4 for i in range(43)) == 21
    assert sum(flash.ratio(i) == 128 for i in range(43)) == 20
    assert pro.ratio(0) == pro.ratio(1) == 128 and pro.ratio(61) == 0
    assert sum(pro.ratio(i) == 4 for i in range(61)) == 30
    assert sum(pro.ratio(i) == 128 for i in range(61)) == 31
    assert [flash.is_hash_layer(i) for i in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("name", ["tiny", "tiny-pro"])
def test_tiny_presets_keep_real_patterns(name):
    c = ModelConfig.preset(name)
    kinds = {c.layer_kind(i) for i in range(c.n_layers)}
    assert {"csa", "hca"} <= kinds and c.layer_kind(c.n_layers) == "swa"
    assert c.num_hash_layers == 3 and c.hc_mult == 4 and c.n_mtp == 1
    assert c.index_topk * 4 < 64   # selection matters at test lengths
    if name == "tiny":
        assert "swa" in {c.layer_kind(i) for i in range(c.n_layers)}
    else:
        assert c.layer_kind(0) == "hca"


def _write(tmp_path, raw):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(raw))
    return p


def test_hf_round_trip(tmp_path):
    cfg = ModelConfig.preset("tiny")
    assert ModelConfig.from_hf(_write(tmp_path, cfg.to_hf())) == cfg
    assert ModelConfig.from_hf(tmp_path) == cfg            # a directory holding config.json


@pytest.mark.parametrize("change,field", [
    ({"compress_ratios": [0, 0, 4]}, "compress_ratios"),
    ({"compress_ratios": [0, 0, 4, 3, 4, 0]}, "compress_ratios[3]"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"model_type": "llama"}, "model_type"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"o_groups": 3}, "o_groups"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
])
def test_invalid_fields_are_named(tmp_path, change, field):
    raw = {**ModelConfig.preset("tiny").to_hf(), **change}
    with pytest.raises(ConfigError, match=r"config\.json: .*" + field.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_hf(_write(tmp_path, raw))


def test_missing_field_and_file(tmp_path):
    raw = ModelConfig.preset("tiny").to_hf()
    del raw["compress_ratios"]
    with pytest.raises(ConfigError, match="missing required field.*compress_ratios"):
        ModelConfig.from_hf(_write(tmp_path, raw))
    with pytest.raises(ConfigError, match="no such config file"):
        ModelConfig.from_hf(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path / "bad")


def test_config_is_hashable_and_static():
    assert hash(ModelConfig.preset("tiny")) == hash(ModelConfig.preset("tiny"))
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("huge")
