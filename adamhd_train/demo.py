"""A one-minute AdamHD demo on the CPU: a tiny GPT-2 trained on text that ships with Python.

    python -m adamhd_train.demo [--steps 150] [--seed 0] [--model nano] [--cache-dir DIR]

The first run tokenizes a slice of the standard library's sources with a locally trained BPE (cached under
``--cache-dir``, default ``~/.cache/adamhd_dist``); nothing is downloaded. Prints the derived numbers (tokens per
step, decayed vs undecayed parameters), a progress bar with the loss, and the per-layer Huber thresholds δ at the
end. Exit status 0 when the validation loss fell.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from adamhd_dist import AdamHD, layer_deltas, param_groups
from .data import TokenSampler, ValBatches, prepare_data
from .models import build_model, count_parameters
from .recipe import batch_plan, lr_scheduler

CPU_MODELS = ("nano", "tiny", "mini")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    ap.add_argument("--model", default="nano", choices=CPU_MODELS, help="model size (default nano)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the corpus (default 2048)")
    ap.add_argument("--max-chars", type=int, default=1_000_000,
                    help="characters of the embedded corpus to use (default 1,000,000)")
    ap.add_argument("--cache-dir", default=None, help="data cache (default $ADAMHD_DATA_CACHE or ~/.cache/adamhd_dist)")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "seq", "max_chars"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        ap.error(f"--lr must be a positive number, got {args.lr}")

    data = prepare_data("embedded", vocab_size=args.vocab, max_chars=args.max_chars, cache_dir=args.cache_dir)
    plan = batch_plan(args.batch * args.seq, seq_len=args.seq, micro_batch=args.batch, world_size=1)
    model = build_model(args.model, vocab_size=data.vocab_size, context=args.seq, seed=args.seed)
    groups = param_groups(model, weight_decay=0.1)
    n_dec = sum(p.numel() for p in groups[0]["params"])
    n_nodec = sum(p.numel() for p in groups[1]["params"])
    opt = AdamHD(groups, lr=args.lr, betas=(0.9, 0.95))
    sched = lr_scheduler(opt, warmup=max(1, args.steps // 15), decay_end=args.steps)
    cfg = model.config
    n_params = count_parameters(args.model, data.vocab_size, context=args.seq)
    print(f"model: {args.model}, GPT-2 {cfg.n_layer} layers, d_model {cfg.n_embd}, {n_params:,} parameters "
          f"({n_dec:,} decayed in {len(groups[0]['params'])} tensors, {n_nodec:,} undecayed in "
          f"{len(groups[1]['params'])} tensors; tied embeddings counted once)")
    print(data.describe())
    print(f"{plan.describe()}; {args.steps} steps, LR warmup then cosine to 10% of {args.lr:g}")

    train = TokenSampler(data, seq_len=args.seq, micro_batch=args.batch, seed=args.seed)
    val = ValBatches(data, seq_len=args.seq, micro_batch=args.batch, max_batches=4)

    def loss_of(window):
        logits = model(window[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = [loss_of(w).item() for w in val]
        model.train()
        return sum(losses) / len(losses)

    first_val = val_loss()
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="AdamHD", unit="step", disable=None)
    for step in bar:
        loss = loss_of(next(train))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            tok_s=f"{(step + 1) * plan.tokens_per_step / (time.perf_counter() - t0):,.0f}")
    last_val = val_loss()
    print(f"validation loss: {first_val:.3f} -> {last_val:.3f} (perplexity {math.exp(last_val):.2f})")
    deltas = layer_deltas(opt)
    print("per-layer Huber threshold δ after training:")
    print(json.dumps({k: round(v, 5) for k, v in deltas.items()}, indent=1))
    return 0 if last_val < first_val else 1


if __name__ == "__main__":
    raise SystemExit(main())
