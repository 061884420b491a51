"""Calibration recipes by time budget: what ``littlebit quantize --budget-minutes M`` (or ``--recipe NAME``) runs.

Each recipe is a set of :class:`~hf_littlebit.LittleBitConfig` fields whose result and wall time were measured on the
bundled SmolLM2-135M on 2 CPU cores (BENCHMARKS.md). A budget picks the longest recipe whose time, scaled by the
model's parameter count (the time of every phase grows about linearly with it) and by the rate above the one it was
measured at (:meth:`Recipe.minutes_for`), fits — longer recipes use more data and steps. ``demo``, ``long`` and
``max`` were measured at 0.55 bpw (351, 180 and 153), ``standard`` and ``max-1bit`` at 1.0 bpw (147 and 101;
``long`` there: 106; :attr:`Recipe.bpw`). ``max-1bit`` is what fits 90 minutes at 1.0 bpw, where ``max`` would take
about twice that. Explicit command-line flags override single fields of the chosen recipe
(and are not counted in its time). Without a budget the command runs :data:`DEFAULT_RECIPE`, the one the README's main
job uses (~10 minutes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_PARAMS = 134_515_008  # SmolLM2-135M, where the minutes below were measured


@dataclass(frozen=True)
class Recipe:
    """One measured calibration recipe."""

    name: str
    minutes: float  # quantization wall time on SmolLM2-135M, 2 CPU cores, nothing else running
    fields: dict[str, Any] = field(default_factory=dict)  # LittleBitConfig fields
    measured: str = ""  # what it gave, for --help and the log
    bpw: float = 0.55  # the rate ``minutes`` was measured at

    def minutes_for(self, params: int, bpw: float | None = None) -> float:
        """Expected wall time for a model of ``params`` parameters at ``bpw``: linear in the parameter count, and
        linear in the rate above the measured one (the factors' rank, hence every step's cost, grows with it: the
        previous ``max`` recipe's blocks, 2048 × 256 tokens, took ~2× as long at 1.0 bpw as at 0.55, ``long``'s 1.6×).
        Below the measured rate the measured time is kept — an upper bound, as the parts that do not shrink with the
        rank (attention, the LM head) remain."""
        rate = 1.0 if bpw is None else max(1.0, bpw / self.bpw)
        return self.minutes * params / REFERENCE_PARAMS * rate


RECIPES: tuple[Recipe, ...] = (
    Recipe("demo", 10.0, {
        "method": "lbadmm", "dbf_iterations": 30, "calibration_samples": 128, "calibration_seqlen": 256,
        "calibration_batch_size": 4, "calibration_steps": 50, "calibration_lr": 3e-2, "calibration_scale_lr": 3e-2,
        "calibration_mitigation_steps": 4, "calibration_e2e_steps": 70,
    }, "perplexity 351 at 0.55 bpw (fp 20.4)"),
    Recipe("standard", 21.0, {
        "method": "lbadmm", "dbf_iterations": 30, "calibration_samples": 128, "calibration_seqlen": 256,
        "calibration_batch_size": 4, "calibration_steps": 100, "calibration_lr": 3e-2, "calibration_scale_lr": 3e-2,
        "calibration_mitigation_steps": 4, "calibration_e2e_steps": 30,
    }, "perplexity 147 at 1.0 bpw (fp 20.4; HQQ 3-bit 157)", bpw=1.0),
    Recipe("long", 35.0, {
        "method": "lbadmm", "dbf_iterations": 30, "calibration_samples": 512, "calibration_seqlen": 256,
        "calibration_batch_size": 4, "calibration_steps": 150, "calibration_lr": 3e-2, "calibration_scale_lr": 3e-2,
        "calibration_mitigation_steps": 16, "calibration_e2e_steps": 400,
    }, "perplexity 180 at 0.55 bpw (fp 20.4)"),
    Recipe("max", 90.0, {  # sequences as long as half the evaluation window: the long-context gain is kept
        "method": "lbadmm", "dbf_iterations": 30, "calibration_samples": 512, "calibration_seqlen": 1024,
        "calibration_batch_size": 1, "calibration_steps": 200, "calibration_lr": 3e-2, "calibration_scale_lr": 3e-2,
        "calibration_mitigation_steps": 16, "calibration_e2e_steps": 800,
    }, "perplexity 153 at 0.55 bpw (fp 20.4)"),
    Recipe("max-1bit", 73.0, {  # max's long sequences, long's steps: what 90 minutes hold at 1.0 bpw
        "method": "lbadmm", "dbf_iterations": 30, "calibration_samples": 256, "calibration_seqlen": 1024,
        "calibration_batch_size": 1, "calibration_steps": 150, "calibration_lr": 3e-2, "calibration_scale_lr": 3e-2,
        "calibration_mitigation_steps": 16, "calibration_e2e_steps": 400,
    }, "perplexity 101 at 1.0 bpw (fp 20.4)", bpw=1.0),
)
DEFAULT_RECIPE = "demo"


def recipe_named(name: str) -> Recipe:
    for recipe in RECIPES:
        if recipe.name == name:
            return recipe
    raise ValueError(f"unknown recipe {name!r}; choose one of {[r.name for r in RECIPES]}")


def recipe_for_budget(minutes: float, params: int, bpw: float | None = None) -> Recipe:
    """The longest recipe whose measured time, scaled to ``params`` parameters and the rate ``bpw``
    (:meth:`Recipe.minutes_for`), fits in ``minutes``."""
    fitting = [r for r in RECIPES if r.minutes_for(params, bpw) <= minutes]
    if not fitting:
        shortest = min(RECIPES, key=lambda r: r.minutes_for(params, bpw))
        raise ValueError(
            f"--budget-minutes {minutes:g} is below the shortest recipe ({shortest.name!r}: about "
            f"{shortest.minutes_for(params, bpw):.0f} minutes for this model on 2 CPU cores); raise the budget, pick "
            "--recipe and lower --steps yourself, or quantize data-free with --no-calibrate"
        )
    return max(fitting, key=lambda r: r.minutes)


def count_parameters(model_dir: str) -> int | None:
    """Parameters stored in a local folder's safetensors files (headers only); ``None`` when it cannot tell."""
    files = list(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration protocol
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total
