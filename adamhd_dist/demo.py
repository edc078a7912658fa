"""A one-minute AdamHD demo on the CPU: a tiny GPT-2 trained on text that ships with Python.

    python -m adamhd_dist.demo [--steps 150] [--seed 0]

Prints the derived numbers (tokens per step, decayed vs undecayed parameters), a progress bar with the loss, and
the per-layer Huber thresholds δ at the end. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch
from tqdm import tqdm

from . import AdamHD, layer_deltas, param_groups


def _corpus() -> str:
    # modules whose sources ship with every Python
    return "".join(inspect.getsource(m) for m in (argparse, inspect, json))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    ap.add_argument("--seq", type=int, default=64, help="characters per sequence (default 64)")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name} must be a positive integer, got {getattr(args, name)}")

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    text = _corpus()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text[:200_000]], dtype=torch.long) if len(vocab) < 256 else None
    if data is None:
        raise SystemExit("corpus has too many distinct characters for the demo's byte vocabulary")
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=args.seq, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(cfg)
    groups = param_groups(model, weight_decay=0.1)
    n_dec = sum(p.numel() for p in groups[0]["params"])
    n_nodec = sum(p.numel() for p in groups[1]["params"])
    opt = AdamHD(groups, lr=3e-3, betas=(0.9, 0.95))
    print(f"model: GPT-2 {cfg.n_layer} layers, d_model {cfg.n_embd}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters ({n_dec:,} decayed in {len(groups[0]['params'])} tensors, {n_nodec:,} undecayed in "
          f"{len(groups[1]['params'])} tensors; tied embeddings counted once)")
    print(f"data: {len(text):,} characters of Python's own sources, vocabulary {len(vocab)}, "
          f"{args.batch} x {args.seq} = {args.batch * args.seq:,} tokens per step, {args.steps} steps")

    def batch(src, gen):
        ix = torch.randint(len(src) - args.seq - 1, (args.batch,), generator=gen)
        return torch.stack([src[i:i + args.seq] for i in ix])

    @torch.no_grad()
    def val_loss():
        model.eval()
        g = torch.Generator().manual_seed(1234)
        losses = [model(x, labels=x).loss.item() for x in (batch(val, g) for _ in range(4))]
        model.train()
        return sum(losses) / len(losses)

    gen = torch.Generator().manual_seed(args.seed)
    first_val = val_loss()
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="AdamHD", unit="step", disable=None)
    for step in bar:
        x = batch(train, gen)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            tok_s=f"{(step + 1) * args.batch * args.seq / (time.perf_counter() - t0):,.0f}")
    last_val = val_loss()
    print(f"validation loss: {first_val:.3f} -> {last_val:.3f} (perplexity {torch.exp(torch.tensor(last_val)):.2f})")
    deltas = layer_deltas(opt)
    print("per-layer Huber threshold δ after training:")
    print(json.dumps({k: round(v, 5) for k, v in deltas.items()}, indent=1))
    return 0 if last_val < first_val else 1


if __name__ == "__main__":
    raise SystemExit(main())
