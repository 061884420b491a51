import json
import math

import pytest
import torch

from hf_littlebit import LittleBitConfig


@pytest.mark.parametrize("bpw", [0, -1, 16.5, float("nan"), float("inf"), "1", None, True])
def test_bad_bpw_is_refused_with_the_field_named(bpw):
    with pytest.raises(ValueError, match="bpw must be a number with 0 < bpw <= 16"):
        LittleBitConfig(bpw=bpw)


def test_bpw_bounds_accepted():
    assert LittleBitConfig(bpw=16).bpw == 16.0
    assert LittleBitConfig(bpw=0.1).bpw == pytest.approx(0.1)


def test_methods():
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        LittleBitConfig(method="svd")
    assert LittleBitConfig(method="dbf").factorizer_options() == {"n_iter": 100}
    assert LittleBitConfig(method="littlebit2").factorizer_options() == {"n_iter": 50}
    assert LittleBitConfig(method="littlebit").factorizer_options() == {}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"scale_dtype": "int8"}, "scale_dtype"),
        ({"min_rank": 0}, "min_rank"),
        ({"residual": "yes"}, "residual"),
        ({"kv_factor": 0}, "kv_factor"),
        ({"bpw_multipliers": {"(": 2.0}}, "regex"),
        ({"layer_ranks": {"a": 0}}, "layer_ranks"),
        ({"seed": 1.5}, "seed"),
        ({"itq_iterations": -1}, "itq_iterations"),
    ],
)
def test_other_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LittleBitConfig(**kwargs)


def test_json_round_trip_keeps_every_field_and_unknown_keys():
    cfg = LittleBitConfig(bpw=0.55, residual=False, modules_to_not_convert=["lm_head", "x"], kv_factor=2.0,
                          bpw_multipliers={r"mlp\.down_proj$": 1.5}, min_rank=16, seed=7, scale_dtype="bfloat16",
                          layer_ranks={"a.b": 24})
    d = json.loads(cfg.to_json_string(use_diff=False))
    assert d["quant_method"] == "littlebit"
    d["future_field"] = {"x": 1}
    again = LittleBitConfig.from_dict(d)
    assert again.to_dict() == {**cfg.to_dict(), "future_field": {"x": 1}}
    assert again.torch_scale_dtype == torch.bfloat16


def test_rank_factor_patterns():
    cfg = LittleBitConfig(kv_factor=2.0, bpw_multipliers={r"layers\.0\.": 0.5})
    assert cfg.rank_factor("model.layers.0.self_attn.k_proj") == 1.0
    assert cfg.rank_factor("model.layers.1.self_attn.v_proj") == 2.0
    assert cfg.rank_factor("model.layers.1.self_attn.q_proj") == 1.0
    assert math.isclose(cfg.rank_factor("model.layers.0.mlp.up_proj"), 0.5)
