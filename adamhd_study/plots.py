"""The report's PNG plots, each from the per-run results or the summary; each returns the file name written, or
None when there is nothing to draw. Figures are drawn with matplotlib's object API (no pyplot state, no GUI
backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure

from .analysis import layer_type
from .collect import hist_edges
from .config import CompareConfig

__all__ = ["plot_all", "plot_curves", "plot_pruning", "plot_histograms", "plot_deltas", "plot_outliers"]

_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
_STYLES = ("-", "--", "-.", ":", "-", "--")
_TYPE_COLORS = {"attn.qkv": "tab:blue", "attn.proj": "tab:cyan", "mlp.fc": "tab:red", "mlp.proj": "tab:orange",
                "embedding": "tab:green", "other": "tab:gray"}


def _style(k: int) -> dict:
    return {"color": _COLORS[k % 6], "ls": _STYLES[k % 6]}


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    return path.name


def plot_curves(cfg: CompareConfig, results: list[dict], out: Path, x: str) -> Optional[str]:
    """Validation loss against ``x`` (``"tokens"`` or ``"elapsed_s"``), one panel per arm."""
    arms = [a for a in cfg.arms if any(r["arm"] == a and r["curve"] for r in results)]
    if not arms:
        return None
    fig = Figure(figsize=(5.2 * len(arms), 4.0), dpi=110)
    axes = fig.subplots(1, len(arms), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for k, opt in enumerate(cfg.optimizers):
            for r in results:
                if r["arm"] == arm and r["optimizer"] == opt and r["curve"]:
                    ax.plot([p[x] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], marker="o", ms=2.5,
                            lw=1.2, alpha=1.0 if r["seed"] == 0 else 0.5,
                            label=f"{opt}" + (f" (seed {r['seed']})" if cfg.seeds > 1 else ""), **_style(k))
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel("tokens" if x == "tokens" else "training wall-clock (s)")
        if x == "tokens":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / ("val_loss_vs_tokens.png" if x == "tokens" else "val_loss_vs_time.png"))


def plot_pruning(cfg: CompareConfig, summary: dict, out: Path) -> Optional[str]:
    """Validation perplexity against sparsity, one line per optimizer (baseline arm)."""
    if not summary["pruning"]:
        return None
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.subplots()
    for k, opt in enumerate(cfg.optimizers):
        p = summary["pruning"].get(opt)
        if p:
            ax.plot([100 * g["sparsity"] for g in p["grid"]], [g["ppl"] for g in p["grid"]], marker="o",
                    label=opt, **_style(k))
    ax.set_xlabel(f"sparsity of the decayed matrices (%), {cfg.prune_scope} magnitude pruning")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("perplexity after magnitude pruning (baseline arm)", fontsize=10)
    return _save(fig, out / "pruning.png")


def plot_histograms(cfg: CompareConfig, results: list[dict], out: Path) -> Optional[str]:
    """Weight-magnitude histograms per layer type (baseline arm, lowest seed), one line per optimizer."""
    ok = [r for r in results if r["arm"] == "baseline" and r["ok"]]
    if not ok:
        return None
    base = [r for r in ok if r["seed"] == min(x["seed"] for x in ok)]
    types = list(base[0]["histograms"])
    edges = hist_edges()
    cols = min(3, len(types))
    rows = math.ceil(len(types) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.3 * rows), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, t in zip(axes.flat, types):
        numel = 0
        for k, opt in enumerate(cfg.optimizers):
            r = next((x for x in base if x["optimizer"] == opt), None)
            if r is None or t not in r["histograms"]:
                continue
            h = r["histograms"][t]
            numel = h["numel"]
            frac = np.asarray(h["counts"], dtype=float) / max(h["numel"], 1)
            ax.stairs(frac, edges, label=opt, lw=1.3, **_style(k))
        ax.set_xscale("log")
        ax.set_title(f"{t} ({numel:,} weights)", fontsize=9)
        ax.set_xlabel("|w|")
        ax.set_ylabel("fraction per bin")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    return _save(fig, out / "weight_histograms.png")


def plot_deltas(cfg: CompareConfig, results: list[dict], out: Path) -> Optional[str]:
    """Every layer's δ over training (the first finished baseline run that logged δ), coloured by layer type."""
    run = next((r for r in results if r["arm"] == "baseline" and r["ok"] and r["deltas"]
                and any(rec["deltas"] for rec in r["deltas"])), None)
    if run is None:
        return None
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    names = list(run["deltas"][-1]["deltas"])
    seen = set()
    for name in names:
        pts = [(rec["step"], rec["deltas"][name]) for rec in run["deltas"] if name in rec["deltas"]]
        t = layer_type(name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.0, color=_TYPE_COLORS.get(t, "tab:gray"),
                label=t if t not in seen else None)
        seen.add(t)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("Huber threshold δ")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"δ per layer over training ({run['name']}, {len(names)} layers)", fontsize=10)
    return _save(fig, out / "deltas.png")


def plot_outliers(cfg: CompareConfig, results: list[dict], out: Path) -> Optional[str]:
    """Training loss and gradient norm of the outlier arm (seed 0) against its baseline, events marked."""
    runs = [r for r in results if r["arm"] == "outliers" and r["ok"] and r["seed"] == 0]
    if not runs:
        return None
    fig = Figure(figsize=(8, 5.5), dpi=110)
    a1, a2 = fig.subplots(2, 1, sharex=True)
    for k, opt in enumerate(cfg.optimizers):
        r = next((x for x in runs if x["optimizer"] == opt), None)
        b = next((x for x in results if x["arm"] == "baseline" and x["optimizer"] == opt and x["seed"] == 0
                  and x["ok"]), None)
        if r is None:
            continue
        steps = [p["step"] for p in r["train"]]
        a1.plot(steps, [p["loss"] for p in r["train"]], lw=0.9, label=f"{opt}, outliers", **_style(k))
        if b is not None:
            a1.plot([p["step"] for p in b["train"]], [p["loss"] for p in b["train"]], lw=0.8, ls=":",
                    color=_COLORS[k % 6], alpha=0.7, label=f"{opt}, baseline")
        a2.plot(steps, [p["grad_norm"] for p in r["train"]], lw=0.9, label=opt, **_style(k))
    accum = max(1, runs[0].get("accum_steps") or 1)
    for ev in runs[0]["events"]:
        for ax in (a1, a2):
            ax.axvline(ev["micro_batch"] // accum + 1, color="k", lw=0.5, alpha=0.3)
    a1.set_ylabel("training loss")
    a2.set_ylabel("gradient norm (before clipping)")
    a2.set_yscale("log")
    a2.set_xlabel("step (vertical lines: outlier events)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a1.set_title("outlier-gradient arm, seed 0", fontsize=10)
    return _save(fig, out / "outliers.png")


def plot_all(cfg: CompareConfig, results: list[dict], summary: dict, out: Path) -> dict[str, Optional[str]]:
    """Every plot of the report, by the name the report refers to it with."""
    return {
        "tokens": plot_curves(cfg, results, out, "tokens"),
        "time": plot_curves(cfg, results, out, "elapsed_s"),
        "pruning": plot_pruning(cfg, summary, out),
        "hist": plot_histograms(cfg, results, out),
        "deltas": plot_deltas(cfg, results, out),
        "outliers": plot_outliers(cfg, results, out),
    }
