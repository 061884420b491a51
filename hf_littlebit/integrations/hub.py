"""Loading, saving and Hub helpers that fail loudly where Transformers alone would only warn.

* :func:`from_pretrained` refuses to hand back a model that silently lost its LittleBit layers (Transformers loads
  a littlebit folder with *random* Linear weights and a warning when the plugin is not registered).
* :func:`save_pretrained` writes into a temporary sibling folder and swaps it in only when everything was written,
  so a failed save neither leaves a half-written folder nor destroys an earlier good one.
* :func:`push_to_hub` uploads the same files plus a model card naming the method, bpw and base model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..config import QUANT_METHOD
from ..errors import NotALittleBitModelError
from ..eval.summary import summary
from ..nn.layer import littlebit_layers
from .registration import is_registered, register


def from_pretrained(path_or_id: str | os.PathLike, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` for littlebit checkpoints, with checks.

    Registers the plugin if needed, then verifies that the loaded model really contains LittleBit layers. Any
    ``from_pretrained`` keyword (``device_map``, ``dtype``, ``revision``...) is passed through.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not is_registered():
        register()
    config = AutoConfig.from_pretrained(path_or_id, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
    qcfg = getattr(config, "quantization_config", None)
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    if method != QUANT_METHOD and "quantization_config" not in kwargs:
        raise NotALittleBitModelError(
            f"{path_or_id} is not a littlebit checkpoint (quant_method={method!r}); to quantize a full-precision "
            "model pass quantization_config=LittleBitConfig(...)"
        )
    model = (model_class or AutoModelForCausalLM).from_pretrained(path_or_id, **kwargs)
    if not littlebit_layers(model):
        raise NotALittleBitModelError(f"loading {path_or_id} produced no LittleBit layers")
    return model


def model_card(model: nn.Module, base_model: str | None = None) -> str:
    """Markdown model card (with YAML metadata) describing the quantization."""
    cfg = model.config.quantization_config
    report = summary(model)
    base = base_model or getattr(model.config, "_name_or_path", None) or "unknown"
    tags = ["littlebit", "quantized", "binary-factorization", f"{report.bpw_true:.2f}-bpw"]
    if report.whole_model:
        tags.append("whole-model")
    group = next((r.format for r in report.layers if r.kind != "linear" and r.format != "binary"), None)
    scope = ((f"the embedding ({group} group codes)" if group else "the embedding") + " and LM head are packed too; "
             "the target budgets every parameter" if report.whole_model else "embeddings, LM head and norms as stored")
    meta = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if base != "unknown" and not os.path.isdir(base):
        meta.append(f"base_model: {base}")
    meta.append("---")
    body = f"""
# {os.path.basename(str(base).rstrip('/')) or 'model'} · LittleBit {report.bpw_true:.2f} bpw

This model was compressed with [hf-littlebit](https://pypi.org/project/hf-littlebit/): every converted
`nn.Linear` is replaced by a packed binary low-rank layer `W ≈ diag(h) · U± · diag(l) · V±ᵀ · diag(g)`.

| | |
|---|---|
| base model | `{base}` |
| method | `{cfg.method}` |
| target bpw | {cfg.bpw}{" (whole model)" if report.whole_model else ""} |
| true bpw (converted layers) | {report.bpw_true:.4f} |
| whole model, bits per parameter | {report.bpw_whole_model:.3f} ({scope}) |
| residual path | {cfg.residual} |
| converted layers | {len(report.layers)} |
| model size | {report.model_bytes / 2**20:.1f} MiB (dense fp16: {report.model_bytes_fp16 / 2**20:.1f} MiB) |

## Usage

The plugin must be imported before loading; without it Transformers only warns and loads random weights.

```python
import hf_littlebit  # registers quant_method="littlebit"
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this repo>")
# or, failing loudly if anything is off:
model = hf_littlebit.from_pretrained("<this repo>")
```
"""
    return "\n".join(meta) + "\n" + body


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, card: bool = True, **kwargs: Any) -> Path:
    """Atomic ``model.save_pretrained``: write to a temp sibling, then replace ``save_directory``.

    Adds ``README.md`` (the model card) unless ``card=False``. Returns the final path.
    """
    if not littlebit_layers(model):
        raise NotALittleBitModelError("save_pretrained: the model contains no LittleBit layers")
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, **kwargs)
        if card:
            (tmp / "README.md").write_text(model_card(model), encoding="utf-8")
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload LittleBit-quantized model",
    tokenizer: Any = None,
    **save_kwargs: Any,
) -> Any:
    """Save the packed model (plus tokenizer and model card) and upload the folder in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


def read_quantization_config(path: str | os.PathLike) -> dict:
    """The ``quantization_config`` of a saved folder, or an error saying why it is not a littlebit folder."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise NotALittleBitModelError(f"{path}: no config.json, not a saved model folder")
    qcfg = json.loads(cfg_path.read_text(encoding="utf-8")).get("quantization_config")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        raise NotALittleBitModelError(f"{path}: not a littlebit checkpoint (no littlebit quantization_config)")
    return qcfg
