"""``LittleBitConfig``: what the user asks for, and what a saved model needs to rebuild its shapes."""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .format.budget import is_valid_bpw
from .nn.estimators import ESTIMATORS

QUANT_METHOD = "littlebit"
FORMAT_VERSION = 1

# Methods whose factoriser exists; the others are reserved names that a later release fills in.
AVAILABLE_METHODS = ("littlebit", "littlebit2", "dbf", "lbadmm")
# Methods whose signs come out of an ADMM solve: one path by default, activation-aware, ``dbf_iterations`` iterations.
ADMM_METHODS = ("dbf", "lbadmm")
PLANNED_METHODS: tuple[str, ...] = ()

ALLOCATIONS = ("uniform", "auto")
CALIBRATION_LOSSES = ("token_normalized", "mse")
CALIBRATION_TARGETS = ("quantized_inputs", "fp_inputs")

# Names of the forward backends (hf_littlebit.backends.dispatch.BACKENDS plus "auto"; a test keeps the two equal).
# Spelled out here so that the config, a plain description of what the user asks for, imports no backend.
BACKEND_CHOICES = ("auto", "torch", "triton", "cpu")

EMBEDDING_BITS = tuple(range(2, 9))  # widths of the group-quantized embedding (hf_littlebit.format.group_quant)

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DENSE_SAVE_DTYPES = SCALE_DTYPES  # the same three widths for the dense remainder of a checkpoint

# The paper's `kv_factor` acts on modules whose name ends in k_proj / v_proj.
KV_PATTERN = r"\.(k_proj|v_proj)$"


def _is_int(value: object) -> bool:
    """A real integer (``bool`` is an ``int`` subclass but not a valid count or seed)."""
    return isinstance(value, int) and not isinstance(value, bool)


