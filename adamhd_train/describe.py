"""What a run prints: its derived numbers before the first step, and its outcome after the last.

:func:`describe_start` lists the engine, the model (decayed vs undecayed parameters, the count against GPT-3's
table), the data, the batch plan (tokens per step, micro-batch, accumulation, the ramp), precision, the optimizer's
effective hyper-parameters, the schedule, the run's length in tokens and epochs, and where MFU's peak comes from;
:func:`describe_end` the loss and δ summaries.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

from adamhd_dist import AdamHD

from .layouts import describe_layout
from .metrics import delta_summary
from .models import GPT3_VOCAB_SIZE, count_parameters, model_spec
from .ranks import LaunchContext
from .resolve import ResolvedRun

__all__ = ["describe_start", "describe_end"]


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else ("es" if noun.endswith("ch") else "s"))


def _source(sources: dict, key: str) -> str:
    return f" [{sources[key]}]" if sources else ""


def _model_lines(run: ResolvedRun, data, model, groups) -> list[str]:
    s = run.settings
    spec = model_spec(s.model)
    n_params = sum(p.numel() for p in model.parameters())
    dec = sum(p.numel() for p in groups[0]["params"]) if groups and groups[0]["weight_decay"] > 0 else 0
    dec_t = len(groups[0]["params"]) if dec else 0
    lines = [f"model: {s.model} (GPT-2 blocks: {spec.n_layer} layers, d_model {spec.d_model}, {spec.n_head} heads of {spec.d_head}, "
             f"context {s.seq_len}); {n_params:,} parameters with vocabulary {data.vocab_size:,} "
             f"(tied embeddings counted once)",
             f"  decayed (matrices, embeddings): {dec:,} in {dec_t} tensors; undecayed (biases, norms): "
             f"{n_params - dec:,} in {sum(len(g['params']) for g in groups) - dec_t} tensors"]
    if spec.nominal_params is not None:
        table = count_parameters(spec, GPT3_VOCAB_SIZE, context=spec.context)
        lines.append(f"  at GPT-3's vocabulary {GPT3_VOCAB_SIZE:,} and context {spec.context:,}: {table:,} "
                     f"parameters (table: {spec.nominal_params / 1e6:,.0f}M, "
                     f"{100 * (table / spec.nominal_params - 1):+.1f}%)")
    layout = describe_layout(s.model)
    if layout:
        lines.append(f"  {layout} (--tp runs with --fsdp; --pp, and --tp with --deepspeed: checked, not yet run by "
                     f"this launcher)")
    return lines


def _batch_lines(run: ResolvedRun, ctx: LaunchContext) -> list[str]:
    s, plan, d = run.settings, run.plan, run.derived
    src = d.get("schedule_sources", {})
    lines = [f"batch: {plan.describe()}",
             f"  tokens per step {plan.tokens_per_step:,}; micro-batch {plan.micro_batch} "
             f"({plan.tokens_per_rank_micro_batch:,} tokens per rank); gradient accumulation "
             f"{plan.grad_accum_steps}; world size {ctx.world_size}",
             f"  ranks: dp {d.get('dp', ctx.world_size)} × tp {s.tp} × pp {s.pp} = {ctx.world_size}; "
             f"{plan.global_batch_sequences // plan.world_size:,} sequences per data-parallel rank per step "
             f"({plan.micro_batch} per micro-step x {plan.grad_accum_steps})"
             + ("; the ranks of one tensor-parallel group read the same batch" if s.tp > 1 else "")]
    if s.ramp_tokens:
        lines.append(f"  batch ramp: {run.ramp.effective_start_tokens:,} -> {plan.tokens_per_step:,} tokens over the "
                     f"first {s.ramp_tokens:,} tokens ({d['ramp_steps']:,} steps){_source(src, 'ramp_tokens')}")
    else:
        lines.append(f"  batch ramp: none{_source(src, 'ramp_tokens')}")
    return lines


def _optimizer_lines(run: ResolvedRun) -> list[str]:
    s, d = run.settings, run.derived
    src = d.get("schedule_sources", {})
    defaults = {k: v.default for k, v in inspect.signature(AdamHD.__init__).parameters.items()}
    kw = {**defaults, **run.adamhd_kwargs}  # what the optimizer will use, its own defaults included
    return [f"precision: {s.dtype}; activation checkpointing {'on' if s.activation_checkpointing else 'off'}; "
            f"gradient clipping at global norm {s.grad_clip:g}",
            f"optimizer: peak LR {s.lr:g}, betas {tuple(kw['betas'])}, eps {kw['eps']:g}, "
            f"weight decay {s.weight_decay:g}"
            + (f", delta_mode {kw['delta_mode']}, delta_scale {kw['delta_scale']:g}, "
               f"decay {kw['decay']}" if d["optimizer_type"].lower() == "adamhd" else ""),
            f"schedule: LR warmup {s.warmup_tokens:,} tokens{_source(src, 'warmup_tokens')}, "
            f"cosine to {s.min_lr_ratio:.0%} of peak at {s.decay_tokens:,} tokens{_source(src, 'decay_tokens')}"]


def _run_lines(run: ResolvedRun, data) -> list[str]:
    s, d = run.settings, run.derived
    epochs = d["run_tokens"] / max(1, data.train_tokens)
    lines = [f"run: {_n(s.max_steps, 'step')} = {d['run_tokens']:,} tokens ({epochs:.2f} epochs of the train "
             f"split); validation every {_n(s.eval_interval, 'step')} ({_n(s.eval_batches, 'batch')} per rank), "
             f"checkpoint every {_n(s.save_interval, 'step')} (keeping {s.keep_checkpoints or 'all'})"]
    if epochs > 4:
        lines.append(f"  note: the run sees its corpus {epochs:.0f} times; for a real pre-training run give a larger "
                     f"corpus with --data (a .jsonl/.txt path or a hub dataset such as openwebtext)")
    return lines


def describe_start(run: ResolvedRun, ctx: LaunchContext, data, model, groups, resume_from, peak_note: str) -> str:
    """The run's derived numbers, printed by rank 0 before the first step."""
    s, d = run.settings, run.derived
    engine = (f"DeepSpeed ZeRO-{d.get('zero_stage', 0)} ({s.deepspeed_config})"
              + (f" with AutoTP over {s.tp} ranks" if s.tp > 1 else "") + f", optimizer {d['optimizer_type']}"
              if s.launch == "deepspeed" else
              "FSDP2 (fully_shard per block)"
              + (f" over tensor parallelism: a dp {d.get('dp')} × tp {s.tp} mesh, Megatron-style blocks (q/k/v and "
                 f"MLP in colwise, projections rowwise), sequence-parallel norms, vocabulary-parallel embedding and "
                 f"tied head" if s.tp > 1 else "") + ", optimizer AdamHD")
    lines = [f"engine: {engine}; {ctx.world_size} rank(s) on {'GPU' if ctx.on_gpu else 'CPU'} "
             f"({'nccl' if ctx.on_gpu else 'gloo'}), started by {ctx.launcher}"]
    lines += _model_lines(run, data, model, groups)
    lines.append(data.describe())
    lines += _batch_lines(run, ctx)
    lines += _optimizer_lines(run)
    lines += _run_lines(run, data)
    lines.append(f"MFU: {peak_note}")
    lines.append(f"run directory: {s.out_dir}" + (f" (resuming from {resume_from[1]}, step {resume_from[0]})"
                                                  if resume_from else ""))
    return "\n".join(lines)


