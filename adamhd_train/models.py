"""GPT-3 model family (Brown et al. 2020, Table 2.1) and tiny CPU sizes, built from config with transformers (no weight download).

The GPT-3 paper alternated dense and locally banded sparse attention; a dense GPT-2 block (pre-LayerNorm,
GELU MLP of width 4·d_model, learned position embeddings) is the usual stand-in and is what is built here.

    >>> from adamhd_train.models import build_model, count_parameters, model_spec
    >>> model_spec("gpt3-xl").batch_tokens, model_spec("gpt3-xl").lr
    (1048576, 0.0002)
    >>> count_parameters("gpt3-175b")            # analytic, nothing allocated
    174604259328
    >>> model = build_model("tiny", vocab_size=8192, seed=0)   # a materialised ~1.9M-parameter model

Parameter count of this block layout (vocabulary V, context T, L layers of width d, biases and LayerNorms included):

    N = V·d (token embedding, tied with the LM head) + T·d (positions) + L·(12·d² + 13·d) + 2·d (final LayerNorm)

plus V·d for an untied LM head. For V = 50257, T = 2048 this is within 2% of every size in the GPT-3 table.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = [
    "ModelSpec",
    "MODEL_SPECS",
    "MODEL_NAMES",
    "GPT3_VOCAB_SIZE",
    "model_spec",
    "build_model",
    "gpt2_config",
    "count_parameters",
    "flops_per_token",
    "resolve_dtype",
]

GPT3_VOCAB_SIZE = 50257
"""GPT-2/GPT-3 BPE vocabulary: the vocabulary behind the nominal parameter counts of the GPT-3 table."""


@dataclass(frozen=True)
class ModelSpec:
    """One model size. Validated on construction; ``d_model`` must split evenly into ``n_head`` heads."""

    name: str
    """Name used on the command line (``gpt3-small``, ``tiny``, ...)."""
    n_layer: int
    """Number of transformer blocks."""
    d_model: int
    """Residual stream width; the MLP is 4·d_model wide."""
    n_head: int
    """Attention heads; head width is d_model / n_head."""
    context: int
    """Default sequence length (tokens) and size of the learned position table."""
    batch_tokens: int
    """Default global batch in tokens per optimizer step (GPT-3: sequences × 2048)."""
    lr: float
    """Default peak learning rate."""
    nominal_params: Optional[int] = None
    """Parameter count as printed in the GPT-3 table (None for the CPU sizes, which have no published figure)."""

    def __post_init__(self):
        for field in ("n_layer", "d_model", "n_head", "context", "batch_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelSpec {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"ModelSpec {self.name!r}: d_model ({self.d_model}) must be divisible by n_head "
                             f"({self.n_head})")
        if self.batch_tokens % self.context:
            raise ValueError(f"ModelSpec {self.name!r}: batch_tokens ({self.batch_tokens}) must be a multiple of "
                             f"context ({self.context})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"ModelSpec {self.name!r}: lr must be a positive finite number, got {self.lr!r}")

    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head


def _gpt3(name, n_layer, d_model, n_head, batch_seqs, lr, nominal):
    # GPT-3's batch sizes (0.5M ... 3.2M tokens) are whole numbers of 2048-token sequences: 256 ... 1536.
    return ModelSpec(name, n_layer, d_model, n_head, 2048, batch_seqs * 2048, lr, nominal)


MODEL_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _gpt3("gpt3-small", 12, 768, 12, 256, 6.0e-4, 125_000_000),
        _gpt3("gpt3-medium", 24, 1024, 16, 256, 3.0e-4, 350_000_000),
        _gpt3("gpt3-large", 24, 1536, 16, 256, 2.5e-4, 760_000_000),
        # Table 2.1 lists 24 heads of width 128 for XL, which does not multiply to d_model = 2048: the head
        # width is kept (16 × 128, as GPT-Neo 1.3B does). Head count changes neither parameters nor FLOPs.
        _gpt3("gpt3-xl", 24, 2048, 16, 512, 2.0e-4, 1_300_000_000),
        _gpt3("gpt3-2.7b", 32, 2560, 32, 512, 1.6e-4, 2_700_000_000),
        _gpt3("gpt3-6.7b", 32, 4096, 32, 1024, 1.2e-4, 6_700_000_000),
        _gpt3("gpt3-13b", 40, 5120, 40, 1024, 1.0e-4, 13_000_000_000),
        _gpt3("gpt3-175b", 96, 12288, 96, 1536, 0.6e-4, 175_000_000_000),
        # CPU sizes: a few seconds per step on two cores, for tests, the demo and smoke runs of the launcher.
        ModelSpec("nano", 2, 64, 4, 64, 8 * 64, 3e-3),
        ModelSpec("tiny", 4, 128, 4, 256, 16 * 256, 2e-3),
        ModelSpec("mini", 6, 384, 6, 256, 64 * 256, 1e-3),
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


def model_spec(name: Union[str, ModelSpec]) -> ModelSpec:
    """The :class:`ModelSpec` for ``name`` (a spec passes through). Unknown name: ``ValueError`` listing the names."""
    if isinstance(name, ModelSpec):
        return name
    try:
        return MODEL_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r} (allowed: {', '.join(MODEL_NAMES)})") from None


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.float32`` / ``torch.bfloat16`` / ``torch.float16`` from a dtype or a name (fp32, bf16, fp16, ...)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r} (allowed: {', '.join(_DTYPES)}, or torch.float32/bfloat16/float16)")


def _check_positive_int(label: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return value


def count_parameters(
    name: Union[str, ModelSpec],
    vocab_size: int = GPT3_VOCAB_SIZE,
    *,
    context: Optional[int] = None,
    tie_embeddings: bool = True,
    non_embedding: bool = False,
) -> int:
    """Exact parameter count of :func:`build_model`'s model, computed from the shapes (nothing is allocated).

    ``V·d + T·d + L·(12·d² + 13·d) + 2·d`` (+ ``V·d`` for an untied LM head). With ``non_embedding=True`` the
    token and position embeddings are left out (Kaplan et al.'s N; an untied LM head still counts).
    """
    spec = model_spec(name)
    _check_positive_int("vocab_size", vocab_size)
    context = spec.context if context is None else _check_positive_int("context", context)
    d, L = spec.d_model, spec.n_layer
    blocks = L * (12 * d * d + 13 * d) + 2 * d
    embeddings = vocab_size * d + context * d
    head = 0 if tie_embeddings else vocab_size * d
    return blocks + head + (0 if non_embedding else embeddings)


def flops_per_token(
    name: Union[str, ModelSpec],
    vocab_size: int = GPT3_VOCAB_SIZE,
    *,
    context: Optional[int] = None,
) -> int:
    """Training FLOPs per token (forward + backward) for MFU logging, as in PaLM appendix B and nanoGPT:

        6·N + 12·L·d_model·T

    where N counts the weights that take part in a matmul (the blocks, their biases and norms included as in
    nanoGPT, and the LM head; not the position table, nor the input embedding lookup) and the second term is the
    attention score and value products over a context of T tokens. MFU = tokens/s × flops_per_token / peak FLOP/s
    of the hardware.
    """
    spec = model_spec(name)
    _check_positive_int("vocab_size", vocab_size)
    context = spec.context if context is None else _check_positive_int("context", context)
    matmul_params = count_parameters(spec, vocab_size, context=context, non_embedding=True) + vocab_size * spec.d_model
    return 6 * matmul_params + 12 * spec.n_layer * spec.d_model * context


def gpt2_config(
    name: Union[str, ModelSpec],
    *,
    vocab_size: int,
    context: Optional[int] = None,
    tie_embeddings: bool = True,
    dropout: float = 0.0,
):
    """The ``transformers.GPT2Config`` for a size (dense GPT-2 blocks, GELU, no KV cache, SDPA attention)."""
    # transformers is imported where a model is configured (seconds): checking options (model_spec,
    # count_parameters) does not pay for it
    from transformers import GPT2Config

    spec = model_spec(name)
    _check_positive_int("vocab_size", vocab_size)
    context = spec.context if context is None else _check_positive_int("context", context)
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=spec.d_model,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_inner=4 * spec.d_model,
        activation_function="gelu_new",
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=tie_embeddings,
        use_cache=False,
        attn_implementation="sdpa",
        # GPT2Config's default special ids (50256) only exist in the GPT-2 vocabulary.
        bos_token_id=50256 if vocab_size > 50256 else None,
        eos_token_id=50256 if vocab_size > 50256 else None,
    )


def build_model(
    name: Union[str, ModelSpec],
    *,
    vocab_size: int,
    context: Optional[int] = None,
    dtype: Union[str, torch.dtype] = torch.float32,
    activation_checkpointing: bool = False,
    seed: Optional[int] = None,
    tie_embeddings: bool = True,
    dropout: float = 0.0,
    device: Union[str, torch.device, None] = None,
):
    """A freshly initialised ``transformers.GPT2LMHeadModel`` of size ``name`` (GPT-2 init: N(0, 0.02), residual
    projections scaled by 1/sqrt(2·n_layer)).

    Args:
        name: a name from :data:`MODEL_NAMES` or a :class:`ModelSpec`.
        vocab_size: rows of the token embedding (the tokenizer's vocabulary, possibly padded to a multiple of 64).
        context: position-table size; default the spec's context.
        dtype: parameter dtype (fp32, bf16 or fp16). Weights are initialised in fp32 and then cast, so a seed gives
            the same weights (up to rounding) in every dtype.
        activation_checkpointing: recompute each block in the backward pass (non-reentrant checkpointing).
        seed: initialise under this seed without touching the global RNG state; None uses the global RNG.
        tie_embeddings: share the token embedding with the LM head (GPT-2/GPT-3 do).
        dropout: residual, embedding and attention dropout (0 for pre-training, as in the GPT-3 runs).
        device: where to allocate; ``"meta"`` builds shapes only (any size, no memory), e.g. for FSDP2's deferred
            initialisation or to count parameters.
    """
    from transformers.utils import logging as hf_logging

    spec = model_spec(name)
    dtype = resolve_dtype(dtype)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    cfg = gpt2_config(spec, vocab_size=vocab_size, context=context, tie_embeddings=tie_embeddings, dropout=dropout)
    device = torch.device("cpu") if device is None else torch.device(device)

    from transformers import GPT2LMHeadModel

    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    rng = torch.random.fork_rng(devices=fork_devices) if seed is not None else contextlib.nullcontext()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with rng, device:
            if seed is not None:
                torch.manual_seed(seed)
            model = GPT2LMHeadModel(cfg)
    finally:
        hf_logging.set_verbosity(verbosity)
    if dtype != torch.float32:
        model = model.to(dtype)
    if activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5.23
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
