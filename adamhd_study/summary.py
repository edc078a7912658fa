"""The comparison's numbers from the per-run results (:func:`summarize`): final losses, speed-ups to a target,
pruning, robustness of each arm against the baseline, weight statistics, and the judgements of each candidate
against the reference (:func:`adamhd_study.stats.compare_values`), with the verdict sentences built from them."""

from __future__ import annotations

import dataclasses
from typing import Any

from .analysis import speedup, steps_to_target
from .config import CompareConfig
from .stats import compare_values, mean, ppl, sd
from .verdict import verdict

__all__ = ["summarize", "by_run", "tolerated"]


def by_run(results: list[dict], arm: str, optimizer: str) -> dict[int, dict]:
    """The finished runs of ``arm`` and ``optimizer``, by seed."""
    return {r["seed"]: r for r in results if r["arm"] == arm and r["optimizer"] == optimizer and r["ok"]}


def tolerated(pruning: list[dict], tolerance: float) -> float:
    """Largest sparsity whose perplexity is within ``tolerance`` of the unpruned one, walking up the grid."""
    base = ppl(pruning[0]["val_loss"])
    best = 0.0
    for p in pruning:
        if ppl(p["val_loss"]) <= base * (1.0 + tolerance):
            best = p["sparsity"]
        else:
            break
    return best