def _steps(steps: list[int]) -> str:
    shown = ", ".join(map(str, steps[:8]))
    return shown + (f", ... {steps[-1]}" if len(steps) > 8 else "")


def describe_end(out: Path, records: list[dict], deltas: dict, png: Optional[Path]) -> str:
    """The run's outcome from its ``metrics.jsonl`` records and the final per-layer δ, printed by rank 0."""
    lines = []
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    vals = [r for r in records if r.get("val_loss") is not None]
    if losses:
        summary = f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} (steps {records[0]['step']}-{records[-1]['step']})"
        if vals:
            summary += (f"; validation loss {vals[0]['val_loss']:.3f} -> {vals[-1]['val_loss']:.3f} "
                        f"(perplexity {vals[-1]['val_ppl']:.1f})")
        lines.append(summary)
    bad = [r["step"] for r in records if r.get("loss") is None and "step" in r]
    if bad:
        lines.append(f"non-finite training loss at {len(bad)} logged step(s): {_steps(bad)}")
    skipped = [r["step"] for r in records if r.get("skipped_step")]
    if skipped:
        lines.append(f"the engine skipped {len(skipped)} step(s) after gradient overflow: {_steps(skipped)}")
    if deltas:
        ds = delta_summary(deltas)
        lines.append(f"per-layer Huber threshold δ over {len(deltas)} layers: min {ds['delta_min']:.4g}, median "
                     f"{ds['delta_median']:.4g}, max {ds['delta_max']:.4g} (all layers in {out / 'deltas.jsonl'})")
    lines.append(f"run directory {out}: metrics.jsonl, deltas.jsonl, tensorboard/, manifest.json, checkpoints/"
                 + (f", {png.name}" if png else ""))
    return "\n".join(lines)
