"""The `littlebit` command: argument errors, JSON output, info/eval on tiny local models (no network)."""

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from hf_littlebit.cli.main import main


def run(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_eval_json_then_info_and_eval(capsys, tiny_with_tokenizer, fake_cache, tmp_path):
    out_dir = tmp_path / "q"
    code, out, err = run(capsys, "--cache-dir", fake_cache, "quantize", tiny_with_tokenizer, "--bpw", "1.0",
                         "--eval", "--max-tokens", "128", "--seqlen", "32", "--json", "--out", out_dir,
                         "--calib-samples", "4", "--calib-seqlen", "16", "--steps", "3", "--e2e-steps", "2")
    assert code == 0, err
    result = json.loads(out)
    assert result["e2e_steps"] == 2 and result["e2e_kl_after"] >= 0
    for key in ("model", "method", "bpw_target", "bpw_true", "model_bytes_fp", "model_bytes_quantized", "ppl_fp",
                "ppl_quantized", "eval_tokens", "seconds_quantize", "block_loss_before", "block_loss_after"):
        assert key in result, key
    assert result["calibrated"] is True and result["calib_samples"] == 4  # corpora available: calibrated
    assert not (tmp_path / "q.work").exists()  # per-block checkpoints are removed once the model is saved
    assert result["eval_tokens"] == 4 * 31 and result["bpw_target"] == 1.0
    assert result["method"] == "lbadmm" and result["allocation"] == "auto"  # the calibrated default (demo recipe)
    assert result["recipe"] == "demo" and result["sample_prompt"] == "The capital of France is"
    assert result["sample_fp"] and result["sample_quantized"]  # both models' greedy continuations
    assert result["model_bytes_quantized"] < result["model_bytes_fp"]
    weights = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    assert result["checkpoint_bytes"] == weights > 0
    assert result["bpw_checkpoint"] > result["bpw_true"]  # the tiny model's fp32 embeddings and head dominate
    assert result["ppl_fp"] > 1 and result["ppl_quantized"] > 1
    assert (out_dir / "README.md").exists() and (out_dir / "tokenizer.json").exists()
    assert result["save_dtype"] == "bfloat16"  # the dense remainder is saved in bf16 by default
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        assert str(f.get_slice("model.embed_tokens.weight").get_dtype()) == "BF16"

    code, out, err = run(capsys, "info", out_dir)
    assert code == 0 and "converted layers (14)" in out and "bpw_true" not in err
    code, out, err = run(capsys, "info", out_dir, "--json")
    info = json.loads(out)
    assert info["quantization_config"]["quant_method"] == "littlebit" and len(info["summary"]["layers"]) == 14

    code, out, err = run(capsys, "--cache-dir", fake_cache, "eval", out_dir, "--max-tokens", "128", "--seqlen", "32",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["ppl"] == pytest.approx(result["ppl_quantized"], rel=1e-6)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["quantize", "{fp}", "--bpw", "0", "--out", "{tmp}/a"], "bpw must be a number with 0 < bpw <= 16"),
        (["quantize", "{fp}", "--bpw", "nan", "--out", "{tmp}/a"], "bpw must be"),
        (["quantize", "{fp}", "--method", "zip", "--out", "{tmp}/a"], "unknown method 'zip'"),
        (["quantize", "{fp}", "--method", "littlebit2", "--itq-iterations", "-3", "--out", "{tmp}/a"],
         "itq_iterations must be a non-negative integer"),
        (["quantize", "./no/such/folder"], "no such model folder"),
        (["quantize", "{fp}", "--calib-samples", "0", "--out", "{tmp}/a"], "calibration_samples must be a positive"),
        (["quantize", "{fp}", "--calib-batch-size", "0", "--out", "{tmp}/a"], "calibration_batch_size must be a"),
        (["info", "{fp}"], "not a littlebit checkpoint"),
        (["info", "{tmp}"], "no config.json"),
        (["eval", "./missing-dir"], "no such model folder"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, fp_checkpoint, tmp_path, argv, message):
    argv = [a.format(fp=fp_checkpoint("llama"), tmp=tmp_path) for a in argv]
    capsys.readouterr()  # the fixture's first save prints a progress bar: not the command's output
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("littlebit: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_quantize_with_littlebit2(capsys, fp_checkpoint, tmp_path):
    code, out, err = run(capsys, "quantize", fp_checkpoint("qwen2"), "--method", "littlebit2", "--itq-iterations", "5",
                         "--no-calibrate", "--json", "--out", tmp_path / "q2")
    assert code == 0, err
    assert json.loads(out)["method"] == "littlebit2" and json.loads(out)["calibrated"] is False
    saved = json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "littlebit2" and saved["itq_iterations"] == 5


def test_module_entry_point_and_usage_error():
    proc = subprocess.run([sys.executable, "-m", "hf_littlebit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "quantize" in proc.stdout and "fetch-assets" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "hf_littlebit", "quantize", "--bpw", "x"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "invalid float value" in proc.stderr


def test_lm_eval_adapter_registers_the_plugin_before_the_harness_runs(monkeypatch):
    import types

    from hf_littlebit.integrations import lm_eval_adapter
    from hf_littlebit.integrations.registration import is_registered

    seen = {}
    fake = types.ModuleType("lm_eval")
    fake_main = types.ModuleType("lm_eval.__main__")
    fake_main.cli_evaluate = lambda: seen.setdefault("registered", is_registered())
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", fake_main)
    lm_eval_adapter.main()
    assert seen == {"registered": True}
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval_adapter.main()


def test_data_free_default_method_is_littlebit(capsys, fp_checkpoint, tmp_path):
    """Without calibration data the command picks the fast Dual-SVID (DBF costs minutes and is no better there)."""
    code, out, err = run(capsys, "quantize", fp_checkpoint("llama"), "--no-calibrate", "--json",
                         "--out", tmp_path / "q")
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "littlebit" and result["allocation"] == "uniform" and result["calibrated"] is False
    code, out, err = run(capsys, "quantize", fp_checkpoint("llama"), "--no-calibrate", "--json", "--save-dtype",
                         "float32", "--out", tmp_path / "wide")
    assert code == 0, err
    wide = json.loads(out)
    assert wide["save_dtype"] == "float32" and wide["checkpoint_bytes"] > result["checkpoint_bytes"]
    with safe_open(str(tmp_path / "wide" / "model.safetensors"), framework="pt") as f:
        assert str(f.get_slice("model.embed_tokens.weight").get_dtype()) == "F32"
    # a 16-bit run saves in its own dtype by default (fp16 → bf16 would drop mantissa bits)
    code, out, err = run(capsys, "quantize", fp_checkpoint("llama"), "--no-calibrate", "--json", "--dtype", "float16",
                         "--out", tmp_path / "half")
    assert code == 0, err
    assert json.loads(out)["save_dtype"] == "float16"
    with safe_open(str(tmp_path / "half" / "model.safetensors"), framework="pt") as f:
        assert str(f.get_slice("model.embed_tokens.weight").get_dtype()) == "F16"


def test_default_auto_allocation_falls_back_to_uniform_when_min_rank_does_not_fit(capsys, tiny_with_tokenizer,
                                                                                  fake_cache, tmp_path):
    """At 0.1 bpw a tiny model cannot give every layer min_rank under one budget: the calibrated default (lbadmm
    + auto) then says so and uses uniform ranks instead of failing; an explicit --allocation auto still fails."""
    args = ["--cache-dir", fake_cache, "quantize", tiny_with_tokenizer, "--bpw", "0.1", "--json",
            "--calib-samples", "2", "--calib-seqlen", "16", "--steps", "1"]
    code, out, err = run(capsys, *args, "--out", tmp_path / "a")
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "lbadmm" and result["allocation"] == "uniform" and result["calibrated"] is True
    code, out, err = run(capsys, *args, "--allocation", "auto", "--out", tmp_path / "b")
    assert code == 2 and "cannot hold even min_rank" in err


def test_budget_picks_a_recipe_and_flags_override_it(capsys, tiny_with_tokenizer, fake_cache, tmp_path):
    from hf_littlebit.cli.recipes import RECIPES, recipe_for_budget

    out_dir = tmp_path / "b"
    code, out, err = run(capsys, "--cache-dir", fake_cache, "quantize", tiny_with_tokenizer, "--bpw", "1.0",
                         "--json", "--out", out_dir, "--budget-minutes", "60", "--calib-samples", "4",
                         "--calib-seqlen", "16", "--steps", "2", "--e2e-steps", "0")
    assert code == 0, err
    result = json.loads(out)
    # a tiny model: every recipe fits; the longest wins, its own fields stay where no flag overrides them
    longest = max(RECIPES, key=lambda r: r.minutes)
    assert result["recipe"] == longest.name and result["calib_samples"] == 4 and result["steps_per_block"] == 2
    saved = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    kept = {k: v for k, v in longest.fields.items()
            if k not in ("calibration_samples", "calibration_seqlen", "calibration_steps", "calibration_e2e_steps")}
    assert kept and all(saved[k] == v for k, v in kept.items())  # the recipe's own fields reach the config
    assert saved["calibration_samples"] == 4 and saved["calibration_e2e_steps"] == 0  # ... and the flags win
    # scaled to a model 100× SmolLM2's size, a 30-minute budget fits no recipe: a clear error, not a silent choice
    with pytest.raises(ValueError, match="below the shortest recipe"):
        recipe_for_budget(30, 100 * 134_515_008)
    assert recipe_for_budget(10_000, 134_515_008).name == longest.name
    # a higher rate costs more per step (larger rank): at 1.0 bpw 90 minutes no longer fit the recipe timed at 0.55
    assert 90 < longest.minutes_for(134_515_008, 1.0) and longest.minutes <= 90  # max was timed at 0.55 in 90 min
    assert recipe_for_budget(90, 134_515_008, bpw=1.0).name == "max-1bit"  # timed at 1.0 bpw
    assert recipe_for_budget(70, 134_515_008, bpw=1.0).name == "long"
    assert recipe_for_budget(90, 134_515_008, bpw=0.55).name == longest.name
    # every recipe states how many sequences a step holds: 1,024 tokens per step, as they were measured
    assert all(r.fields["calibration_batch_size"] * r.fields["calibration_seqlen"] == 1024 for r in RECIPES)
    assert longest.minutes_for(134_515_008, 0.1) == longest.minutes_for(134_515_008) == longest.minutes
    with pytest.raises(SystemExit):  # argparse: a budget and a named recipe exclude each other
        run(capsys, "quantize", tiny_with_tokenizer, "--budget-minutes", "5", "--recipe", "demo")
    assert "not allowed with argument" in capsys.readouterr().err


def test_explicit_flags_override_the_recipe_and_data_free_ignores_it(capsys, tiny_with_tokenizer, fake_cache, tmp_path):
    code, out, err = run(capsys, "--cache-dir", fake_cache, "quantize", tiny_with_tokenizer, "--bpw", "1.0", "--json",
                         "--out", tmp_path / "a", "--calib-samples", "2", "--calib-seqlen", "16", "--steps", "1",
                         "--e2e-steps", "1", "--mitigation-steps", "0", "--no-fisher", "--method", "dbf",
                         "--calib-batch-size", "1", "--e2e-latents")
    assert code == 0, err
    assert json.loads(out)["calib_batch_size"] == 1 and json.loads(out)["e2e_steps"] == 1
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "dbf" and saved["calibration_mitigation_steps"] == 0
    assert saved["calibration_batch_size"] == 1  # the recipe's 4 overridden
    assert saved["calibration_fisher"] is False and saved["calibration_e2e_latents"] is True
    code, out, err = run(capsys, "--cache-dir", fake_cache, "quantize", tiny_with_tokenizer, "--bpw", "1.0", "--json",
                         "--out", tmp_path / "b", "--no-calibrate", "--recipe", "standard", "--mitigation-steps", "3")
    assert code == 0, err
    result = json.loads(out)
    assert result["calibrated"] is False and result["method"] == "littlebit" and "recipe" not in result
