"""AdamHD against AdamW (or any optimizer a DeepSpeed config names) on one model: the whole comparison.

``launch/compare.py`` (:mod:`adamhd_study.cli`) is the command line; :func:`run_comparison` goes through

1. plan (:mod:`adamhd_study.plan`): every optimizer × arm × seed as a pre-training job with its own run directory,
   the same model, data, seed, schedule and token budget. Arms: ``baseline``; ``large-batch``
   (``large_batch_factor`` × the global batch, as many fewer steps, so the same tokens); ``outliers`` (the
   baseline with rare injected outlier gradients, the same events for every optimizer);
2. execute (:mod:`adamhd_study.execute`): the runs as subprocesses, ``parallel`` at a time, each on its own port
   with ``MASTER_ADDR=127.0.0.1`` and a time limit, after the C++ ops they load are built once in this process;
   a run directory that holds the finished run is reused;
3. collect (:mod:`adamhd_study.collect`): each run's curves, δ and events, its final weights evaluated, pruned
   and histogrammed;
4. stats and summary (:mod:`adamhd_study.stats`, :mod:`adamhd_study.summary`, :mod:`adamhd_study.verdict`): the
   numbers, the judgements and the verdict;
5. report (:mod:`adamhd_study.report`): ``report.md`` from its templates, ``results.json`` and the PNG plots.

What counts as a real difference (stated in the report): a loss difference larger than ``min_effect`` nats
(default 0.01, about 1% perplexity) and, with two seeds or more, significant in a two-sided paired t test at level
``alpha`` (default 0.05) on the per-seed differences; a speed-up further from 1 than ``speedup_tolerance``
(default 5%); a pruned model "tolerates" a sparsity while its perplexity stays within ``prune_tolerance``
(default 5%) of the unpruned one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from adamhd_train.manifest import hardware_info, package_versions

from .collect import collect, final_val_batches, prepare
from .config import CompareConfig
from .execute import STATUS_FILE, execute, read_status, threads_per_run
from .plan import check_run_dirs, plan_runs
from .report import write_report
from .summary import summarize

__all__ = ["run_comparison"]


def _machine() -> dict:
    hw = hardware_info()
    pk = package_versions()
    gpus = ", ".join(g.get("name", "?") for g in hw.get("gpus") or []) or "none"
    return {"cpu": hw.get("cpu"), "cpus": hw.get("cpus_available"), "gpus": gpus, "host": hw.get("host"),
            "memory_gb": round((hw.get("memory_bytes") or 0) / 2**30, 1), "torch": pk.get("torch"),
            "deepspeed": pk.get("deepspeed"), "python": pk.get("python")}


def _earlier_status(runs) -> dict[str, dict]:
    """``--report-only``: the status each run left, or none (the run then counts as failed)."""
    return {run.name: dict(read_status(run), reused=True) if (run.run_dir / STATUS_FILE).is_file() else
            {"returncode": None, "log": str(run.run_dir / "launcher.log")} for run in runs}


def run_comparison(cfg: CompareConfig, *, command: str = "", report_only: bool = False,
                   say: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Plan, run (unless ``report_only``), collect, summarize and report; returns the report's path and the
    summary."""
    t0, started, load_start = time.perf_counter(), time.time(), os.getloadavg()[0]
    runs = plan_runs(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"[compare] {len(runs)} runs: {', '.join(cfg.optimizers)} x {', '.join(cfg.arms)} x {cfg.seeds} seed(s); "
        f"model {cfg.model}, {cfg.max_steps} steps of {cfg.global_batch_tokens:,} tokens; output {out}")
    check_run_dirs(runs, cfg)
    data = prepare(cfg, say=say)
    child_cpu: Optional[float] = None
    runs_wall: Optional[float] = None
    if report_only:
        status = _earlier_status(runs)
    else:
        t_runs, before = time.perf_counter(), os.times()
        status = execute(runs, cfg, say=say)
        after = os.times()
        child_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        runs_wall = time.perf_counter() - t_runs
    results = collect(runs, status, cfg, data, say=say)
    summary = summarize(cfg, results)
    meta = {"command": command, "started": started, "machine": _machine(), "load_start": load_start,
            "load_end": os.getloadavg()[0], "total_s": time.perf_counter() - t0, "runs_wall_s": runs_wall,
            "runs_cpu_s": child_cpu, "threads": threads_per_run(cfg),
            "data": {"train_tokens": data.train_tokens, "val_tokens": data.val_tokens, "folder": str(data.folder)},
            "val_batches": len(final_val_batches(cfg, data))}
    report = write_report(cfg, results, summary, meta)
    say(f"[compare] report: {report} ({meta['total_s'] / 60:.1f} min)")
    return report, summary
