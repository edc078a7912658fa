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

:func:`parallelize_gpt2` cuts a linear-block model over a 1-D tensor-parallel mesh with torch's styles, as
torchtitan cuts a Llama (:func:`tp_plan` is the plan):

- the token embedding ``wte`` is vocabulary-parallel (rowwise: each rank holds a slice of the vocabulary; the
  partial sums of a lookup are all-reduced) and so is the position table ``wpe``; both outputs are whole
  (Replicate), so that GPT-2's position ids and causal mask, which it derives from the embedding's shape, cover
  the whole sequence;
- the sequence is cut at ``transformer.drop`` (Replicate -> ``Shard(1)``, no communication): the norms
  ``ln_1``/``ln_2``/``ln_f``, the residual stream and dropout run sequence-parallel on ``seq_len / tp`` tokens;
- attention and the MLP gather their input (``Shard(1)`` -> Replicate); q, k, v and ``mlp.c_fc`` are colwise
  (each rank whole heads, a slice of the MLP width), ``attn.c_proj`` and ``mlp.c_proj`` rowwise with a
  reduce-scatter back onto the sequence shards;
- the tied LM head is colwise over the vocabulary, the same ``Shard(0)`` cut of the same weight as the rowwise
  embedding, so it stays one parameter (re-tied after the cut); its input is gathered from the sequence shards
  and its logits gathered over the vocabulary (Replicate), so the loss is the ordinary one.

Every parameter is then a DTensor on the tensor-parallel mesh (the norms and biases of rowwise layers
Replicate), which FSDP2 shards further over the data-parallel mesh (:func:`adamhd_train.engine.fsdp_over_tp`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SplitQKV", "linear_blocks", "set_local_heads", "tp_plan", "parallelize_gpt2"]


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


def tp_plan(model: nn.Module) -> tuple[dict, dict]:
    """(root plan, per-block plan) of a linear-block ``GPT2LMHeadModel`` for ``parallelize_module`` (see the module
    docstring); the block plan's names are relative to each ``transformer.h[i]``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    def gather():
        return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                  use_local_output=True)

    root = {
        "transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "transformer.wpe": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "transformer.drop": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                               use_local_output=True),
        "transformer.ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    block = {
        "ln_1": SequenceParallel(),
        "attn": gather(),
        "attn.c_attn.q": ColwiseParallel(),
        "attn.c_attn.k": ColwiseParallel(),
        "attn.c_attn.v": ColwiseParallel(),
        "attn.c_proj": RowwiseParallel(output_layouts=Shard(1)),
        "ln_2": SequenceParallel(),
        "mlp": gather(),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    return root, block


def parallelize_gpt2(model: nn.Module, tp_mesh) -> nn.Module:
    """Cut a ``GPT2LMHeadModel`` over the 1-D device mesh ``tp_mesh`` in place (its blocks made linear first,
    :func:`linear_blocks`) with :func:`tp_plan`; attention then runs over the local ``n_head / tp`` heads and a
    tied LM head stays tied. Returns the model."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = tp_mesh.size()
    config = model.config
    if config.n_head % tp or (4 * config.n_embd) % tp:
        raise ValueError(f"tp: {tp} must divide the {config.n_head} heads and the MLP width {4 * config.n_embd}")
    linear_blocks(model)
    tied = model.lm_head.weight is model.transformer.wte.weight
    root, block = tp_plan(model)
    parallelize_module(model, tp_mesh, root)
    for layer in model.transformer.h:
        parallelize_module(layer, tp_mesh, block)
    if tied:
        # both cuts are Shard(0) of the same (vocabulary, d_model) values: one parameter again
        model.lm_head.weight = model.transformer.wte.weight
    set_local_heads(model, tp)
    return model