def _final_losses(cfg: CompareConfig, results: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for arm in cfg.arms:
        out[arm] = {}
        for opt in cfg.optimizers:
            runs = by_run(results, arm, opt)
            losses = [runs[s]["final_val_loss"] for s in sorted(runs)]
            out[arm][opt] = {"seeds": sorted(runs), "losses": losses, "mean": mean(losses), "sd": sd(losses),
                             "ppl": ppl(mean(losses)),
                             "curve_final": mean([runs[s]["curve"][-1]["val_loss"] for s in runs]),
                             "train_s": mean([runs[s].get("train_s") for s in runs]),
                             "wall_s": mean([runs[s].get("wall_s") for s in runs])}
    return out


def _speedup_row(cfg: CompareConfig, seed: int, rc: list[dict], cc: list[dict]) -> dict:
    # default target: the loss both optimizers reached (the higher final), so the speed-up is defined whichever
    # ends lower, and a tie at the end is a speed-up near 1, not "not reached"
    target = cfg.target_loss if cfg.target_loss is not None else max(rc[-1]["val_loss"], cc[-1]["val_loss"])
    row = {"seed": seed, "target": target}
    for unit, key in (("steps", "step"), ("tokens", "tokens"), ("seconds", "elapsed_s")):
        rcurve = ([p[key] for p in rc], [p["val_loss"] for p in rc])
        ccurve = ([p[key] for p in cc], [p["val_loss"] for p in cc])
        row[f"ref_{unit}"] = steps_to_target(*rcurve, target)
        row[f"cand_{unit}"] = steps_to_target(*ccurve, target)
        row[f"speedup_{unit}"] = speedup(rcurve, ccurve, target)
    return row


def _speedups(cfg: CompareConfig, results: list[dict], cands: list[str]) -> dict:
    out: dict[str, dict] = {}
    for arm in cfg.arms:
        refs = by_run(results, arm, cfg.reference)
        out[arm] = {}
        for cand in cands:
            cr = by_run(results, arm, cand)
            out[arm][cand] = [_speedup_row(cfg, seed, refs[seed]["curve"], cr[seed]["curve"])
                              for seed in sorted(set(refs) & set(cr))]
    return out


def _pruning_and_weights(cfg: CompareConfig, results: list[dict]) -> tuple[dict, dict]:
    """Per optimizer, the baseline arm's pruning grid (mean over seeds, the tolerated sparsity per seed) and its
    weight statistics."""
    pruning, weights = {}, {}
    for opt in cfg.optimizers:
        runs = by_run(results, "baseline", opt)
        rows = [runs[s]["pruning"] for s in sorted(runs) if runs[s].get("pruning")]
        if not rows:
            continue
        grid = []
        for i, s in enumerate(cfg.sparsities):
            losses = [r[i]["val_loss"] for r in rows]
            grid.append({"sparsity": s, "achieved": mean([r[i]["achieved"] for r in rows]), "losses": losses,
                         "val_loss": mean(losses), "ppl": ppl(mean(losses))})
        pruning[opt] = {"grid": grid, "tolerated": [tolerated(r, cfg.prune_tolerance) for r in rows],
                        "seeds": sorted(runs)}
        w = {s: runs[s]["weights"] for s in runs}
        weights[opt] = {
            "small_fraction_1e-3": mean([w[s]["small_fraction_1e-3"] for s in w]),
            "mean_abs": mean([w[s]["mean_abs"] for s in w]),
            "by_type": {k: {m: mean([w[s]["by_type"][k][m] for s in w if k in w[s]["by_type"]])
                            for m in ("mean_abs", "small_fraction_1e-3")}
                        for k in w[min(w)]["by_type"]},
        }
    return pruning, weights


def _robustness(cfg: CompareConfig, results: list[dict]) -> dict:
    """Per arm other than the baseline and per optimizer: the change of the final loss against the baseline arm,
    seed by seed."""
    out: dict[str, dict] = {}
    for arm in cfg.arms:
        if arm == "baseline":
            continue
        out[arm] = {}
        for opt in cfg.optimizers:
            b, a = by_run(results, "baseline", opt), by_run(results, arm, opt)
            seeds = sorted(set(b) & set(a))
            out[arm][opt] = {"seeds": seeds, "deltas": [a[s]["final_val_loss"] - b[s]["final_val_loss"]
                                                        for s in seeds]}
    return out


def _judge(cfg: CompareConfig, ref: dict[int, float], cand: dict[int, float], **extra) -> dict | None:
    """The :class:`~adamhd_study.stats.Comparison` (as a dict) over the seeds both have; None when there is none."""
    seeds = sorted(set(ref) & set(cand))
    if not seeds:
        return None
    c = compare_values([ref[s] for s in seeds], [cand[s] for s in seeds], min_effect=cfg.min_effect,
                       alpha=cfg.alpha)
    return dataclasses.asdict(c) | {"seeds": seeds} | extra


def _judgements(cfg: CompareConfig, out: dict, results: list[dict], cand: str) -> dict:
    """The candidate against the reference: final loss per arm, robustness per arm, loss at the highest pruning
    sparsity."""
    ref, j = cfg.reference, {}

    def per_seed(runs: dict[str, Any], key: str) -> dict[int, float]:
        return dict(zip(runs["seeds"], runs[key]))

    for arm in cfg.arms:
        final = _judge(cfg, {s: r["final_val_loss"] for s, r in by_run(results, arm, ref).items()},
                       {s: r["final_val_loss"] for s, r in by_run(results, arm, cand).items()})
        if final:
            j[f"final:{arm}"] = final
        if arm in out["robustness"]:
            rob = out["robustness"][arm]
            robust = _judge(cfg, per_seed(rob[ref], "deltas"), per_seed(rob[cand], "deltas"))
            if robust:
                j[f"robust:{arm}"] = robust
    if ref in out["pruning"] and cand in out["pruning"]:
        top = len(cfg.sparsities) - 1
        pr, pc = out["pruning"][ref], out["pruning"][cand]
        pruned = _judge(cfg, dict(zip(pr["seeds"], pr["grid"][top]["losses"])),
                        dict(zip(pc["seeds"], pc["grid"][top]["losses"])), sparsity=cfg.sparsities[top])
        if pruned:
            j["pruned:max"] = pruned
    return j


def summarize(cfg: CompareConfig, results: list[dict]) -> dict:
    """The comparison's numbers from the per-run results: final losses, speed-ups, pruning, robustness, weights,
    the judgements (:class:`~adamhd_study.stats.Comparison` as dicts) and the verdict sentences."""
    cands = [o for o in cfg.optimizers if o != cfg.reference]
    pruning, weights = _pruning_and_weights(cfg, results)
    out: dict[str, Any] = {"reference": cfg.reference, "candidates": cands, "final": _final_losses(cfg, results),
                           "speedup": _speedups(cfg, results, cands), "pruning": pruning,
                           "robustness": _robustness(cfg, results), "weights": weights, "judgements": {},
                           "failed": [{"name": r["name"], "error": r.get("error")} for r in results if not r["ok"]]}
    out["judgements"] = {cand: _judgements(cfg, out, results, cand) for cand in cands}
    out["verdict"] = {cand: verdict(cfg, out, results, cand) for cand in cands}
    return out
