"""The runs of a comparison: every optimizer × every arm × every seed, each a normal pre-training job with its own
run directory (:func:`plan_runs`), its command line (:func:`command_for`), and the check that a run directory
left by an earlier invocation holds the same run (:func:`check_run_dirs`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import CompareConfig

__all__ = ["RunSpec", "plan_runs", "command_for", "run_spec", "check_run_dirs", "LAUNCHER_MODULE", "RUNNER_MODULE"]

LAUNCHER_MODULE = "adamhd_train.cli"
"""What ``launch/pretrain_gpt3.py`` runs, started as a module (the installed package, whatever the folder)."""
RUNNER_MODULE = "adamhd_study.compare_runner"
"""The launcher with outlier gradients injected (the outlier arm)."""


@dataclass
class RunSpec:
    """One training run of the comparison."""

    arm: str
    optimizer: str
    seed: int
    run_dir: Path
    global_batch_tokens: int
    max_steps: int
    eval_interval: int
    outliers: Optional[dict] = None
    """The outlier schedule's fields (outlier arm), else None."""

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.optimizer}-s{self.seed}"

    @property
    def events_file(self) -> Path:
        return self.run_dir / "outliers.jsonl"

    def launcher_args(self, cfg: CompareConfig) -> list[str]:
        """The ``pretrain_gpt3.py`` options of this run."""
        args = ["--deepspeed", str(cfg.config_path(self.optimizer)), "--model", cfg.model,
                "--seq-len", str(cfg.seq_len), "--global-batch-tokens", str(self.global_batch_tokens),
                "--micro-batch", str(cfg.micro_batch), "--max-steps", str(self.max_steps),
                "--weight-decay", repr(float(cfg.weight_decay)), "--seed", str(self.seed),
                "--ramp-tokens", "0", "--data", cfg.data, "--tokenizer", cfg.tokenizer,
                "--val-fraction", repr(float(cfg.val_fraction)), "--out-dir", str(self.run_dir),
                "--eval-interval", str(self.eval_interval), "--eval-batches", str(cfg.eval_batches),
                "--save-interval", str(self.max_steps), "--keep-checkpoints", "1", "--log-interval", "1",
                "--no-tensorboard"]
        optional = (("--lr", None if cfg.lr is None else repr(float(cfg.lr))), ("--vocab-size", cfg.vocab_size),
                    ("--max-chars", cfg.max_chars), ("--data-cache", cfg.data_cache), ("--dtype", cfg.dtype))
        for flag, value in optional:
            if value is not None:
                args += [flag, str(value)]
        return args


def plan_runs(cfg: CompareConfig) -> list[RunSpec]:
    """Every run of the comparison, ordered seed by seed and arm by arm, the optimizers of one arm adjacent (so
    with ``parallel >= len(optimizers)`` they run side by side)."""
    runs = []
    root = Path(cfg.out_dir) / "runs"
    for seed in range(cfg.seeds):
        for arm in cfg.arms:
            for opt in cfg.optimizers:
                batch, steps, every, outliers = cfg.global_batch_tokens, cfg.max_steps, cfg.eval_interval, None
                if arm == "large-batch":
                    batch *= cfg.large_batch_factor
                    steps //= cfg.large_batch_factor
                    every = max(1, every // cfg.large_batch_factor)
                if arm == "outliers":
                    accum = cfg.global_batch_tokens // cfg.seq_len // cfg.micro_batch // cfg.nproc
                    outliers = cfg.outlier_schedule(seed, max(1, accum)).to_dict()
                runs.append(RunSpec(arm, opt, seed, root / f"{arm}-{opt}-s{seed}", batch, steps, every, outliers))
    return runs


def command_for(run: RunSpec, cfg: CompareConfig, port: int) -> list[str]:
    """The command line that starts ``run``: the launcher itself, or the outlier runner around it; under the
    ``deepspeed`` launcher when ``cfg.nproc > 1``."""
    module = [RUNNER_MODULE, "--outliers", json.dumps(run.outliers), "--outlier-events", str(run.events_file)] \
        if run.outliers else [LAUNCHER_MODULE]
    args = run.launcher_args(cfg)
    if cfg.nproc == 1:
        return [sys.executable, "-m"] + module + args + ["--master-port", str(port)]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [str(deepspeed), "--num_gpus", str(cfg.nproc), "--master_addr", "127.0.0.1", "--master_port",
            str(port), "--module"] + module + args


def run_spec(run: RunSpec, cfg: CompareConfig) -> dict:
    """What defines a run, as written to its ``compare_spec.json`` when it starts."""
    return {"launcher_args": run.launcher_args(cfg), "outliers": run.outliers}


def check_run_dirs(runs: list[RunSpec], cfg: CompareConfig) -> None:
    """Refuse to reuse or continue a run directory that holds a run with other settings (``compare_spec.json``,
    written when a run starts): a ``ValueError`` naming the run and what differs."""
    for run in runs:
        path = run.run_dir / "compare_spec.json"
        if not path.is_file():
            continue
        old, new = json.loads(path.read_text()), run_spec(run, cfg)
        if old == new:
            continue
        a, b = old.get("launcher_args", []), new["launcher_args"]
        diff = [x for x in b if x not in a] + ([f"outliers {old.get('outliers')} -> {new['outliers']}"]
                                               if old.get("outliers") != new["outliers"] else [])
        raise ValueError(f"{str(run.run_dir)!r} holds the run {run.name} with other settings (now: "
                         f"{' '.join(map(str, diff)) or 'a different option order'}); use another --out-dir, or "
                         f"remove that folder to run it again")
