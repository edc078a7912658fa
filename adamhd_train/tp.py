"""The GPT-2 blocks in the form torch's tensor-parallel styles take (``ColwiseParallel`` and ``RowwiseParallel``
accept ``nn.Linear`` and ``nn.Embedding`` only; ``parallelize_module`` on a GPT-2 block raises
``NotImplementedError: ColwiseParallel currently only support nn.Linear and nn.Embedding!``).

:func:`linear_blocks` replaces, in place, each block's ``Conv1D`` projections (weight ``(in, out)``) by
``nn.Linear`` modules (weight ``(out, in)``) holding the same values: the fused ``attn.c_attn`` becomes
:class:`SplitQKV` with separate ``q``, ``k`` and ``v`` linears, so that a colwise cut of each hands a rank whole
heads of all three (a colwise cut of the fused weight would hand rank 0 q and half of k). Attention reshapes its
projections with ``-1`` heads, so a block whose q/k/v are cut over ``tp`` ranks attends over its local
``n_head / tp`` heads once ``split_size`` is the local width (:func:`set_local_heads`).

The model's output is unchanged (up to float rounding of the split matmuls), but its layers are not: q, k and v
are three decayed matrices, each with its own AdamHD statistic, where the fused ``c_attn`` was one. A run with
linear blocks is compared with another run with linear blocks, not with the fused model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SplitQKV", "linear_blocks", "set_local_heads"]


def _linear(conv: nn.Module, rows: slice = slice(None)) -> nn.Linear:
    """An ``nn.Linear`` with the values of ``Conv1D`` ``conv`` (output columns ``rows`` of it)."""
    weight = conv.weight.detach()[:, rows]  # (in, out)
    bias = conv.bias.detach()[rows]
    lin = nn.Linear(weight.shape[0], weight.shape[1], bias=True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.t())
        lin.bias.copy_(bias)
    return lin


class SplitQKV(nn.Module):
    """GPT-2's fused qkv projection as three linears; the output is ``[q | k | v]`` along the last dimension, as
    the fused one's (each of local width under tensor parallelism)."""

    def __init__(self, c_attn: nn.Module):
        super().__init__()
        width = c_attn.weight.shape[1] // 3
        self.q = _linear(c_attn, slice(0, width))
        self.k = _linear(c_attn, slice(width, 2 * width))
        self.v = _linear(c_attn, slice(2 * width, 3 * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def linear_blocks(model: nn.Module) -> nn.Module:
    """Replace, in place, the ``Conv1D`` projections of every block of a ``GPT2LMHeadModel`` by linears with the
    same values (see the module docstring); returns the model."""
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        if isinstance(attn.c_attn, SplitQKV):
            continue
        attn.c_attn = SplitQKV(attn.c_attn)
        attn.c_proj = _linear(attn.c_proj)
        mlp.c_fc = _linear(mlp.c_fc)
        mlp.c_proj = _linear(mlp.c_proj)
    return model


def set_local_heads(model: nn.Module, tp: int) -> None:
    """After q/k/v were cut colwise over ``tp`` ranks: each block's attention splits its projections at the local
    width ``d_model / tp`` (the heads follow from the head width)."""
    for block in model.transformer.h:
        attn = block.attn
        if attn.num_heads % tp:
            raise ValueError(f"tp: {tp} must divide the {attn.num_heads} heads")
        attn.split_size = attn.embed_dim // tp
