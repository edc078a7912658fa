"""``report.md`` and ``results.json`` (:func:`write_report`). The report's prose is in ``templates/``
(``string.Template`` files: ``report.md`` and one per optional section); this module fills in the numbers, the
tables and the plots."""

from __future__ import annotations

import json
import math
import re
import time
from importlib import resources
from pathlib import Path
from string import Template
from typing import Optional, Sequence

from .config import CompareConfig
from .plots import plot_all
from .stats import mean, t_critical
from .verdict import PAPER_CLAIMS, fmt_speedup

__all__ = ["write_report", "render_report", "loss_rule"]


def _fill(template: str, **values) -> str:
    """The template file ``templates/<template>`` with ``values`` substituted (a missing one is an error)."""
    text = resources.files(__package__).joinpath("templates", template).read_text(encoding="utf-8")
    return Template(text).substitute(values)


def _f(x: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pm(m: Optional[float], s: Optional[float]) -> str:
    return _f(m) + (f" ± {s:.4f}" if s is not None else "")


def _table(header: Sequence[str], align: Sequence[str], rows: list[Sequence[str]]) -> str:
    """A Markdown table; ``align`` holds ``"l"`` or ``"r"`` per column."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _image(alt: str, name: Optional[str]) -> str:
    return f"![{alt}]({name})" if name else ""


def loss_rule(cfg: CompareConfig) -> str:
    """The sentence that states when a loss difference counts as real (the rule of :mod:`adamhd_study.stats`)."""
    seeds = sorted({2, 3, max(cfg.seeds, 2)})
    t_values = ", ".join(f"{t_critical(n - 1, cfg.alpha):.2f} at {n} seeds" for n in seeds)
    return _fill("loss_rule.md", min_effect=f"{cfg.min_effect:g}",
                 min_effect_ppl=f"{100 * (math.exp(cfg.min_effect) - 1):.1f}%", alpha=f"{cfg.alpha:g}",
                 t_values=t_values).strip()


# ----------------------------------------------------------------------------------------------------------------
# the parts of "What was measured"
def _verdict_block(cfg: CompareConfig, summary: dict) -> str:
    parts = []
    for cand, sentences in summary["verdict"].items():
        if len(summary["verdict"]) > 1:
            parts.append(f"**{cand} vs {cfg.reference}**\n")
        parts.append("\n".join(f"- {s}" for s in sentences) + "\n\n")
    return "\n".join(parts)


def _failed(summary: dict) -> str:
    if not summary["failed"]:
        return ""
    return ("**Failed runs** (left out of every table): "
            + "; ".join(f"`{f['name']}`: {f['error']}" for f in summary["failed"]) + "\n\n")


def _machine_line(results: list[dict], meta: dict) -> str:
    m = meta["machine"]
    share = None
    if meta.get("runs_cpu_s") and meta.get("runs_wall_s") and m["gpus"] == "none" \
            and not any(r.get("reused") for r in results):
        share = meta["runs_cpu_s"] / (meta["runs_wall_s"] * (m["cpus"] or 1))
    line = (f"{m['cpu']} ({m['cpus']} CPU cores available), GPUs: {m['gpus']}, {m['memory_gb']} GiB; "
            f"Python {m['python']}, torch {m['torch']}, deepspeed {m['deepspeed']}. Load average (1 min) "
            f"{meta['load_start']:.2f} before the runs and {meta['load_end']:.2f} after them.")
    if share is not None:
        line += (f" The runs used {share:.0%} of the machine's CPU time while they ran"
                 + (" — the machine was shared with other work, so the wall-clock figures carry that load."
                    if share < 0.8 else "."))
    return line


def _wall_line(cfg: CompareConfig, results: list[dict], meta: dict) -> str:
    reused = sum(bool(r.get("reused")) for r in results)
    return (f"{meta['total_s'] / 60:.1f} min ({meta['total_s']:.0f} s)"
            + (f", with {reused} of {len(results)} runs reused from earlier invocations (their own times are in "
               f"the table below)" if reused else "")
            + f"; runs {cfg.parallel} at a time, {cfg.nproc} rank(s) each, {meta['threads']} thread(s) per run on "
              f"the CPU.")


def _model_line(cfg: CompareConfig, results: list[dict], meta: dict) -> str:
    base = [r for r in results if r["arm"] == "baseline" and r["ok"]]
    any_run = base[0] if base else next((r for r in results if r.get("parameters")), {})
    return (f"`{cfg.model}`, {any_run.get('parameters') or 0:,} parameters (tied embeddings counted once), "
            f"context {cfg.seq_len}; data `{cfg.data}` (tokenizer {cfg.tokenizer}"
            + (f", vocabulary {cfg.vocab_size}" if cfg.vocab_size else "")
            + (f", first {cfg.max_chars:,} characters" if cfg.max_chars else "")
            + f"): {meta['data']['train_tokens']:,} train / {meta['data']['val_tokens']:,} validation tokens.")


def _seed_rule(cfg: CompareConfig) -> str:
    if cfg.seeds == 1:
        return ("With one seed there is no estimate of seed noise: differences are judged against the fixed "
                "minimum effect only.")
    return (f"Differences are judged with a two-sided paired t test on the per-seed differences at level "
            f"α = {cfg.alpha:g} (critical value {t_critical(cfg.seeds - 1, cfg.alpha):.2f} at {cfg.seeds - 1} "
            f"degree{'s' if cfg.seeds > 2 else ''} of freedom), and must exceed the minimum effect.")


def _optimizer_table(cfg: CompareConfig, results: list[dict]) -> str:
    rows = []
    for opt in cfg.optimizers:
        r = next((x for x in results if x["optimizer"] == opt and x.get("optimizer_params") is not None), None)
        p = dict(r["optimizer_params"]) if r else {}
        other = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("lr", "betas", "eps", "weight_decay"))
        rows.append([opt, f"`{cfg.optimizers[opt]}`", r.get("optimizer_type") if r else "n/a", p.get("lr", "n/a"),
                     tuple(p["betas"]) if "betas" in p else "n/a", p.get("eps", "n/a"),
                     p.get("weight_decay", "n/a"), other or "-"])
    return _table(["optimizer", "config", "type", "lr", "betas", "eps", "weight decay", "other"],
                  "lllrlrrl", rows)


def _run_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        status = "ok" if r["ok"] else f"failed: {r.get('error')}"
        if r.get("reused"):
            status += " (reused from an earlier invocation)"
        rows.append([f"`{r['name']}`", r["arm"], r["optimizer"], r["seed"], f"{r['global_batch_tokens']:,}",
                     r["max_steps"], f"{r.get('tokens') or 0:,}", _f(r.get("train_s"), ".0f"),
                     _f(r.get("wall_s"), ".0f"), status])
    return _table(["run", "arm", "optimizer", "seed", "global batch (tokens)", "steps", "tokens", "training s",
                   "wall s (incl. start-up)", "status"], "lllrrrrrrl", rows)


# ----------------------------------------------------------------------------------------------------------------
# results sections
def _final_table(cfg: CompareConfig, summary: dict) -> str:
    rows = [[arm] + [c for o in cfg.optimizers for c in (_pm(summary["final"][arm][o]["mean"],
                                                             summary["final"][arm][o]["sd"]),
                                                         _f(summary["final"][arm][o]["ppl"], ".2f"))]
            for arm in cfg.arms]
    header = ["arm"] + [c for o in cfg.optimizers for c in (f"{o} loss", f"{o} ppl")]
    return _table(header, "l" + "rr" * len(cfg.optimizers), rows)


def _target(cfg: CompareConfig) -> str:
    if cfg.target_loss is not None:
        return f"the fixed validation loss {cfg.target_loss}"
    return (f"the higher of {cfg.reference}'s and the candidate's final validation losses on the curve's "
            f"validation batches (the loss both reached), per arm and seed")


def _speedup_table(cfg: CompareConfig, summary: dict) -> str:
    ref = cfg.reference
    rows = [[arm, cand, row["seed"], f"{row['target']:.4f}", _f(row["ref_steps"], ".1f"),
             _f(row["cand_steps"], ".1f"), fmt_speedup(row["speedup_steps"]), _f(row["ref_seconds"], ".1f"),
             _f(row["cand_seconds"], ".1f"), fmt_speedup(row["speedup_seconds"])]
            for arm, per in summary["speedup"].items() for cand, rows_ in per.items() for row in rows_]
    return _table(["arm", "candidate", "seed", "target", f"{ref} steps", "candidate steps", "speed-up (steps)",
                   f"{ref} s", "candidate s", "speed-up (wall-clock)"], "llrrrrrrrr", rows)


def _pruning_section(cfg: CompareConfig, summary: dict, plot: Optional[str]) -> str:
    pruning = summary["pruning"]
    if not pruning:
        return ""
    rows = [[f"{sp:.0%}"] + [c for p in pruning.values() for c in (f"{100 * p['grid'][i]['achieved']:.2f}%",
                                                                   f"{p['grid'][i]['val_loss']:.4f}",
                                                                   f"{p['grid'][i]['ppl']:.2f}")]
            for i, sp in enumerate(cfg.sparsities)]
    rows.append(["tolerated"] + [c for p in pruning.values() for c in ("", "", f"{mean(p['tolerated']):.0%}")])
    header = ["sparsity"] + [c for o in pruning for c in (f"{o} achieved", f"{o} loss", f"{o} ppl")]
    table = _table(header, "r" + "rrr" * len(pruning), rows)
    return _fill("pruning.md", scope=cfg.prune_scope, tolerance=f"{cfg.prune_tolerance:.0%}", table=table,
                 plot=_image("perplexity after pruning", plot))


def _weight_cells(stats: dict) -> list[str]:
    return [_f(stats.get("mean_abs"), ".4g"), f"{100 * (stats.get('small_fraction_1e-3') or 0):.2f}%"]


def _weights_section(summary: dict, plot: Optional[str]) -> str:
    weights = summary["weights"]
    if not weights:
        return ""
    types = next(iter(weights.values()))["by_type"]
    rows = [[t] + [c for w in weights.values() for c in _weight_cells(w["by_type"].get(t, {}))] for t in types]
    rows.append(["all"] + [c for w in weights.values() for c in _weight_cells(w)])
    header = ["layer type"] + [c for o in weights for c in (f"{o} mean abs", f"{o} share abs<=1e-3")]
    return _fill("weights.md", table=_table(header, "l" + "rr" * len(weights), rows),
                 plot=_image("weight magnitude histograms", plot))


def _arm_description(cfg: CompareConfig, arm: str, results: list[dict]) -> str:
    if arm == "large-batch":
        return (f"Global batch × {cfg.large_batch_factor} ({cfg.global_batch_tokens * cfg.large_batch_factor:,} "
                f"tokens), {cfg.max_steps // cfg.large_batch_factor} steps: the same tokens as the baseline, "
                f"the same peak LR and schedule in tokens.")
    sched = cfg.outlier_schedule(0)
    events = [len(r["events"]) for r in results if r["arm"] == "outliers" and r["ok"]]
    mode = (f"in every trainable tensor, {sched.fraction:g} of the entries (at least one) get ± {sched.scale:g} × "
            f"the tensor's gradient RMS added, before clipping at global norm 1.0." if sched.mode == "spike" else
            f"the whole gradient is multiplied by {sched.scale:g}, before clipping at global norm 1.0.")
    return (f"The baseline run plus injected outlier gradients: each micro-batch after the first 5% is an event "
            f"with probability {sched.rate:g} (seeded 1000 + seed, the same events for every optimizer; "
            f"{_f(mean(events), '.0f')} events per run). Mode `{sched.mode}`: {mode}")


def _arm_sections(cfg: CompareConfig, summary: dict, results: list[dict], plot: Optional[str]) -> str:
    parts = []
    for arm in ("outliers", "large-batch"):
        if arm not in summary["robustness"]:
            continue
        rows = [[o, _f(summary["final"]["baseline"][o]["mean"]), _f(summary["final"][arm][o]["mean"]),
                 _f(mean(summary["robustness"][arm][o]["deltas"]), "+.4f")] for o in cfg.optimizers]
        table = _table(["optimizer", "baseline loss", "this arm's loss", "change (nats)"], "lrrr", rows)
        parts.append(_fill("arm.md", heading="Outlier-gradient ablation" if arm == "outliers" else "Large batch",
                           description=_arm_description(cfg, arm, results), table=table,
                           plot=_image("outlier arm", plot) if arm == "outliers" else ""))
    return "\n".join(parts)


def _optional_sections(cfg: CompareConfig, results: list[dict], summary: dict, plots: dict[str, Optional[str]]) -> str:
    """Pruning, weights, the other arms and δ: the sections there is something to show for, a blank line after
    each."""
    parts = (_pruning_section(cfg, summary, plots["pruning"]), _weights_section(summary, plots["hist"]),
             _arm_sections(cfg, summary, results, plots["outliers"]),
             _fill("deltas.md", plot=plots["deltas"]) if plots["deltas"] else "")
    return "".join(p + "\n" for p in parts if p)


def render_report(cfg: CompareConfig, results: list[dict], summary: dict, meta: dict,
                  plots: dict[str, Optional[str]]) -> str:
    """The text of ``report.md``."""
    curves = "\n\n".join(x for x in (_image("validation loss vs tokens", plots["tokens"]),
                                     _image("validation loss vs wall-clock", plots["time"])) if x)
    text = _fill(
        "report.md",
        title=f"{' vs '.join(cfg.optimizers)}: {cfg.model}, preset {cfg.preset}",
        generated=time.strftime("%Y-%m-%d %H:%M", time.localtime(meta["started"])),
        verdict=_verdict_block(cfg, summary), failed=_failed(summary), command=meta["command"],
        machine=_machine_line(results, meta), wall=_wall_line(cfg, results, meta),
        model=_model_line(cfg, results, meta), seeds=cfg.seeds, seed_rule=_seed_rule(cfg), nproc=cfg.nproc,
        weight_decay=f"{cfg.weight_decay:g}", eval_interval=cfg.eval_interval, eval_batches=cfg.eval_batches,
        micro_batch=cfg.micro_batch,
        final_eval=(f"{cfg.final_eval_batches} micro-batches" if cfg.final_eval_batches else
                    f"the whole validation split ({meta['val_batches']} micro-batches)"),
        optimizer_table=_optimizer_table(cfg, results), run_table=_run_table(results),
        final_table=_final_table(cfg, summary), curve_plots=curves + "\n\n" if curves else "",
        target=_target(cfg), reference=cfg.reference, speedup_table=_speedup_table(cfg, summary),
        sections=_optional_sections(cfg, results, summary, plots),
        loss_rule=loss_rule(cfg), speedup_tolerance=f"{cfg.speedup_tolerance:g}",
        paper_speedup=f"{PAPER_CLAIMS['speedup']:.2f}", prune_tolerance=f"{cfg.prune_tolerance:.0%}",
        paper_prune=f"{PAPER_CLAIMS['prune_sparsity']:.0%}",
    )
    return re.sub(r"\n{3,}", "\n\n", text)  # an optional part left out leaves no gap


def write_report(cfg: CompareConfig, results: list[dict], summary: dict, meta: dict) -> Path:
    """Write ``report.md``, ``results.json`` and the PNGs into ``cfg.out_dir``; the report's path."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(cfg, results, summary, out)
    (out / "report.md").write_text(render_report(cfg, results, summary, meta, plots))
    slim = [{k: v for k, v in r.items() if k != "train"} for r in results]
    (out / "results.json").write_text(json.dumps({"config": cfg.to_dict(), "meta": meta, "summary": summary,
                                                  "runs": slim}, indent=1, default=str) + "\n")
    return out / "report.md"
