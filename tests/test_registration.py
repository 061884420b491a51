import importlib
import json
import subprocess
import sys

import pytest
from transformers.quantizers import auto as hf_auto

import hf_littlebit
import hf_littlebit.kernels
from hf_littlebit.integrations.registration import is_registered, register


def test_import_registers_littlebit():
    assert hf_auto.AUTO_QUANTIZER_MAPPING["littlebit"].__name__ == "LittleBitHfQuantizer"
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["littlebit"].__name__ == "LittleBitConfig"
    assert is_registered()


def test_register_twice_and_reload_do_not_raise():
    register()
    register()
    importlib.reload(importlib.import_module("hf_littlebit.integrations.quantizer"))
    importlib.reload(importlib.import_module("hf_littlebit.integrations.registration"))
    importlib.reload(hf_littlebit)
    assert is_registered()


def test_a_foreign_littlebit_registration_is_a_clear_error():
    original = hf_auto.AUTO_QUANTIZER_MAPPING["littlebit"]

    class Impostor:
        pass

    hf_auto.AUTO_QUANTIZER_MAPPING["littlebit"] = Impostor
    try:
        with pytest.raises(RuntimeError, match="already registered by .*Impostor"):
            register()
    finally:
        hf_auto.AUTO_QUANTIZER_MAPPING["littlebit"] = original


PROBE = """
import importlib.util, json, sys
if sys.argv[1] == "with":
    import hf_littlebit, hf_littlebit.kernels
from transformers.utils.import_utils import is_kernels_available
spec = importlib.util.find_spec("kernels")
print(json.dumps({"available": is_kernels_available(), "origin": spec.origin if spec else None}))
"""


def test_our_kernels_folder_does_not_shadow_the_hf_kernels_library(tmp_path):
    results = {}
    for mode in ("without", "with"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=tmp_path,
                             timeout=120, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["with"] == results["without"]
    assert "hf_littlebit" not in str(results["with"]["origin"])
    assert hf_littlebit.kernels.__name__ == "hf_littlebit.kernels"
    # the installed distribution (site-packages), not a build's stray hf_littlebit.egg-info in the repository root,
    # which older pip versions leave there and which lists the source tree
    import site

    dists = [d for d in importlib.metadata.distributions(path=site.getsitepackages())
             if d.metadata["Name"] == "hf-littlebit"]
    assert dists, "hf-littlebit is not installed in site-packages"
    assert not any(str(f).startswith("kernels/") for d in dists for f in d.files or [])


def test_no_script_folder_holds_a_module_named_like_the_hf_kernels_library():
    """``python bench/x.py`` puts ``bench/`` first on ``sys.path``: a ``bench/kernels.py`` there made Transformers
    take it for the Hugging Face ``kernels`` library and broke ``import transformers.Trainer`` in every bench script."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for folder in ("bench", "notebooks", "tests"):
        assert not (root / folder / "kernels.py").exists(), f"{folder}/kernels.py shadows the HF kernels library"
        assert not (root / folder / "kernels").is_dir(), f"{folder}/kernels/ shadows the HF kernels library"