class LittleBitConfig(QuantizationConfigMixin):
    """Configuration of the LittleBit quantizer (``quant_method="littlebit"``).

    Args:
        bpw: target bits per weight of every converted ``nn.Linear`` (0 < bpw ≤ 16). The rank of each layer follows
            from it by the paper's rule; the true stored bits are reported by :func:`hf_littlebit.summary`. With
            ``whole_model=True``: bits per parameter of the whole model (see there).
        method: how the binary factors are found: ``"littlebit"`` (Dual-SVID), ``"littlebit2"`` (Internal Latent
            Rotation with Joint-ITQ, then Dual-SVID), ``"dbf"`` (Double Binary Factorization: signs optimised
            by alternating ADMM; DBF's rank rule, see :func:`hf_littlebit.format.budget.dbf_rank`) or ``"lbadmm"``
            (NanoQuant's latent-binary ADMM: both factors under a rising penalty, latents seeded from the continuous
            ADMM variables; :mod:`hf_littlebit.factorize.lbadmm`). Same stored format.
        residual: add a second binary path fitted to the first path's error (the budget is split between both).
            ``None`` (default): the method's own choice, on for ``"littlebit"``/``"littlebit2"``, off for the ADMM
            methods ``"dbf"`` and ``"lbadmm"``.
        modules_to_not_convert: module names or patterns kept in full precision. ``None`` keeps the LM head and tied
            weights; the resolved list is written back on load so a saved model does not depend on heuristics.
            Norms are never converted; embeddings only with ``whole_model=True`` (which also converts the head).
        allocation: ``"uniform"`` (every layer gets the rank its shape allows at ``bpw``) or ``"auto"`` (one budget
            of ``bpw`` true bits per weight for the whole model, ranks granted greedily to the layers whose spectra
            lose the most per bit; :mod:`hf_littlebit.quantize.allocate`). The chosen ranks are saved like any others.
        bpw_multipliers: ``{regex: factor}`` multiplying the float rank of matching module names before rounding.
        kv_factor: the paper's K/V knob, shorthand for ``bpw_multipliers={r"\\.(k_proj|v_proj)$": kv_factor}``.
        min_rank: floor of the rank (layers too small for the target get this rank and a warning).
        seed: seed of every random choice (per layer it is mixed with the layer name).
        itq_iterations: Joint-ITQ iterations of ``"littlebit2"`` (default 50; most of the gain comes in the first 10).
        dbf_iterations: outer alternations of ``"dbf"`` (default 100; the authors use 260, little changes after 100),
            and the iterations of ``"lbadmm"`` (one ADMM step per factor each; NanoQuant uses 400).
        activation_aware: weight each layer's factorisation by the mean squared input activation of its channels,
            measured on the calibration data (needs ``calibration``); the fit then minimises the layer's output error
            instead of its weight error. ``None`` (default): on for ``"dbf"`` and ``"lbadmm"`` (their published
            recipes), off otherwise. Without data ``"lbadmm"`` runs unweighted (D = 1), a weaker fit.
        scale_dtype: storage dtype of the scale vectors h, l, g: ``"float16"`` (default), ``"bfloat16"``,
            ``"float32"``.
        calibration: calibration data for block-wise reconstruction (:mod:`hf_littlebit.quantize.reconstruct`):
            ``"default"`` (the project's training split of the bundled corpora), a string, a list of strings, a
            ``datasets.Dataset`` with a ``text`` column, or token ids. ``None`` (default) quantizes data-free. Only
            ``"default"`` is written to ``config.json``; other data is recorded by description in
            ``calibrated_with``.
        calibration_samples: number of calibration sequences. The latent factors of a block have millions of
            entries: with 32 sequences of 256 tokens a block fits its calibration data twice as well as held-out
            data; 128 sequences close most of that gap (SmolLM2, BENCHMARKS.md).
        calibration_seqlen: tokens per calibration sequence (capped by the model's context).
        calibration_steps: optimiser steps per transformer block (one minibatch each).
        calibration_batch_size: sequences per minibatch.
        calibration_lr: Adam learning rate of the latent factors, relative to each tensor's RMS.
        calibration_scale_lr: the same for the scale vectors h, l, g.
        calibration_tune_norms: also fit the block's normalisation weights.
        calibration_loss: ``"token_normalized"`` (mean over tokens of ‖y − t‖² / ‖t‖², robust to the few huge
            activations of LLM residual streams) or ``"mse"``.
        calibration_fisher: measure, once on the fp model, the mean squared gradient of the next-token loss with
            respect to every output channel of every converted Linear and of every block (an empirical Fisher
            diagonal; tokens clipped at the 99.9th percentile of their gradient norm, then shrunk toward the mean),
            and use it twice: each factorisation is preconditioned on its output side too (``diag(√h_out) W``, next
            to the input second moments when ``activation_aware``), and the block loss weights its channels by the
            block's statistic (``Σ_c w_c (y − t)_c² / Σ_c w_c t_c²`` per token). One extra forward and backward pass
            of the fp model over the calibration set.
        calibration_fisher_shrinkage: γ of that shrinkage, ``h ← (1 − γ) h + γ mean(h)`` (0.4).
        calibration_mitigation_steps: error-propagation mitigation (NanoQuant): the Linears of a block are then
            factorised one at a time, and before each one the block's still-dense Linear weights get this many Adam
            steps on the block loss, so each layer is factorised from a weight that already absorbs the error of
            the quantized prefix and of the block's earlier layers (0, default: off; all layers of a block are
            factorised at once from their original weights). Costs ``steps × layers per block`` extra block passes.
        calibration_mitigation_lr: Adam learning rate of those steps, relative to each weight's RMS.
        calibration_targets: what each block is fitted to: the fp model's activations after that block
            (``"fp_inputs"``, default: the block also learns to undo the error accumulated before it) or the fp
            block's outputs on the quantized prefix's outputs (``"quantized_inputs"``). On SmolLM2 at 1.0 bpw the
            first gives perplexity 1.4e4, the second 5.2e6: without the fp model's activations as anchor, the
            massive activation that block 11 creates at the first token is lost and every later block is fitted
            to a broken residual stream.
        calibration_e2e_steps: optimiser steps of an end-to-end phase after the block-wise pass (0 skips it): the
            scale vectors of every layer (and, with ``calibration_tune_norms``, the norms) are tuned jointly so the
            quantized model's next-token distribution matches the fp model's on the calibration sequences (KL). Block
            fits each see only their own output; this phase repairs the error that compounds across blocks.
            Each step is a forward and backward pass of the whole model on one calibration batch, and the phase
            holds every layer in trainable mode (fp32 latent factors, 32× their packed size, plus their ±1 signs
            cached in the compute dtype since they stay fixed unless ``calibration_e2e_latents``).
        calibration_e2e_lr: Adam learning rate of that phase, relative to each tensor's RMS.
        calibration_e2e_latents: also tune the layers' latent factors in that phase (their signs may flip, the
            gradient through ``sign_estimator``), at ``calibration_lr`` as in the block fits. Off by default and in
            every recipe: at their rates almost no sign crosses zero (the latents restart at ±0.5 from the packed
            signs), while each step costs ~1.3× and the latents' Adam state (BENCHMARKS.md).
        calibration_offload_gib: a block's calibration activations larger than this are kept on disk (in the work
            folder, else a temporary folder) instead of in memory.
        sign_estimator: gradient of the sign during calibration and training: ``"ste"`` (clipped identity) or
            ``"smoothsign"`` (derivative of tanh(α x), LittleBit's QAT choice).
        smoothsign_alpha: α of SmoothSign (100 in the paper, for balanced-split latents).
        trainable: keep the layers in trainable mode after loading/quantizing (fp32 latent factors and scales, signs
            through ``sign_estimator``) for quantization-aware training with ``Trainer``. Saving packs the signs
            (the saved folder is the usual packed format), so this is never written to ``config.json``. With a
            packed checkpoint, ``from_pretrained(path, quantization_config=LittleBitConfig(trainable=True))`` turns
            it back into trainable mode (this and the two sign-estimator fields are *loading attributes*).
        backend: forward implementation of the packed layers: ``"auto"`` (default: the Triton kernels for CUDA
            tensors when Triton is installed; on CPU the packed C++ kernel, built once on first use, else plain
            PyTorch), ``"cpu"``, ``"triton"`` or ``"torch"`` (plain PyTorch; on CPU it caches two fp32 factors per
            layer, 32·bpw bits per weight: opt in only to trade memory for it). The environment variable
            ``LITTLEBIT_BACKEND`` overrides it for a whole process; ``hf_littlebit.set_backend(model, ...)`` changes
            it after loading. A loading attribute: never written to ``config.json``.
        whole_model: also convert the input embedding and the LM head (:mod:`hf_littlebit.quantize.whole_model`),
            so that ``bpw`` budgets *every* parameter of the model: the true bits of the packed layers, embedding and
            head plus the norms, biases and anything else left dense, counted at the width they are stored in. The
            embedding becomes a :class:`~hf_littlebit.nn.embedding.LittleBitEmbedding` (rows looked up from the
            packed factors); a head tied to it reuses its packed tensors (stored once), an untied head becomes an
            ordinary packed linear layer. With ``allocation="uniform"`` every converted matrix, embedding included,
            gets the same per-weight rate (the largest one whose total fits the budget); with ``"auto"`` the
            allocator spends the budget across linears, embedding and head. With calibration, the embedding and
            the head are factorised data-free after the block-wise pass (which sees the fp embedding); the
            end-to-end phase then tunes their scales too, its teacher's logits still from the fp head.
        embedding_bits: with ``whole_model``, store the embedding in a few-bit group format instead of binary
            low-rank (:class:`~hf_littlebit.nn.group_embedding.GroupQuantEmbedding`): ``bits`` (2–8) per entry, an fp16
            scale and zero per group of ``embedding_group_size`` consecutive entries of a row (a tied head reads
            the same tensors). Its true bits are charged to the budget first; the rest goes to the other matrices.
            Its codes stay fixed; the calibration's end-to-end phase and QAT's trainable mode tune its scales and
            zeros. ``None`` (default): binary low-rank. Much lower error on real embeddings at a few bits
            (BENCHMARKS.md, issue 22).
        embedding_group_size: entries per group of ``embedding_bits`` (default 64); need not divide the hidden size
            (the last group of a row is then shorter).
        dense_save_dtype: dtype in which saving writes the *dense remainder* — every tensor outside the packed
            layers: the embedding and LM head unless ``whole_model``, norms, biases and layers left unconverted
            (``"float16"``, ``"bfloat16"``, ``"float32"``). ``None`` (default) writes them as the model holds them, so
            a model quantized in fp32 saves a 32-bit embedding. The model in memory is not changed; a reload in a
            wider dtype upcasts (``littlebit quantize`` sets ``"bfloat16"`` and rounds the model first, so what it
            measures is what it saved). The packed tensors keep their own format.
        layer_ranks: filled by the quantizer: the rank of every converted layer, so a saved model rebuilds its
            shapes on load without re-deriving them.
        tied_heads: filled by the quantizer with ``whole_model``: ``{head module: embedding module}`` for an LM head
            that reuses the packed embedding's tensors (a tied model), so a reload rebuilds the tie.
        group_embedding: filled by the quantizer with ``embedding_bits``: the name of the group-quantized embedding,
            so a reload rebuilds it (it has no rank, so it is not in ``layer_ranks``).
    """

    def __init__(
        self,
        bpw: float = 1.0,
        method: str = "littlebit",
        residual: bool | None = None,
        modules_to_not_convert: list[str] | None = None,
        allocation: str = "uniform",
        bpw_multipliers: dict[str, float] | None = None,
        kv_factor: float = 1.0,
        min_rank: int = 8,
        seed: int = 0,
        itq_iterations: int = 50,
        dbf_iterations: int = 100,
        activation_aware: bool | None = None,
        scale_dtype: str = "float16",
        calibration: Any = None,
        calibration_samples: int = 128,
        calibration_seqlen: int = 256,
        calibration_steps: int = 100,
        calibration_batch_size: int = 4,
        calibration_lr: float = 1e-2,
        calibration_scale_lr: float = 1e-2,
        calibration_tune_norms: bool = False,
        calibration_loss: str = "token_normalized",
        calibration_fisher: bool = False,
        calibration_fisher_shrinkage: float = 0.4,
        calibration_mitigation_steps: int = 0,
        calibration_mitigation_lr: float = 1e-2,
        calibration_targets: str = "fp_inputs",
        calibration_e2e_steps: int = 0,
        calibration_e2e_lr: float = 1e-2,
        calibration_e2e_latents: bool = False,
        calibration_offload_gib: float = 4.0,
        sign_estimator: str = "ste",
        smoothsign_alpha: float = 100.0,
        trainable: bool = False,
        backend: str = "auto",
        whole_model: bool = False,
        embedding_bits: int | None = None,
        embedding_group_size: int = 64,
        dense_save_dtype: str | None = None,
        layer_ranks: dict[str, int] | None = None,
        tied_heads: dict[str, str] | None = None,
        group_embedding: str | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.bpw = bpw
        self.method = method
        self.residual = residual
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.allocation = allocation
        self.bpw_multipliers = dict(bpw_multipliers or {})
        self.kv_factor = kv_factor
        self.min_rank = min_rank
        self.seed = seed
        self.itq_iterations = itq_iterations
        self.dbf_iterations = dbf_iterations
        self.activation_aware = activation_aware
        self.scale_dtype = str(scale_dtype).removeprefix("torch.")
        self.calibration = calibration
        self.calibration_samples = calibration_samples
        self.calibration_seqlen = calibration_seqlen
        self.calibration_steps = calibration_steps
        self.calibration_batch_size = calibration_batch_size
        self.calibration_lr = calibration_lr
        self.calibration_scale_lr = calibration_scale_lr
        self.calibration_tune_norms = calibration_tune_norms
        self.calibration_loss = calibration_loss
        self.calibration_fisher = calibration_fisher
        self.calibration_fisher_shrinkage = calibration_fisher_shrinkage
        self.calibration_mitigation_steps = calibration_mitigation_steps
        self.calibration_mitigation_lr = calibration_mitigation_lr
        self.calibration_targets = calibration_targets
        self.calibration_e2e_steps = calibration_e2e_steps
        self.calibration_e2e_lr = calibration_e2e_lr
        self.calibration_e2e_latents = calibration_e2e_latents
        self.calibration_offload_gib = calibration_offload_gib
        self.sign_estimator = sign_estimator
        self.smoothsign_alpha = smoothsign_alpha
        self.trainable = trainable
        self.backend = backend
        self.whole_model = whole_model
        self.embedding_bits = embedding_bits
        self.embedding_group_size = embedding_group_size
        self.group_embedding = group_embedding
        self.dense_save_dtype = str(dense_save_dtype).removeprefix("torch.") if dense_save_dtype is not None else None
        self.layer_ranks = dict(layer_ranks or {})
        self.tied_heads = dict(tied_heads or {})
        self.format_version = format_version
        # Keep unknown keys (written by a newer release) so that a round trip does not drop them.
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; errors name the field and the accepted values."""
        if not is_valid_bpw(self.bpw):
            raise ValueError(f"LittleBitConfig: bpw must be a number with 0 < bpw <= 16, got {self.bpw!r}")
        self.bpw = float(self.bpw)
        if self.method in PLANNED_METHODS:
            raise NotImplementedError(
                f"LittleBitConfig: method {self.method!r} is planned but not available in this release; "
                f"use one of {list(AVAILABLE_METHODS)}"
            )
        if self.method not in AVAILABLE_METHODS:
            raise ValueError(
                f"LittleBitConfig: unknown method {self.method!r}; choose one of {list(AVAILABLE_METHODS)}"
            )
        if self.residual is None:
            self.residual = self.method not in ADMM_METHODS
        if self.activation_aware is None:
            self.activation_aware = self.method in ADMM_METHODS
        if not isinstance(self.activation_aware, bool):
            raise ValueError(f"LittleBitConfig: activation_aware must be True, False or None, got "
                             f"{self.activation_aware!r}")
        if not _is_int(self.dbf_iterations) or self.dbf_iterations < 1:
            raise ValueError(f"LittleBitConfig: dbf_iterations must be a positive integer, got {self.dbf_iterations!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"LittleBitConfig: allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "auto" and (self.bpw_multipliers or self.kv_factor != 1.0) and not self.layer_ranks:
            raise ValueError("LittleBitConfig: allocation='auto' chooses every layer's rank itself; drop "
                             "bpw_multipliers / kv_factor, or use allocation='uniform' to keep them")
        if not isinstance(self.residual, bool):
            raise ValueError(f"LittleBitConfig: residual must be True or False, got {self.residual!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"LittleBitConfig: scale_dtype must be one of {list(SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )
        if self.dense_save_dtype is not None and self.dense_save_dtype not in DENSE_SAVE_DTYPES:
            raise ValueError(f"LittleBitConfig: dense_save_dtype must be None or one of {list(DENSE_SAVE_DTYPES)}, "
                             f"got {self.dense_save_dtype!r}")
        if not _is_int(self.min_rank) or self.min_rank < 1:
            raise ValueError(f"LittleBitConfig: min_rank must be a positive integer, got {self.min_rank!r}")
        if not _is_int(self.itq_iterations) or self.itq_iterations < 0:
            raise ValueError(
                f"LittleBitConfig: itq_iterations must be a non-negative integer, got {self.itq_iterations!r}"
            )
        if not _is_int(self.seed):
            raise ValueError(f"LittleBitConfig: seed must be an integer, got {self.seed!r}")
        for pattern, factor in {**self.bpw_multipliers, "kv_factor": self.kv_factor}.items():
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
                raise ValueError(
                    f"LittleBitConfig: multiplier for {pattern!r} must be a positive number, got {factor!r}"
                )
        for pattern in self.bpw_multipliers:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"LittleBitConfig: bpw_multipliers pattern {pattern!r} is not a valid regex: {exc}"
                ) from exc
        for name in ("calibration_samples", "calibration_seqlen", "calibration_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"LittleBitConfig: {name} must be a positive integer, got {value!r}")
        for name in ("calibration_steps", "calibration_e2e_steps", "calibration_mitigation_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"LittleBitConfig: {name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.calibration_offload_gib, (int, float)) or self.calibration_offload_gib < 0:
            raise ValueError(
                f"LittleBitConfig: calibration_offload_gib must be a number ≥ 0, got {self.calibration_offload_gib!r}"
            )
        for name in ("calibration_lr", "calibration_scale_lr", "calibration_e2e_lr", "calibration_mitigation_lr",
                     "smoothsign_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"LittleBitConfig: {name} must be a positive number, got {value!r}")
        for name in ("calibration_tune_norms", "calibration_e2e_latents", "calibration_fisher"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LittleBitConfig: {name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.calibration_fisher_shrinkage, int | float) or isinstance(
                self.calibration_fisher_shrinkage, bool) or not 0 <= self.calibration_fisher_shrinkage <= 1:
            raise ValueError("LittleBitConfig: calibration_fisher_shrinkage must be a number in [0, 1], got "
                             f"{self.calibration_fisher_shrinkage!r}")
        if self.calibration_loss not in CALIBRATION_LOSSES:
            raise ValueError(
                f"LittleBitConfig: calibration_loss must be one of {list(CALIBRATION_LOSSES)}, "
                f"got {self.calibration_loss!r}"
            )
        if self.calibration_targets not in CALIBRATION_TARGETS:
            raise ValueError(
                f"LittleBitConfig: calibration_targets must be one of {list(CALIBRATION_TARGETS)}, "
                f"got {self.calibration_targets!r}"
            )
        if self.sign_estimator not in ESTIMATORS:
            raise ValueError(
                f"LittleBitConfig: sign_estimator must be one of {list(ESTIMATORS)}, got {self.sign_estimator!r}"
            )
        if not isinstance(self.trainable, bool):
            raise ValueError(f"LittleBitConfig: trainable must be True or False, got {self.trainable!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"LittleBitConfig: backend must be one of {list(BACKEND_CHOICES)}, got {self.backend!r}")
        if not isinstance(self.whole_model, bool):
            raise ValueError(f"LittleBitConfig: whole_model must be True or False, got {self.whole_model!r}")
        if self.tied_heads and not self.whole_model:
            raise ValueError("LittleBitConfig: tied_heads is only written with whole_model=True")
        if self.embedding_bits is not None and (not _is_int(self.embedding_bits)
                                                or self.embedding_bits not in EMBEDDING_BITS):
            raise ValueError(f"LittleBitConfig: embedding_bits must be None (binary low-rank embedding) or one of "
                             f"{list(EMBEDDING_BITS)}, got {self.embedding_bits!r}")
        if self.embedding_bits is not None and not self.whole_model:
            raise ValueError("LittleBitConfig: embedding_bits sets the format of the embedding that whole_model=True "
                             "converts; set whole_model=True too (without it the embedding stays dense)")
        if not _is_int(self.embedding_group_size) or self.embedding_group_size < 1:
            raise ValueError("LittleBitConfig: embedding_group_size must be a positive integer (entries per group, "
                             f"e.g. 64 or 128), got {self.embedding_group_size!r}")
        if self.group_embedding is not None and (self.embedding_bits is None or not isinstance(self.group_embedding,
                                                                                              str)):
            raise ValueError("LittleBitConfig: group_embedding (filled by the quantizer) names a module and needs "
                             f"embedding_bits, got {self.group_embedding!r} with embedding_bits={self.embedding_bits}")
        for head, embedding in self.tied_heads.items():
            if not isinstance(head, str) or not isinstance(embedding, str) or (
                    embedding not in self.layer_ranks and embedding != self.group_embedding):
                raise ValueError(f"LittleBitConfig: tied_heads[{head!r}] must name a converted embedding of "
                                 f"layer_ranks (or group_embedding), got {embedding!r}")
        for name, rank in self.layer_ranks.items():
            if not _is_int(rank) or rank < 1:
                raise ValueError(f"LittleBitConfig: layer_ranks[{name!r}] must be a positive integer, got {rank!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; calibration data other than ``"default"`` is never written (only its description)."""
        runtime_only = ("calibration", "trainable", "backend")
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in runtime_only}
        out["calibration"] = "default" if isinstance(self.calibration, str) and self.calibration == "default" else None
        return out

    def get_loading_attributes(self) -> dict[str, Any]:
        """Fields a user may set when loading a packed checkpoint (merged into the checkpoint's config)."""
        return {"trainable": self.trainable, "sign_estimator": self.sign_estimator,
                "smoothsign_alpha": self.smoothsign_alpha, "backend": self.backend}

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def factorizer_options(self) -> dict:
        """Method-specific keyword arguments for the factoriser."""
        if self.method == "littlebit2":
            return {"n_iter": self.itq_iterations}
        if self.method in ADMM_METHODS:
            return {"n_iter": self.dbf_iterations}
        return {}

    def rank_factor(self, module_name: str) -> float:
        """Product of every multiplier whose pattern matches ``module_name`` (``re.search``)."""
        factor = 1.0
        if self.kv_factor != 1.0 and re.search(KV_PATTERN, module_name):
            factor *= self.kv_factor
        for pattern, mult in self.bpw_multipliers.items():
            if re.search(pattern, module_name):
                factor *= mult
        return factor
