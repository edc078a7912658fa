"""AdamHD against AdamW (or any optimizer a DeepSpeed config names) on one model: the runs and the report.

``launch/compare.py`` is the command line; this module does the work:

1. :func:`plan_runs` turns a :class:`CompareConfig` into runs: every optimizer × every arm × every seed, each a
   normal ``launch/pretrain_gpt3.py`` job with its own run directory, the same model, data, seed, schedule and
   token budget. Arms: ``baseline``; ``large-batch`` (``large_batch_factor`` × the global batch, as many fewer
   steps, so the same tokens); ``outliers`` (the baseline with rare injected outlier gradients, the same events
   for every optimizer: :class:`~adamhd_study.analysis.OutlierSchedule`).
2. :func:`execute` starts the runs as subprocesses (``parallel`` at a time; on a CPU machine the optimizers of one
   arm and seed run side by side, so they share the machine's load), each with ``MASTER_ADDR=127.0.0.1`` and its
   own port, and a time limit. A run directory that already holds the finished run is reused.
3. :func:`collect` reads each run back (``metrics.jsonl``, ``deltas.jsonl``, the manifest, the outlier events,
   the final checkpoint's fp32 weights), evaluates the final weights on the validation split, magnitude-prunes
   the baseline arm's weights at each sparsity and evaluates again, and histograms the weight magnitudes.
4. :func:`write_report` writes ``report.md``, ``results.json`` and the PNG plots into the output folder, with a
   verdict generated from the measured numbers and the thresholds stated in the report.

What counts as a real difference (all stated in the report): a loss difference larger than ``min_effect`` nats
(default 0.01, about 1% perplexity) and, with two seeds or more, larger than twice the standard error of the
per-seed paired differences; a speed-up further from 1 than ``speedup_tolerance`` (default 5%); a pruned model
"tolerates" a sparsity while its perplexity stays within ``prune_tolerance`` (default 5%) of the unpruned one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from adamhd_train.ports import free_port

__all__ = [
    "ARMS",
    "PRESETS",
    "CompareConfig",
    "RunSpec",
    "preset",
    "tiny",
    "gpt3_small",
    "plan_runs",
    "execute",
    "collect",
    "summarize",
    "write_report",
    "run_comparison",
    "load_final_weights",
    "check_run_dirs",
]

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "pretrain_gpt3.py"
RUNNER = Path(__file__).resolve().with_name("compare_runner.py")

ARMS = ("baseline", "large-batch", "outliers")
"""The arms a comparison can run (``CompareConfig.arms``)."""
DEFAULT_OPTIMIZERS = {"adamhd": "ds_configs/zero2_adamhd.json", "adamw": "ds_configs/zero2_adamw.json"}
PAPER_CLAIMS = {
    "speedup": 1.10,
    "perplexity_points": 4.0,
    "prune_sparsity": 0.20,
}
"""The paper's claims as thresholds: ≥ 10% faster wall-clock (10-15% claimed), up to 4 points lower validation
perplexity, 20-30% of the weights prunable (read here: the perplexity stays within ``prune_tolerance`` at ≥ 20%
sparsity, and at a higher sparsity than the reference's)."""
HIST_EDGES = (1e-6, 10.0, 70)
"""Weight-magnitude histogram bins: log-spaced from 1e-6 to 10, 70 bins (10 per decade); smaller magnitudes,
exact zeros included, are counted in the first bin."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class CompareConfig:
    """Everything a comparison runs. Presets are functions (:func:`tiny`, :func:`gpt3_small`); the command line
    overrides fields. Validated on construction: errors name the field (as its command-line flag) and the allowed
    values."""

    preset: str
    """Name of the preset the values came from (for the report)."""
    model: str
    """Model size, from :data:`adamhd_train.models.MODEL_NAMES`."""
    max_steps: int
    """Optimizer steps of the baseline arm (the large-batch arm runs ``max_steps // large_batch_factor``)."""
    seq_len: int
    """Tokens per sequence."""
    global_batch_tokens: int
    """Tokens per optimizer step in the baseline arm."""
    micro_batch: int
    """Sequences per rank per forward pass (all arms)."""
    out_dir: str
    """Output folder: ``runs/`` with one run directory per run, ``report.md``, ``results.json``, the PNGs."""
    lr: Optional[float] = None
    """Peak learning rate of every optimizer (None: the model's default from the GPT-3 table)."""
    weight_decay: float = 0.1
    """λ of every optimizer (decoupled decay of the matrices and embeddings)."""
    seeds: int = 1
    """Seeds per arm and optimizer: seeds 0 .. seeds-1 (model initialisation and data order)."""
    arms: tuple = ARMS
    """Which arms to run, from :data:`ARMS`; ``baseline`` is required (the others are compared against it)."""
    optimizers: dict = field(default_factory=lambda: dict(DEFAULT_OPTIMIZERS))
    """``{name: DeepSpeed config path}``; each config's ``"optimizer"`` section names the optimizer."""
    reference: str = "adamw"
    """The optimizer the others are compared against (a key of ``optimizers``)."""
    large_batch_factor: int = 4
    """Global-batch multiplier of the ``large-batch`` arm (the steps are divided by it: same tokens)."""
    outlier_rate: float = 0.02
    """Share of micro-batches with an outlier gradient in the ``outliers`` arm."""
    outlier_scale: float = 100.0
    """Spike size in units of a tensor's gradient RMS (``spike`` mode), or the gradient multiplier (``scale``)."""
    outlier_fraction: float = 1e-3
    """Share of each tensor's entries spiked at an outlier event."""
    outlier_mode: str = "spike"
    """``"spike"`` (sparse large entries) or ``"scale"`` (whole gradient × ``outlier_scale``)."""
    sparsities: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    """Magnitude-pruning sparsities evaluated on the baseline arm's final weights."""
    prune_scope: str = "global"
    """``"global"`` (one magnitude threshold over all decayed matrices) or ``"layer"`` (the sparsity per tensor)."""
    target_loss: Optional[float] = None
    """Validation loss for steps-to-target (None: per arm and seed, the higher of the reference's and the
    candidate's final validation losses, i.e. the loss both reached)."""
    eval_interval: int = 20
    """Steps between validation passes of the baseline arm (the large-batch arm: divided by the factor)."""
    eval_batches: int = 8
    """Validation micro-batches per pass during training (the loss curves)."""
    final_eval_batches: Optional[int] = None
    """Validation micro-batches for the final and pruned evaluations (None: the whole validation split)."""
    data: str = "embedded"
    """Corpus: ``"embedded"``, a .txt/.jsonl file or folder, or a hub dataset name."""
    tokenizer: str = "local-bpe"
    """``"local-bpe"`` or a hub tokenizer name."""
    vocab_size: Optional[int] = 2048
    """Vocabulary of the local BPE (None for a hub tokenizer)."""
    max_chars: Optional[int] = None
    """Cap on the corpus in characters (None: all)."""
    val_fraction: float = 0.01
    """Share of the corpus held out for validation."""
    data_cache: Optional[str] = None
    """Token cache (None: the launcher's default, ``$ADAMHD_DATA_CACHE`` or ``~/.cache/adamhd_dist``)."""
    dtype: Optional[str] = None
    """Training precision for every run (None: the launcher's choice: the config's, fp32 on a CPU)."""
    nproc: int = 1
    """Ranks per run: 1 runs the launcher as one process; more start it with the ``deepspeed`` launcher."""
    parallel: int = 1
    """Runs at the same time (each gets ``cpus // (parallel · nproc)`` threads on a CPU machine)."""
    run_timeout_s: float = 3600.0
    """Wall-clock limit per run; a run past it is stopped and reported as failed."""
    min_effect: float = 0.01
    """Smallest validation-loss difference (nats) counted as real, whatever the seed noise."""
    speedup_tolerance: float = 0.05
    """Speed-ups within 1 ± this are reported as no measurable difference."""
    prune_tolerance: float = 0.05
    """Relative perplexity increase a pruned model may have and still count as tolerating the sparsity."""

    def __post_init__(self):
        from adamhd_train.models import MODEL_NAMES

        if self.model not in MODEL_NAMES:
            raise ValueError(f"--model: unknown model {self.model!r} (allowed: {', '.join(MODEL_NAMES)})")
        for name in ("max_steps", "seq_len", "global_batch_tokens", "micro_batch", "seeds", "large_batch_factor",
                     "eval_interval", "eval_batches", "nproc", "parallel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{_flag(name)} must be a positive integer, got {v!r}")
        if self.final_eval_batches is not None and (isinstance(self.final_eval_batches, bool) or not isinstance(
                self.final_eval_batches, int) or self.final_eval_batches <= 0):
            raise ValueError(f"--final-eval-batches must be a positive integer or omitted (whole validation split), "
                             f"got {self.final_eval_batches!r}")
        if self.global_batch_tokens % self.seq_len:
            raise ValueError(f"--global-batch-tokens ({self.global_batch_tokens}) must be a multiple of --seq-len "
                             f"({self.seq_len})")
        self.arms = tuple(self.arms)
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f"--arms: unknown arm(s) {bad} (allowed: {', '.join(ARMS)})" if bad else
                             f"--arms: give at least 'baseline' (allowed: {', '.join(ARMS)})")
        if "baseline" not in self.arms:
            raise ValueError(f"--arms must include 'baseline' (the other arms are measured against it), got "
                             f"{','.join(self.arms)}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"--arms lists an arm twice: {','.join(self.arms)}")
        self.arms = tuple(a for a in ARMS if a in self.arms)
        if "large-batch" in self.arms and self.max_steps < self.large_batch_factor:
            raise ValueError(f"--max-steps ({self.max_steps}) must be >= --large-batch-factor "
                             f"({self.large_batch_factor}) for the large-batch arm to take a step")
        if not isinstance(self.optimizers, dict) or len(self.optimizers) < 2:
            raise ValueError(f"--optimizer: give at least two optimizers as NAME=CONFIG, got "
                             f"{self.optimizers!r}")
        for name, path in self.optimizers.items():
            if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ValueError(f"--optimizer: name {name!r} must be non-empty letters, digits, '-', '_' or '.'")
            if not Path(path).is_file() and not (ROOT / path).is_file():
                raise ValueError(f"--optimizer {name}={path}: no such DeepSpeed config file")
        if self.reference not in self.optimizers:
            raise ValueError(f"--reference {self.reference!r} is not one of the optimizers "
                             f"({', '.join(self.optimizers)})")
        for name in ("weight_decay", "min_effect", "speedup_tolerance", "prune_tolerance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{_flag(name)} must be a finite number >= 0, got {v!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        self.sparsities = tuple(float(s) for s in self.sparsities)
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise ValueError(f"--sparsities must be numbers in [0, 1), got {self.sparsities!r}")
        self.sparsities = tuple(sorted(set(self.sparsities) | {0.0}))
        if self.prune_scope not in ("global", "layer"):
            raise ValueError(f"--prune-scope must be 'global' or 'layer', got {self.prune_scope!r}")
        if self.target_loss is not None and not (isinstance(self.target_loss, (int, float))
                                                 and math.isfinite(self.target_loss)):
            raise ValueError(f"--target-loss must be a finite number, got {self.target_loss!r}")
        if self.dtype not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"--dtype must be one of fp32, bf16, fp16 (or omitted), got {self.dtype!r}")
        if not (isinstance(self.run_timeout_s, (int, float)) and self.run_timeout_s > 0):
            raise ValueError(f"--run-timeout must be a positive number of seconds, got {self.run_timeout_s!r}")
        self.outlier_schedule(0)  # validates the outlier fields

    def outlier_schedule(self, seed: int, accum_steps: int = 1) -> "Any":
        """The :class:`~adamhd_study.analysis.OutlierSchedule` of the outlier arm for training seed ``seed``: seeded
        ``1000 + seed`` (the same for every optimizer), no events during the first 5% of the micro-batches (the
        LR warmup)."""
        from .analysis import OutlierSchedule

        try:
            return OutlierSchedule(seed=1000 + seed, rate=self.outlier_rate, scale=self.outlier_scale,
                                   fraction=self.outlier_fraction, mode=self.outlier_mode,
                                   start=(self.max_steps * accum_steps) // 20)
        except ValueError as e:
            raise ValueError(f"--{str(e).replace('outlier ', 'outlier-', 1)}") from None

    def config_path(self, optimizer: str) -> Path:
        """The DeepSpeed config file of ``optimizer`` (relative paths: from the working directory, else the
        repository root)."""
        p = Path(self.optimizers[optimizer])
        return (p if p.is_file() else ROOT / p).resolve()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arms"], d["sparsities"] = list(self.arms), list(self.sparsities)
        return d


def tiny(out_dir: str = "runs/compare-tiny") -> CompareConfig:
    """The CPU preset: the ``tiny`` model (4 layers, d_model 128, ~1.07M parameters with a 2048-token BPE)
    on 4M characters of the embedded corpus (Python's own sources, no download), 320 steps of 2,048 tokens
    (655k tokens, about half an epoch), validation every 16 steps, final and pruned models on 16 validation
    micro-batches (32k tokens), one seed; the two optimizers of an arm run side by side on one thread each.
    Six runs (3 arms × 2 optimizers) within 15 minutes on 2 CPU cores."""
    return CompareConfig(preset="tiny", model="tiny", max_steps=320, seq_len=128, global_batch_tokens=2048,
                         micro_batch=16, out_dir=out_dir, eval_interval=16, eval_batches=8,
                         final_eval_batches=16, data="embedded", tokenizer="local-bpe", vocab_size=2048,
                         max_chars=4_000_000, val_fraction=0.05, parallel=2, run_timeout_s=1800.0)


def gpt3_small(out_dir: str = "runs/compare-gpt3-small") -> CompareConfig:
    """The GPU preset: GPT-3 Small (125M) with GPT-3's batch (0.5M tokens), LR 6e-4, betas (0.9, 0.95), weight
    decay 0.1 and clipping at 1.0, for 2,000 steps (1.05B tokens) on OpenWebText with the GPT-2 tokenizer (a
    download on first use; give --data for a local corpus), one run at a time on all local GPUs."""
    try:
        import torch

        gpus = max(1, torch.cuda.device_count())
    except ImportError:
        gpus = 1
    return CompareConfig(preset="gpt3-small", model="gpt3-small", max_steps=2000, seq_len=2048,
                         global_batch_tokens=524_288, micro_batch=16, out_dir=out_dir, eval_interval=100,
                         eval_batches=20, final_eval_batches=50, data="openwebtext", tokenizer="gpt2",
                         vocab_size=None, max_chars=None, val_fraction=0.005, nproc=gpus, parallel=1,
                         run_timeout_s=24 * 3600.0)


PRESETS: dict[str, Callable[..., CompareConfig]] = {"tiny": tiny, "gpt3-small": gpt3_small}
"""Preset name -> function returning its :class:`CompareConfig`."""


def preset(name: str, **overrides) -> CompareConfig:
    """The preset ``name`` with fields replaced by ``overrides`` (validated again)."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r} (allowed: {', '.join(PRESETS)})")
    base = PRESETS[name]()
    names = {f.name for f in dataclasses.fields(CompareConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown CompareConfig field(s) {unknown} (allowed: {sorted(names)})")
    return dataclasses.replace(base, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# planning
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
        if cfg.lr is not None:
            args += ["--lr", repr(float(cfg.lr))]
        if cfg.vocab_size is not None:
            args += ["--vocab-size", str(cfg.vocab_size)]
        if cfg.max_chars is not None:
            args += ["--max-chars", str(cfg.max_chars)]
        if cfg.data_cache is not None:
            args += ["--data-cache", str(cfg.data_cache)]
        if cfg.dtype is not None:
            args += ["--dtype", cfg.dtype]
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


# ----------------------------------------------------------------------------------------------------------------
# running
def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def command_for(run: RunSpec, cfg: CompareConfig, port: int) -> list[str]:
    """The command line that starts ``run``: the launcher itself, or the outlier runner around it; under the
    ``deepspeed`` launcher when ``cfg.nproc > 1``."""
    script = [str(RUNNER), "--outliers", json.dumps(run.outliers), "--outlier-events", str(run.events_file)] \
        if run.outliers else [str(LAUNCHER)]
    args = run.launcher_args(cfg)
    if cfg.nproc == 1:
        return [sys.executable] + script + args + ["--master-port", str(port)]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [str(deepspeed), "--num_gpus", str(cfg.nproc), "--master_addr", "127.0.0.1", "--master_port",
            str(port)] + script + args


def _spec(run: RunSpec, cfg: CompareConfig) -> dict:
    return {"launcher_args": run.launcher_args(cfg), "outliers": run.outliers}


def check_run_dirs(runs: list[RunSpec], cfg: CompareConfig) -> None:
    """Refuse to reuse or continue a run directory that holds a run with other settings (``compare_spec.json``,
    written when a run starts): a ``ValueError`` naming the run and what differs."""
    for run in runs:
        path = run.run_dir / "compare_spec.json"
        if not path.is_file():
            continue
        old, new = json.loads(path.read_text()), _spec(run, cfg)
        if old == new:
            continue
        a, b = old.get("launcher_args", []), new["launcher_args"]
        diff = [x for x in b if x not in a] + ([f"outliers {old.get('outliers')} -> {new['outliers']}"]
                                               if old.get("outliers") != new["outliers"] else [])
        raise ValueError(f"{str(run.run_dir)!r} holds the run {run.name} with other settings (now: "
                         f"{' '.join(map(str, diff)) or 'a different option order'}); use another --out-dir, or "
                         f"remove that folder to run it again")


def _finished(run: RunSpec) -> bool:
    from adamhd_train.checkpoints import latest_checkpoint

    found = latest_checkpoint(run.run_dir / "checkpoints")
    return (found is not None and found[0] >= run.max_steps and (run.run_dir / "metrics.jsonl").is_file()
            and (run.run_dir / "compare_status.json").is_file()
            and json.loads((run.run_dir / "compare_status.json").read_text()).get("returncode") == 0)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
    except ProcessLookupError:
        pass


def execute(runs: list[RunSpec], cfg: CompareConfig, *, say: Callable[[str], None] = print) -> dict[str, dict]:
    """Start every run not finished yet (``cfg.parallel`` at a time), wait for all; ``{run name: status}`` with
    ``returncode``, ``wall_s``, ``command``, ``log``, ``threads`` and ``reused`` (True when the run directory
    already held the finished run). Output of each run goes to ``<run dir>/launcher.log``.

    The runs of one arm and seed (one per optimizer) start together, and only when there are slots for all of
    them, so the optimizers being compared share the machine for their whole run: their wall-clock figures see
    the same background load."""
    threads = max(1, _cpus() // (cfg.parallel * cfg.nproc))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1")
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        on_gpu = False
    if not on_gpu:
        env["OMP_NUM_THREADS"] = str(threads)
    pending: list[list[RunSpec]] = []
    for run in runs:
        if pending and (pending[-1][0].arm, pending[-1][0].seed) == (run.arm, run.seed) \
                and len(pending[-1]) < cfg.parallel:
            pending[-1].append(run)
        else:
            pending.append([run])
    active: list[tuple[RunSpec, subprocess.Popen, float, Any, list[str]]] = []
    status: dict[str, dict] = {}

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM stops the running children too (they run in their own sessions, out of reach of a group kill)
    old_handler = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    try:
        while pending or active:
            while pending and len(active) + len(pending[0]) <= cfg.parallel:
                for run in pending.pop(0):
                    if _finished(run):
                        st = json.loads((run.run_dir / "compare_status.json").read_text())
                        status[run.name] = dict(st, reused=True)
                        say(f"[compare] {run.name}: finished earlier in {run.run_dir}, reused")
                        continue
                    run.run_dir.mkdir(parents=True, exist_ok=True)
                    (run.run_dir / "compare_spec.json").write_text(json.dumps(_spec(run, cfg), indent=1) + "\n")
                    cmd = command_for(run, cfg, free_port())
                    log = open(run.run_dir / "launcher.log", "w")
                    log.write("$ " + shlex.join(cmd) + "\n")
                    log.flush()
                    say(f"[compare] {run.name}: started ({threads} thread(s))")
                    proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                    active.append((run, proc, time.perf_counter(), log, cmd))
            time.sleep(0.5)
            still = []
            for run, proc, t0, log, cmd in active:
                elapsed = time.perf_counter() - t0
                code = proc.poll()
                if code is None and elapsed > cfg.run_timeout_s:
                    _kill(proc)
                    code = 124
                    log.write(f"\n[compare] stopped after {elapsed:.0f} s (--run-timeout {cfg.run_timeout_s:g})\n")
                if code is None:
                    still.append((run, proc, t0, log, cmd))
                    continue
                log.close()
                st = {"returncode": code, "wall_s": elapsed, "command": shlex.join(cmd), "threads": threads,
                      "log": str(run.run_dir / "launcher.log"), "finished": time.time()}
                (run.run_dir / "compare_status.json").write_text(json.dumps(st, indent=1) + "\n")
                status[run.name] = dict(st, reused=False)
                say(f"[compare] {run.name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {elapsed:.0f} s")
            active = still
    finally:
        for _, proc, _, log, _ in active:
            _kill(proc)
            log.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return status


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------------------------
# reading runs back
def load_final_weights(run_dir: Path | str, step: Optional[int] = None) -> dict:
    """The fp32 model state dict of a run's checkpoint (default: the newest), by parameter name.

    DeepSpeed checkpoints written through :mod:`adamhd_dist.deepspeed` (AdamHD) are read with its
    ``export_checkpoint``; other DeepSpeed optimizers with DeepSpeed's own ``zero_to_fp32``; an FSDP2 checkpoint
    with ``torch.distributed.checkpoint``'s converter.
    """
    import torch

    from adamhd_train.checkpoints import latest_checkpoint, list_checkpoints

    root = Path(run_dir) / "checkpoints"
    found = latest_checkpoint(root) if step is None else next(((s, p) for s, p in list_checkpoints(root)
                                                              if s == step), None)
    if found is None:
        raise FileNotFoundError(f"{str(run_dir)!r} holds no complete checkpoint"
                                + (f" at step {step}" if step is not None else ""))
    folder = found[1]
    if (folder / "dcp").is_dir():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(folder / "dcp"), str(Path(tmp) / "full.pt"))
            return {k: v.float() for k, v in torch.load(Path(tmp) / "full.pt", weights_only=False)["model"].items()
                    if torch.is_tensor(v)}
    from adamhd_dist.deepspeed import export_checkpoint

    try:
        return export_checkpoint(root, folder.name)["model"]
    except ValueError:
        pass
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=folder.name))


def _prepare(cfg: CompareConfig, *, say: Callable[[str], None]) -> Any:
    from adamhd_train.data import prepare_data

    say("[compare] preparing the data once for all runs")
    return prepare_data(cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, cache_dir=cfg.data_cache,
                        val_fraction=cfg.val_fraction, max_chars=cfg.max_chars, progress=False)


def _evaluate(model, batches, device) -> float:
    import torch

    from adamhd_train.engine import lm_loss

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for window in batches:
            window = window.to(device)
            total += float(lm_loss(model(input_ids=window[:, :-1]).logits, window[:, 1:]))
            n += 1
    return total / max(n, 1)


def collect(runs: list[RunSpec], status: dict[str, dict], cfg: CompareConfig, data, *,
            say: Callable[[str], None] = print) -> list[dict]:
    """Read every run back and measure its final weights; one result dict per run (see :func:`summarize`)."""
    import numpy as np
    import torch

    from .analysis import decayed_tensors, layer_type, magnitude_histograms, prune_model_, small_weight_fraction
    from adamhd_train.data import ValBatches
    from adamhd_train.manifest import read_manifest
    from adamhd_train.metrics import read_metrics
    from adamhd_train.models import build_model

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(_cpus())
    val = ValBatches(data, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, max_batches=cfg.final_eval_batches)
    edges = np.logspace(math.log10(HIST_EDGES[0]), math.log10(HIST_EDGES[1]), HIST_EDGES[2] + 1)
    results = []
    for run in runs:
        st = status.get(run.name, {})
        res: dict[str, Any] = {"name": run.name, "arm": run.arm, "optimizer": run.optimizer, "seed": run.seed,
                               "run_dir": str(run.run_dir), "global_batch_tokens": run.global_batch_tokens,
                               "max_steps": run.max_steps, "outliers": run.outliers,
                               "returncode": st.get("returncode"), "wall_s": st.get("wall_s"),
                               "threads": st.get("threads"), "reused": st.get("reused", False), "ok": False}
        results.append(res)
        metrics = read_metrics(run.run_dir / "metrics.jsonl")
        res["curve"] = [{k: r.get(k) for k in ("step", "tokens", "elapsed_s", "val_loss")}
                        for r in metrics if r.get("val_loss") is not None]
        res["train"] = [{k: r.get(k) for k in ("step", "tokens", "loss", "grad_norm")} for r in metrics]
        res["deltas"] = read_metrics(run.run_dir / "deltas.jsonl")
        res["events"] = read_metrics(run.events_file) if run.outliers else []
        if (run.run_dir / "manifest.json").is_file():
            man = read_manifest(run.run_dir / "manifest.json")
            res["parameters"] = man.get("derived", {}).get("parameters")
            res["accum_steps"] = man.get("derived", {}).get("grad_accum_steps")
            res["world_size"] = man.get("world_size")
            res["optimizer_params"] = (man.get("deepspeed_config") or {}).get("optimizer", {}).get("params", {})
            res["optimizer_type"] = man.get("derived", {}).get("optimizer_type")
        if metrics:
            res["train_s"] = metrics[-1].get("elapsed_s")
            res["steps_done"] = metrics[-1].get("step")
            res["tokens"] = metrics[-1].get("tokens")
        if st.get("returncode") != 0:
            res["error"] = f"exit status {st.get('returncode')} (see {st.get('log')})"
            continue
        if not res["curve"] or res.get("steps_done") != run.max_steps:
            res["error"] = f"the run logged {res.get('steps_done')} of {run.max_steps} steps"
            continue
        try:
            weights = load_final_weights(run.run_dir, run.max_steps)
        except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
            res["error"] = f"final weights: {e}"
            continue
        model = build_model(cfg.model, vocab_size=data.vocab_size, context=cfg.seq_len, seed=0)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        params = {n for n, _ in model.named_parameters()}
        if [m for m in missing if m in params] or unexpected:
            res["error"] = f"final weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            continue
        model.to(device)
        res["final_val_loss"] = _evaluate(model, val, device)
        decayed = {n: p.detach().cpu() for n, p in decayed_tensors(model.named_parameters()).items()}
        hists = magnitude_histograms(decayed, edges)
        res["histograms"] = {k: {"counts": h.counts.tolist(), "numel": h.numel, "zeros": h.zeros}
                             for k, h in hists.items()}
        res["weights"] = {
            "small_fraction_1e-3": small_weight_fraction(decayed, 1e-3),
            "mean_abs": float(sum(t.abs().sum() for t in decayed.values()) / sum(t.numel() for t in decayed.values())),
            "by_type": {k: {"mean_abs": float(np.mean(np.concatenate([decayed[n].abs().reshape(-1).numpy()
                                                                      for n in h.names]))),
                            "small_fraction_1e-3": small_weight_fraction({n: decayed[n] for n in h.names}, 1e-3),
                            "numel": h.numel}
                        for k, h in hists.items()},
        }
        res["layer_types"] = {n: layer_type(n) for n in decayed}
        if run.arm == "baseline":
            original = {n: p.detach().clone() for n, p in model.named_parameters()}
            prune = []
            for s in cfg.sparsities:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_(original[n])
                pr = prune_model_(model, s, scope=cfg.prune_scope)
                loss = res["final_val_loss"] if s == 0.0 else _evaluate(model, val, device)
                prune.append({"sparsity": s, "achieved": pr.achieved_sparsity, "val_loss": loss})
            res["pruning"] = prune
        res["ok"] = True
        pruned = ", ".join(f"{p['sparsity']:.0%}" for p in res.get("pruning", []))
        say(f"[compare] {run.name}: final validation loss {res['final_val_loss']:.4f} on {len(val)} batch(es)"
            + (f"; pruned at {pruned}" if pruned else ""))
        del model, weights
    return results


# ----------------------------------------------------------------------------------------------------------------
# numbers
def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sd(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _ppl(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(min(loss, 80.0))


def _by(results: list[dict], arm: str, optimizer: str) -> dict[int, dict]:
    return {r["seed"]: r for r in results if r["arm"] == arm and r["optimizer"] == optimizer and r["ok"]}


def _tolerated(pruning: list[dict], tolerance: float) -> float:
    """Largest sparsity whose perplexity is within ``tolerance`` of the unpruned one, walking up the grid."""
    base = _ppl(pruning[0]["val_loss"])
    best = 0.0
    for p in pruning:
        if _ppl(p["val_loss"]) <= base * (1.0 + tolerance):
            best = p["sparsity"]
        else:
            break
    return best


def summarize(cfg: CompareConfig, results: list[dict]) -> dict:
    """The comparison's numbers from the per-run results: final losses, speed-ups, pruning, robustness, weights,
    and the verdict's judgements (:class:`~adamhd_study.analysis.Comparison` as dicts)."""
    from .analysis import compare_values, speedup, steps_to_target

    ref = cfg.reference
    cands = [o for o in cfg.optimizers if o != ref]
    out: dict[str, Any] = {"reference": ref, "candidates": cands, "final": {}, "speedup": {}, "pruning": {},
                           "robustness": {}, "weights": {}, "judgements": {}, "failed": []}
    out["failed"] = [{"name": r["name"], "error": r.get("error")} for r in results if not r["ok"]]
    for arm in cfg.arms:
        out["final"][arm] = {}
        for opt in cfg.optimizers:
            runs = _by(results, arm, opt)
            losses = [runs[s]["final_val_loss"] for s in sorted(runs)]
            out["final"][arm][opt] = {"seeds": sorted(runs), "losses": losses, "mean": _mean(losses),
                                      "sd": _sd(losses), "ppl": _ppl(_mean(losses)),
                                      "curve_final": _mean([runs[s]["curve"][-1]["val_loss"] for s in runs]),
                                      "train_s": _mean([runs[s].get("train_s") for s in runs]),
                                      "wall_s": _mean([runs[s].get("wall_s") for s in runs])}
    for arm in cfg.arms:
        refs = _by(results, arm, ref)
        out["speedup"][arm] = {}
        for cand in cands:
            cr = _by(results, arm, cand)
            rows = []
            for seed in sorted(set(refs) & set(cr)):
                rc, cc = refs[seed]["curve"], cr[seed]["curve"]
                # default target: the loss both optimizers reached (the higher final), so the speed-up is
                # defined whichever ends lower, and a tie at the end is a speed-up near 1, not "not reached"
                target = cfg.target_loss if cfg.target_loss is not None else max(rc[-1]["val_loss"],
                                                                                 cc[-1]["val_loss"])
                row = {"seed": seed, "target": target}
                for unit, key in (("steps", "step"), ("tokens", "tokens"), ("seconds", "elapsed_s")):
                    rcurve = ([p[key] for p in rc], [p["val_loss"] for p in rc])
                    ccurve = ([p[key] for p in cc], [p["val_loss"] for p in cc])
                    row[f"ref_{unit}"] = steps_to_target(*rcurve, target)
                    row[f"cand_{unit}"] = steps_to_target(*ccurve, target)
                    row[f"speedup_{unit}"] = speedup(rcurve, ccurve, target)
                rows.append(row)
            out["speedup"][arm][cand] = rows
    for opt in cfg.optimizers:
        runs = _by(results, "baseline", opt)
        rows = [runs[s]["pruning"] for s in sorted(runs) if runs[s].get("pruning")]
        if not rows:
            continue
        grid = []
        for i, s in enumerate(cfg.sparsities):
            losses = [r[i]["val_loss"] for r in rows]
            grid.append({"sparsity": s, "achieved": _mean([r[i]["achieved"] for r in rows]), "losses": losses,
                         "val_loss": _mean(losses), "ppl": _ppl(_mean(losses))})
        out["pruning"][opt] = {"grid": grid, "tolerated": [_tolerated(r, cfg.prune_tolerance) for r in rows],
                               "seeds": sorted(runs)}
        out["weights"][opt] = {
            "small_fraction_1e-3": _mean([runs[s]["weights"]["small_fraction_1e-3"] for s in runs]),
            "mean_abs": _mean([runs[s]["weights"]["mean_abs"] for s in runs]),
            "by_type": {k: {m: _mean([runs[s]["weights"]["by_type"][k][m] for s in runs
                                      if k in runs[s]["weights"]["by_type"]]) for m in ("mean_abs",
                                                                                        "small_fraction_1e-3")}
                        for k in runs[min(runs)]["weights"]["by_type"]},
        }
    for arm in cfg.arms:
        if arm == "baseline":
            continue
        out["robustness"][arm] = {}
        for opt in cfg.optimizers:
            b, a = _by(results, "baseline", opt), _by(results, arm, opt)
            seeds = sorted(set(b) & set(a))
            out["robustness"][arm][opt] = {"seeds": seeds, "deltas": [a[s]["final_val_loss"] - b[s]["final_val_loss"]
                                                                      for s in seeds]}
    for cand in cands:
        j: dict[str, Any] = {}
        for arm in cfg.arms:
            r, c = _by(results, arm, ref), _by(results, arm, cand)
            seeds = sorted(set(r) & set(c))
            if seeds:
                j[f"final:{arm}"] = dataclasses.asdict(compare_values(
                    [r[s]["final_val_loss"] for s in seeds], [c[s]["final_val_loss"] for s in seeds],
                    min_effect=cfg.min_effect)) | {"seeds": seeds}
            if arm != "baseline" and arm in out["robustness"]:
                rr, cc = out["robustness"][arm][ref], out["robustness"][arm][cand]
                seeds = sorted(set(rr["seeds"]) & set(cc["seeds"]))
                if seeds:
                    j[f"robust:{arm}"] = dataclasses.asdict(compare_values(
                        [rr["deltas"][rr["seeds"].index(s)] for s in seeds],
                        [cc["deltas"][cc["seeds"].index(s)] for s in seeds], min_effect=cfg.min_effect)) | {
                        "seeds": seeds}
        if ref in out["pruning"] and cand in out["pruning"]:
            pr, pc = out["pruning"][ref], out["pruning"][cand]
            seeds = sorted(set(pr["seeds"]) & set(pc["seeds"]))
            top = len(cfg.sparsities) - 1
            if seeds:
                j["pruned:max"] = dataclasses.asdict(compare_values(
                    [pr["grid"][top]["losses"][pr["seeds"].index(s)] for s in seeds],
                    [pc["grid"][top]["losses"][pc["seeds"].index(s)] for s in seeds],
                    min_effect=cfg.min_effect)) | {"seeds": seeds, "sparsity": cfg.sparsities[top]}
        out["judgements"][cand] = j
    out["verdict"] = {cand: _verdict(cfg, out, results, cand) for cand in cands}
    return out


def _fmt_speedup(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    if s == 0.0:
        return "not reached"
    return f"{s:.2f}x"


def _outcome_words(outcome: str, better: str, worse: str, same: str) -> str:
    return {"better": better, "worse": worse, "same": same}[outcome]


def _noise_words(j: dict) -> str:
    if j["noise"] is None:
        return f"threshold ±{j['threshold']:.4f} nats; one seed, so no seed-noise estimate"
    return (f"threshold ±{j['threshold']:.4f} nats = max(min effect, 2 × seed standard error {j['noise']:.4f}) over "
            f"{len(j['seeds'])} seeds")


def _verdict(cfg: CompareConfig, s: dict, results: list[dict], cand: str) -> list[str]:
    """Sentences judging ``cand`` against the reference, generated from the numbers in ``s``."""
    ref, j = cfg.reference, s["judgements"].get(cand, {})
    out: list[str] = []
    base = [r for r in results if r["arm"] == "baseline" and r["ok"]]
    if not base:
        return ["No baseline run finished, so nothing can be concluded; see the failed runs below."]
    params = base[0].get("parameters") or 0
    tokens = base[0].get("tokens") or 0
    seeds = cfg.seeds
    out.append(f"Scale: {cfg.model} ({params:,} parameters), {tokens:,} training tokens per run, {seeds} seed(s) "
               f"per arm and optimizer. GPT-3 Small has about {125e6 / max(params, 1):,.0f}x the parameters and was "
               f"trained on {300e9 / max(tokens, 1):,.0f}x the tokens; a result here, either way, need not carry "
               f"over to the paper's scale.")
    fj = j.get("final:baseline")
    if fj:
        points = _ppl(fj["reference"]) - _ppl(fj["candidate"])
        words = _outcome_words(fj["outcome"], "lower (better)", "higher (worse)",
                               "not measurably different")
        claim = ("This agrees in direction with the paper's claim of up to 4 points lower perplexity"
                 + (" and matches its size." if points >= PAPER_CLAIMS["perplexity_points"] else
                    f", but the gain is {points:.2f} points, not 4.")
                 if fj["outcome"] == "better" else
                 "This does not reproduce the paper's claim of up to 4 points lower perplexity at this scale.")
        out.append(f"Final validation loss (baseline arm): {cand} {fj['candidate']:.4f} (perplexity "
                   f"{_ppl(fj['candidate']):.2f}) vs {ref} {fj['reference']:.4f} ({_ppl(fj['reference']):.2f}): "
                   f"{cand}'s is {words} ({fj['difference']:+.4f} nats, {-points:+.2f} perplexity points; "
                   f"{_noise_words(fj)}). {claim}")
    rows = s["speedup"].get("baseline", {}).get(cand, [])
    if rows:
        st = _mean([r["speedup_steps"] for r in rows if r["speedup_steps"] is not None])
        sw = _mean([r["speedup_seconds"] for r in rows if r["speedup_seconds"] is not None])
        target_def = (f"the fixed target {cfg.target_loss:.4f}" if cfg.target_loss is not None else
                      f"the higher of the two final validation losses, {_mean([r['target'] for r in rows]):.4f}")
        tol = cfg.speedup_tolerance
        missed = sum(r["speedup_steps"] == 0.0 for r in rows)

        def judge(x: Optional[float]) -> str:
            if x is None:
                return "could not be computed"
            if x == 0.0 or missed:
                return f"{cand} did not reach the target in {missed} of {len(rows)} seed(s)"
            if x >= PAPER_CLAIMS["speedup"]:
                return "at least 10% faster"
            if x > 1 + tol:
                return "faster, by less than 10%"
            if x >= 1 - tol:
                return f"within ±{tol:.0%} of 1: no measurable difference"
            return f"slower than {ref}"

        reproduced = not missed and sw is not None and sw >= PAPER_CLAIMS["speedup"]
        out.append(f"Speed to target (baseline arm, target = {target_def}): speed-up {_fmt_speedup(st)} in steps "
                   f"({judge(st)}) and {_fmt_speedup(sw)} in wall-clock ({judge(sw)}). The paper's claim of 10-15% "
                   f"faster wall-clock convergence is {'reproduced' if reproduced else 'not reproduced'} here.")
    pr, pc = s["pruning"].get(ref), s["pruning"].get(cand)
    if pr and pc:
        tr, tc = _mean(pr["tolerated"]), _mean(pc["tolerated"])
        top = pc["grid"][-1]
        pj = j.get("pruned:max")
        reproduced = tc >= PAPER_CLAIMS["prune_sparsity"] and tc > tr
        words = (_outcome_words(pj["outcome"], "lower (better)", "higher (worse)", "not measurably different")
                 if pj else "n/a")
        out.append(f"Magnitude pruning ({cfg.prune_scope}, decayed matrices only): perplexity stays within "
                   f"{cfg.prune_tolerance:.0%} of the unpruned model up to {tc:.0%} sparsity for {cand} and "
                   f"{tr:.0%} for {ref} (grid {', '.join(f'{x:.0%}' for x in cfg.sparsities)}); at "
                   f"{top['sparsity']:.0%} sparsity {cand}'s perplexity is {top['ppl']:.2f} vs "
                   f"{pr['grid'][-1]['ppl']:.2f}, {words}. "
                   + ("This agrees with the paper's claim that 20-30% of the weights can be pruned, and more than "
                      "with the reference." if reproduced else
                      "This does not reproduce the paper's claim of 20-30% memory savings from magnitude pruning "
                      "beyond what the reference allows."))
    for arm, label in (("outliers", "Injected outlier gradients"), ("large-batch",
                                                                      f"A {cfg.large_batch_factor}x larger batch "
                                                                      f"at the same tokens")):
        rj = j.get(f"robust:{arm}")
        if not rj:
            continue
        events = [len(r["events"]) for r in results if r["arm"] == arm and r["ok"]]
        extra = f" ({_mean(events):.0f} events per run)" if arm == "outliers" and events else ""
        words = _outcome_words(rj["outcome"], f"{cand} degraded less: more robust than {ref}",
                               f"{cand} degraded more: less robust than {ref}",
                               "no measurable difference in robustness")
        out.append(f"{label}{extra} changed the final validation loss by {rj['candidate']:+.4f} nats for {cand} "
                   f"and {rj['reference']:+.4f} for {ref}: {words} ({_noise_words(rj)}).")
    w = s["weights"]
    if ref in w and cand in w:
        out.append(f"Weights after training (baseline arm): {100 * w[cand]['small_fraction_1e-3']:.2f}% of {cand}'s "
                   f"decayed weights have |w| <= 1e-3 vs {100 * w[ref]['small_fraction_1e-3']:.2f}% for {ref}; mean "
                   f"|w| {w[cand]['mean_abs']:.4g} vs {w[ref]['mean_abs']:.4g} (descriptive; the pruning result "
                   f"above is what the sparsity claim is judged on).")
    wins = [k for k, v in j.items() if v["outcome"] == "better"]
    losses = [k for k, v in j.items() if v["outcome"] == "worse"]
    names = {"final:baseline": "final loss", "final:large-batch": "large-batch final loss",
             "final:outliers": "final loss with outliers", "robust:outliers": "outlier robustness",
             "robust:large-batch": "large-batch robustness", "pruned:max": "loss at the highest pruning sparsity"}
    if not wins:
        out.append(f"Overall: at this scale {cand} does not beat {ref} on any measured quantity beyond the stated "
                   f"thresholds" + (f", and is worse on {', '.join(names.get(k, k) for k in losses)}." if losses
                                    else "."))
    else:
        out.append(f"Overall: {cand} is better on {', '.join(names.get(k, k) for k in wins)}"
                   + (f" and worse on {', '.join(names.get(k, k) for k in losses)}" if losses else "")
                   + f"; {'with one seed this has no noise estimate' if seeds == 1 else f'over {seeds} seeds'}.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# plots
_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")
_STYLES = ("-", "--", "-.", ":", "-", "--")
_TYPE_COLORS = {"attn.qkv": "tab:blue", "attn.proj": "tab:cyan", "mlp.fc": "tab:red", "mlp.proj": "tab:orange",
                "embedding": "tab:green", "other": "tab:gray"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path.name


def plot_curves(cfg: CompareConfig, results: list[dict], out: Path, x: str) -> Optional[str]:
    """Validation loss against ``x`` (``"tokens"`` or ``"elapsed_s"``), one panel per arm."""
    plt = _pyplot()
    arms = [a for a in cfg.arms if any(r["arm"] == a and r["curve"] for r in results)]
    if not arms:
        return None
    fig, axes = plt.subplots(1, len(arms), figsize=(5.2 * len(arms), 4.0), dpi=110, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for k, opt in enumerate(cfg.optimizers):
            for r in results:
                if r["arm"] == arm and r["optimizer"] == opt and r["curve"]:
                    xs = [p[x] for p in r["curve"]]
                    ax.plot(xs, [p["val_loss"] for p in r["curve"]], marker="o", ls=_STYLES[k % 6], ms=2.5, lw=1.2,
                            color=_COLORS[k % 6],
                            alpha=1.0 if r["seed"] == 0 else 0.5,
                            label=f"{opt}" + (f" (seed {r['seed']})" if cfg.seeds > 1 else ""))
        ax.set_title(arm, fontsize=10)
        ax.set_xlabel("tokens" if x == "tokens" else "training wall-clock (s)")
        if x == "tokens":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    name = "val_loss_vs_tokens.png" if x == "tokens" else "val_loss_vs_time.png"
    return _save(fig, out / name)


def plot_pruning(cfg: CompareConfig, summary: dict, out: Path) -> Optional[str]:
    if not summary["pruning"]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for k, opt in enumerate(cfg.optimizers):
        p = summary["pruning"].get(opt)
        if p:
            ax.plot([100 * g["sparsity"] for g in p["grid"]], [g["ppl"] for g in p["grid"]], marker="o",
                    ls=_STYLES[k % 6], color=_COLORS[k % 6], label=opt)
    ax.set_xlabel(f"sparsity of the decayed matrices (%), {cfg.prune_scope} magnitude pruning")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("perplexity after magnitude pruning (baseline arm)", fontsize=10)
    return _save(fig, out / "pruning.png")


def plot_histograms(cfg: CompareConfig, results: list[dict], out: Path) -> Optional[str]:
    import numpy as np

    plt = _pyplot()
    base = [r for r in results if r["arm"] == "baseline" and r["ok"] and r["seed"] == min(
        x["seed"] for x in results if x["arm"] == "baseline" and x["ok"])]
    if not base:
        return None
    types = [t for t in base[0]["histograms"]]
    edges = np.logspace(math.log10(HIST_EDGES[0]), math.log10(HIST_EDGES[1]), HIST_EDGES[2] + 1)
    cols = min(3, len(types))
    rows = math.ceil(len(types) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), dpi=110, squeeze=False)
    for ax, t in zip(axes.flat, types):
        numel = 0
        for k, opt in enumerate(cfg.optimizers):
            r = next((x for x in base if x["optimizer"] == opt), None)
            if r is None or t not in r["histograms"]:
                continue
            h = r["histograms"][t]
            numel = h["numel"]
            frac = np.asarray(h["counts"], dtype=float) / max(h["numel"], 1)
            ax.stairs(frac, edges, color=_COLORS[k % 6], ls=_STYLES[k % 6], label=opt, lw=1.3)
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
    run = next((r for r in results if r["arm"] == "baseline" and r["ok"] and r["deltas"]
                and any(rec["deltas"] for rec in r["deltas"])), None)
    if run is None:
        return None
    from .analysis import layer_type

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
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
    runs = [r for r in results if r["arm"] == "outliers" and r["ok"] and r["seed"] == 0]
    if not runs:
        return None
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), dpi=110, sharex=True)
    for k, opt in enumerate(cfg.optimizers):
        r = next((x for x in runs if x["optimizer"] == opt), None)
        b = next((x for x in results if x["arm"] == "baseline" and x["optimizer"] == opt and x["seed"] == 0
                  and x["ok"]), None)
        if r is None:
            continue
        steps = [p["step"] for p in r["train"]]
        a1.plot(steps, [p["loss"] for p in r["train"]], lw=0.9, ls=_STYLES[k % 6], color=_COLORS[k % 6],
                label=f"{opt}, outliers")
        if b is not None:
            a1.plot([p["step"] for p in b["train"]], [p["loss"] for p in b["train"]], lw=0.8, ls=":",
                    color=_COLORS[k % 6], alpha=0.7, label=f"{opt}, baseline")
        a2.plot(steps, [p["grad_norm"] for p in r["train"]], lw=0.9, ls=_STYLES[k % 6], color=_COLORS[k % 6],
                label=opt)
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


# ----------------------------------------------------------------------------------------------------------------
# report
def _f(x: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _pm(mean: Optional[float], sd: Optional[float]) -> str:
    return _f(mean) + (f" ± {sd:.4f}" if sd is not None else "")


def _machine() -> dict:
    from adamhd_train.manifest import hardware_info, package_versions

    hw = hardware_info()
    pk = package_versions()
    gpus = ", ".join(g.get("name", "?") for g in hw.get("gpus") or []) or "none"
    return {"cpu": hw.get("cpu"), "cpus": hw.get("cpus_available"), "gpus": gpus, "host": hw.get("host"),
            "memory_gb": round((hw.get("memory_bytes") or 0) / 2**30, 1), "torch": pk.get("torch"),
            "deepspeed": pk.get("deepspeed"), "python": pk.get("python")}


def write_report(cfg: CompareConfig, results: list[dict], summary: dict, meta: dict) -> Path:
    """Write ``report.md``, ``results.json`` and the PNGs into ``cfg.out_dir``; the report's path."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "tokens": plot_curves(cfg, results, out, "tokens"),
        "time": plot_curves(cfg, results, out, "elapsed_s"),
        "pruning": plot_pruning(cfg, summary, out),
        "hist": plot_histograms(cfg, results, out),
        "deltas": plot_deltas(cfg, results, out),
        "outliers": plot_outliers(cfg, results, out),
    }
    ref = cfg.reference
    base = [r for r in results if r["arm"] == "baseline" and r["ok"]]
    any_run = base[0] if base else next((r for r in results if r.get("parameters")), {})
    m = meta["machine"]
    L: list[str] = []
    L.append(f"# {' vs '.join(cfg.optimizers)}: {cfg.model}, preset {cfg.preset}")
    L.append("")
    L.append(f"Generated by `launch/compare.py` on {time.strftime('%Y-%m-%d %H:%M', time.localtime(meta['started']))}"
             f"; every number below is measured by this run of the harness.")
    L.append("")
    L.append("## Verdict")
    L.append("")
    for cand, sentences in summary["verdict"].items():
        if len(summary["verdict"]) > 1:
            L.append(f"**{cand} vs {ref}**")
            L.append("")
        for sent in sentences:
            L.append(f"- {sent}")
        L.append("")
    if summary["failed"]:
        L.append("**Failed runs** (left out of every table): " + "; ".join(f"`{f['name']}`: {f['error']}"
                                                                         for f in summary["failed"]))
        L.append("")
    L.append("## What was measured")
    L.append("")
    L.append(f"- Command: `{meta['command']}`")
    share = None
    if meta.get("runs_cpu_s") and meta.get("runs_wall_s") and m["gpus"] == "none" \
            and not any(r.get("reused") for r in results):
        share = meta["runs_cpu_s"] / (meta["runs_wall_s"] * (m["cpus"] or 1))
    L.append(f"- Machine: {m['cpu']} ({m['cpus']} CPU cores available), GPUs: {m['gpus']}, {m['memory_gb']} GiB; "
             f"Python {m['python']}, torch {m['torch']}, deepspeed {m['deepspeed']}. Load average (1 min) "
             f"{meta['load_start']:.2f} before the runs and {meta['load_end']:.2f} after them."
             + (f" The runs used {share:.0%} of the machine's CPU time while they ran"
                + (" — the machine was shared with other work, so the wall-clock figures carry that load."
                   if share < 0.8 else ".") if share is not None else ""))
    reused = sum(bool(r.get("reused")) for r in results)
    L.append(f"- Wall time of this invocation of the harness: {meta['total_s'] / 60:.1f} min ({meta['total_s']:.0f} s)"
             + (f", with {reused} of {len(results)} runs reused from earlier invocations (their own times are in "
                f"the table below)" if reused else "")
             + f"; runs {cfg.parallel} at a time, {cfg.nproc} rank(s) each, {meta['threads']} thread(s) per run on "
               f"the CPU.")
    L.append(f"- Model: `{cfg.model}`, {any_run.get('parameters') or 0:,} parameters (tied embeddings counted once), "
             f"context {cfg.seq_len}; data `{cfg.data}` (tokenizer {cfg.tokenizer}"
             + (f", vocabulary {cfg.vocab_size}" if cfg.vocab_size else "")
             + (f", first {cfg.max_chars:,} characters" if cfg.max_chars else "")
             + f"): {meta['data']['train_tokens']:,} train / {meta['data']['val_tokens']:,} validation tokens.")
    L.append(f"- Seeds: {cfg.seeds} (seed i sets the initialisation and the data order; the same for every "
             f"optimizer). " + ("With one seed there is no estimate of seed noise: differences are judged "
                                "against the fixed minimum effect only." if cfg.seeds == 1 else
                                "Differences are judged against twice the standard error of the paired "
                                "per-seed differences, or the minimum effect if larger."))
    L.append(f"- Engine: DeepSpeed ZeRO (each optimizer's config), world size {cfg.nproc} per run, launched through "
             f"`launch/pretrain_gpt3.py`; every optimizer gets the same LR schedule (linear warmup over 5% of "
             f"the tokens, cosine to 10% of the peak at the end), gradient clipping at global norm 1.0, weight "
             f"decay {cfg.weight_decay:g}, no batch ramp. Validation every {cfg.eval_interval} steps on "
             f"{cfg.eval_batches} micro-batches of {cfg.micro_batch} sequences for the curves; final and pruned "
             f"models on " + (f"{cfg.final_eval_batches} micro-batches" if cfg.final_eval_batches else
                              f"the whole validation split ({meta['val_batches']} micro-batches)") + ".")
    L.append("")
    L.append("| optimizer | config | type | lr | betas | eps | weight decay | other |")
    L.append("| --- | --- | --- | ---: | --- | ---: | ---: | --- |")
    for opt in cfg.optimizers:
        r = next((x for x in results if x["optimizer"] == opt and x.get("optimizer_params") is not None), None)
        p = dict(r["optimizer_params"]) if r else {}
        other = ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("lr", "betas", "eps", "weight_decay"))
        L.append(f"| {opt} | `{cfg.optimizers[opt]}` | {r.get('optimizer_type') if r else 'n/a'} | "
                 f"{p.get('lr', 'n/a')} | {tuple(p['betas']) if 'betas' in p else 'n/a'} | {p.get('eps', 'n/a')} | "
                 f"{p.get('weight_decay', 'n/a')} | {other or '-'} |")
    L.append("")
    L.append("| run | arm | optimizer | seed | global batch (tokens) | steps | tokens | training s | wall s "
             "(incl. start-up) | status |")
    L.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        status = "ok" if r["ok"] else f"failed: {r.get('error')}"
        if r.get("reused"):
            status += " (reused from an earlier invocation)"
        L.append(f"| `{r['name']}` | {r['arm']} | {r['optimizer']} | {r['seed']} | {r['global_batch_tokens']:,} | "
                 f"{r['max_steps']} | {r.get('tokens') or 0:,} | {_f(r.get('train_s'), '.0f')} | "
                 f"{_f(r.get('wall_s'), '.0f')} | {status} |")
    L.append("")
    L.append("## Final validation loss")
    L.append("")
    L.append("Final weights evaluated on the validation split (mean ± standard deviation over seeds where there is "
             "more than one). Perplexity = exp(mean loss).")
    L.append("")
    L.append("| arm | " + " | ".join(f"{o} loss | {o} ppl" for o in cfg.optimizers) + " |")
    L.append("| --- | " + " | ".join("---: | ---:" for _ in cfg.optimizers) + " |")
    for arm in cfg.arms:
        cells = []
        for o in cfg.optimizers:
            f = summary["final"][arm][o]
            cells.append(f"{_pm(f['mean'], f['sd'])} | {_f(f['ppl'], '.2f')}")
        L.append(f"| {arm} | " + " | ".join(cells) + " |")
    L.append("")
    if plots["tokens"]:
        L.append(f"![validation loss vs tokens]({plots['tokens']})")
        L.append("")
    if plots["time"]:
        L.append(f"![validation loss vs wall-clock]({plots['time']})")
        L.append("")
    L.append("## Steps to target")
    L.append("")
    L.append("Target: " + (f"the fixed validation loss {cfg.target_loss}" if cfg.target_loss is not None else
                           f"the higher of {ref}'s and the candidate's final validation losses on the curve's "
                           f"validation batches (the loss both reached), per arm and seed")
             + ". Where a curve crosses it is interpolated linearly between validation points; speed-up = "
               f"{ref}'s steps (or seconds) / the candidate's. 'not reached': the candidate stayed above the target "
               f"for the whole budget. Wall-clock counts the training loop (validation included, start-up not).")
    L.append("")
    L.append(f"| arm | candidate | seed | target | {ref} steps | candidate steps | speed-up (steps) | "
             f"{ref} s | candidate s | speed-up (wall-clock) |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arm, per in summary["speedup"].items():
        for cand, rows in per.items():
            for row in rows:
                L.append(f"| {arm} | {cand} | {row['seed']} | {row['target']:.4f} | {_f(row['ref_steps'], '.1f')} | "
                         f"{_f(row['cand_steps'], '.1f')} | {_fmt_speedup(row['speedup_steps'])} | "
                         f"{_f(row['ref_seconds'], '.1f')} | {_f(row['cand_seconds'], '.1f')} | "
                         f"{_fmt_speedup(row['speedup_seconds'])} |")
    L.append("")
    if summary["pruning"]:
        L.append("## Magnitude pruning")
        L.append("")
        L.append(f"Baseline arm's final weights; {cfg.prune_scope} magnitude pruning of the decayed matrices "
                 f"(attention, MLP and embedding matrices; biases and norms untouched; the tied LM head is the "
                 f"token embedding), then the validation loss. 'tolerated': the largest sparsity on the grid whose "
                 f"perplexity is within {cfg.prune_tolerance:.0%} of the unpruned model's.")
        L.append("")
        L.append("| sparsity | " + " | ".join(f"{o} achieved | {o} loss | {o} ppl" for o in summary["pruning"]) + " |")
        L.append("| ---: | " + " | ".join("---: | ---: | ---:" for _ in summary["pruning"]) + " |")
        for i, sp in enumerate(cfg.sparsities):
            cells = []
            for o, p in summary["pruning"].items():
                g = p["grid"][i]
                cells.append(f"{100 * g['achieved']:.2f}% | {g['val_loss']:.4f} | {g['ppl']:.2f}")
            L.append(f"| {sp:.0%} | " + " | ".join(cells) + " |")
        L.append("| tolerated | " + " | ".join(f" |  | {_mean(p['tolerated']):.0%}" for p in summary["pruning"].values())
                 + " |")
        L.append("")
        if plots["pruning"]:
            L.append(f"![perplexity after pruning]({plots['pruning']})")
            L.append("")
    if summary["weights"]:
        L.append("## Weight magnitudes")
        L.append("")
        L.append("Decayed matrices of the baseline arm's final weights (mean over seeds), by layer type.")
        L.append("")
        L.append("| layer type | " + " | ".join(f"{o} mean abs | {o} share abs<=1e-3" for o in summary["weights"]) + " |")
        L.append("| --- | " + " | ".join("---: | ---:" for _ in summary["weights"]) + " |")
        first = next(iter(summary["weights"].values()))
        for t in first["by_type"]:
            cells = []
            for o, w in summary["weights"].items():
                bt = w["by_type"].get(t, {})
                cells.append(f"{_f(bt.get('mean_abs'), '.4g')} | {100 * (bt.get('small_fraction_1e-3') or 0):.2f}%")
            L.append(f"| {t} | " + " | ".join(cells) + " |")
        cells = [f"{w['mean_abs']:.4g} | {100 * w['small_fraction_1e-3']:.2f}%" for w in summary["weights"].values()]
        L.append("| all | " + " | ".join(cells) + " |")
        L.append("")
        if plots["hist"]:
            L.append(f"![weight magnitude histograms]({plots['hist']})")
            L.append("")
    for arm in ("outliers", "large-batch"):
        if arm not in summary["robustness"]:
            continue
        L.append("## " + ("Outlier-gradient ablation" if arm == "outliers" else "Large batch"))
        L.append("")
        if arm == "outliers":
            sched = cfg.outlier_schedule(0)
            events = [len(r["events"]) for r in results if r["arm"] == "outliers" and r["ok"]]
            L.append(f"The baseline run plus injected outlier gradients: each micro-batch after the first 5% is an "
                     f"event with probability {sched.rate:g} (seeded 1000 + seed, the same events for every "
                     f"optimizer; {_f(_mean(events), '.0f')} events per run). Mode `{sched.mode}`: "
                     + (f"in every trainable tensor, {sched.fraction:g} of the entries (at least one) get "
                        f"± {sched.scale:g} × the tensor's gradient RMS added, before clipping at global norm 1.0."
                        if sched.mode == "spike" else f"the whole gradient is multiplied by {sched.scale:g}, "
                                                      f"before clipping at global norm 1.0."))
        else:
            L.append(f"Global batch × {cfg.large_batch_factor} ({cfg.global_batch_tokens * cfg.large_batch_factor:,} "
                     f"tokens), {cfg.max_steps // cfg.large_batch_factor} steps: the same tokens as the baseline, "
                     f"the same peak LR and schedule in tokens.")
        L.append("")
        L.append("| optimizer | baseline loss | this arm's loss | change (nats) |")
        L.append("| --- | ---: | ---: | ---: |")
        for o in cfg.optimizers:
            rb = summary["robustness"][arm][o]
            L.append(f"| {o} | {_f(summary['final']['baseline'][o]['mean'])} | {_f(summary['final'][arm][o]['mean'])} "
                     f"| {_f(_mean(rb['deltas']), '+.4f')} |")
        L.append("")
        if arm == "outliers" and plots["outliers"]:
            L.append(f"![outlier arm]({plots['outliers']})")
            L.append("")
    if plots["deltas"]:
        L.append("## Huber threshold δ per layer")
        L.append("")
        L.append("δ = 1.5 × EMA of each layer's mean |θ|, read from the run's `deltas.jsonl` at every validation step.")
        L.append("")
        L.append(f"![delta per layer]({plots['deltas']})")
        L.append("")
    L.append("## Thresholds used by the verdict")
    L.append("")
    L.append(f"- A validation-loss difference counts when larger than {cfg.min_effect:g} nats (about "
             f"{100 * (math.exp(cfg.min_effect) - 1):.1f}% perplexity) and, with two or more seeds, than twice the "
             f"standard error of the paired per-seed differences.")
    L.append(f"- Speed-ups within 1 ± {cfg.speedup_tolerance:g} count as no difference; the paper's claim "
             f"(10-15% faster wall-clock) counts as reproduced at ≥ {PAPER_CLAIMS['speedup']:.2f}x.")
    L.append(f"- Pruning: a sparsity is tolerated while perplexity stays within {cfg.prune_tolerance:.0%} of the "
             f"unpruned model; the paper's 20-30% claim counts as reproduced when the candidate tolerates at least "
             f"{PAPER_CLAIMS['prune_sparsity']:.0%} and more than the reference.")
    L.append("- Perplexity: the paper's 'up to 4 points lower' counts as reproduced in direction when the "
             "candidate's final loss is lower beyond the threshold above.")
    L.append("")
    L.append("Raw numbers: `results.json`; each run's directory under `runs/` has its `metrics.jsonl`, "
             "`deltas.jsonl`, `manifest.json`, `launcher.log` and final checkpoint.")
    text = "\n".join(L) + "\n"
    (out / "report.md").write_text(text)
    slim = [{k: v for k, v in r.items() if k not in ("train",)} for r in results]
    (out / "results.json").write_text(json.dumps({"config": cfg.to_dict(), "meta": meta, "summary": summary,
                                                  "runs": slim}, indent=1, default=str) + "\n")
    return out / "report.md"


def run_comparison(cfg: CompareConfig, *, command: str = "", report_only: bool = False,
                   say: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Plan, run (unless ``report_only``), collect and report; returns the report's path and the summary."""
    t0 = time.perf_counter()
    started = time.time()
    load_start = os.getloadavg()[0]
    runs = plan_runs(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say(f"[compare] {len(runs)} runs: {', '.join(cfg.optimizers)} x {', '.join(cfg.arms)} x {cfg.seeds} seed(s); "
        f"model {cfg.model}, {cfg.max_steps} steps of {cfg.global_batch_tokens:,} tokens; output {out}")
    check_run_dirs(runs, cfg)
    data = _prepare(cfg, say=say)
    child_cpu = runs_wall = None
    if report_only:
        status = {}
        for run in runs:
            p = run.run_dir / "compare_status.json"
            status[run.name] = dict(json.loads(p.read_text()), reused=True) if p.is_file() else \
                {"returncode": None, "log": str(run.run_dir / "launcher.log")}
    else:
        t_runs, before = time.perf_counter(), os.times()
        status = execute(runs, cfg, say=say)
        after = os.times()
        child_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        runs_wall = time.perf_counter() - t_runs
    results = collect(runs, status, cfg, data, say=say)
    summary = summarize(cfg, results)
    from adamhd_train.data import ValBatches

    meta = {"command": command, "started": started, "machine": _machine(), "load_start": load_start,
            "load_end": os.getloadavg()[0], "total_s": time.perf_counter() - t0, "runs_wall_s": runs_wall,
            "runs_cpu_s": child_cpu,
            "threads": max(1, _cpus() // (cfg.parallel * cfg.nproc)),
            "data": {"train_tokens": data.train_tokens, "val_tokens": data.val_tokens, "folder": str(data.folder)},
            "val_batches": len(ValBatches(data, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch,
                                          max_batches=cfg.final_eval_batches))}
    report = write_report(cfg, results, summary, meta)
    say(f"[compare] report: {report} ({meta['total_s'] / 60:.1f} min)")
    return report, summary
