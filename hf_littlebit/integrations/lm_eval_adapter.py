"""Thin bridge to the EleutherAI evaluation harness (``pip install lm-eval``).

The harness loads models with ``AutoModelForCausalLM.from_pretrained``, which handles a littlebit folder only when
this plugin has been imported in the same process. Two ways to make sure it is:

* command line: ``python -m hf_littlebit.integrations.lm_eval_adapter --model hf --model_args pretrained=DIR
  --tasks piqa`` (any ``lm_eval`` argument works; this only registers the plugin and hands over to the harness's
  own CLI);
* Python: ``lm_eval.simple_evaluate(model=hf_littlebit.integrations.lm_eval_adapter.hflm("DIR"), tasks=[...])``.
"""

from __future__ import annotations

from typing import Any


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("the lm-eval adapter needs the harness: `pip install lm-eval`") from None


def hflm(model_or_path: Any, tokenizer: Any = None, **kwargs: Any):
    """An ``lm_eval`` ``HFLM`` wrapping a littlebit model (a loaded model, or a folder / Hub id to load)."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from .hub import from_pretrained

    model = from_pretrained(model_or_path) if isinstance(model_or_path, (str, bytes)) or hasattr(
        model_or_path, "__fspath__") else model_or_path
    if tokenizer is None and not hasattr(model_or_path, "config"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_or_path)
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)


def main() -> None:
    _require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    import hf_littlebit  # noqa: F401 - registers quant_method="littlebit" before the harness loads the model

    cli_evaluate()


if __name__ == "__main__":
    main()
