"""GPT-3-style pre-training with AdamHD under DeepSpeed ZeRO or FSDP2: the training loop.

``launch/pretrain_gpt3.py`` (:mod:`adamhd_train.cli`) is the command line; a run goes through three stages:

1. :func:`adamhd_train.ranks.launch_context` reads how the ranks were started, before any process group exists.
2. :func:`adamhd_train.resolve.resolve_settings` turns the options into a complete, validated
   :class:`~adamhd_train.settings.TrainSettings` and the DeepSpeed config to run; every bad input fails there.
3. :func:`train` runs the job with a :class:`Trainer`: it prepares the data, starts the process group, builds the
   model and the engine (:func:`adamhd_train.engine.build_engine`), resumes from the newest complete checkpoint if
   asked, and loops :meth:`Trainer.train_step` (the batch-size ramp, gradient accumulation, clipping, the LR
   schedule), :meth:`Trainer.evaluate`, :meth:`Trainer.log` (``metrics.jsonl``/TensorBoard/tqdm, per-layer δ) and
   :meth:`Trainer.save` (atomic checkpoints), then writes the loss-curve PNG.

Reproducibility: a run's losses depend only on its settings, the data, the world size and the software; on CPU the
same settings and world size give a bitwise-identical loss curve, and a resumed run continues the uninterrupted one
bitwise (the data position, the RNG states, the optimizer state including μ, and the LR schedule are restored).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import errno
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from adamhd_dist import param_groups

from . import checkpoints as ck
from .data import PreparedData, TokenSampler, ValBatches, prepare_data
from .describe import describe_end, describe_start
from .engine import build_engine
from .manifest import MANIFEST_FILE, build_manifest, read_manifest, record_resume, write_manifest
from .metrics import MetricsLog, delta_summary, peak_flops, plot_loss_curve, read_metrics
from .models import build_model, flops_per_token
from .ranks import LaunchContext, available_cpus, init_process_group, launcher_pids, process_gone
from .recipe import lr_scheduler
from .resolve import ResolvedRun, check_resume
from .settings import SettingsError, TrainSettings
from .tp import linear_blocks

__all__ = ["Trainer", "StepResult", "train", "EXIT_NONFINITE", "EXIT_SAVE_FAILED", "MAX_SKIPPED_IN_A_ROW"]

EXIT_NONFINITE = 3
"""Exit status of a run stopped because its loss or weights stopped being finite (nothing of that state saved)."""
EXIT_SAVE_FAILED = 4
"""Exit status of a run stopped because a checkpoint could not be written (no space, I/O error, read-only)."""
MAX_SKIPPED_IN_A_ROW = 20
"""fp16 steps the loss scaler may skip in a row (each halves the loss scale) before the run stops as diverged."""


# ----------------------------------------------------------------------------------------------------------------
# before the process group: the data
def _eval_micro_batch(s: TrainSettings, ctx: LaunchContext, data: PreparedData) -> int:
    """Validation sequences per data-parallel rank per batch: the training micro-batch, or fewer when the
    validation split does not hold one batch on every data-parallel rank (a small corpus); a split with less than
    one window per data-parallel rank is an error. The ranks of one tensor-parallel group (``tp``) read the same
    windows, so the split is cut over world / (tp · pp) ranks."""
    dp = ctx.world_size // (s.tp * s.pp)
    ranks = f"data-parallel rank ({dp} = world {ctx.world_size} / tp · pp)" if dp != ctx.world_size \
        else f"rank ({ctx.world_size})"
    windows = max(0, (data.val_tokens - 1) // s.seq_len)
    if windows >= s.micro_batch * dp:
        return s.micro_batch
    if windows < dp:
        raise SettingsError(f"the validation split has {data.val_tokens:,} tokens = {windows} window(s) of "
                            f"--seq-len+1 = {s.seq_len + 1} tokens, fewer than one per {ranks}; "
                            f"raise --val-fraction (now {s.val_fraction}) or use more data (--max-chars, --data)")
    return windows // dp


def prepare_run_data(s: TrainSettings, ctx: LaunchContext, *, expect_data_hash: Optional[str],
                     resume_from: Optional[tuple[int, Path]]) -> tuple[PreparedData, int]:
    """The run's tokens (every rank; the cache's file lock makes one of them build it) and the validation
    micro-batch. A corpus that cannot be read, or that differs from the one the job ran on, or that is too small
    for the batch, is a :class:`SettingsError` (reported before the process group starts)."""
    try:
        data = prepare_data(s.data, tokenizer=s.tokenizer, vocab_size=s.vocab_size, cache_dir=s.data_cache,
                            val_fraction=s.val_fraction, max_chars=s.max_chars, progress=ctx.is_main)
    except (ValueError, OSError) as e:  # a bad file, an empty folder, a hub name or tokenizer out of reach
        raise SettingsError(f"--data {s.data!r} / --tokenizer {s.tokenizer!r}: {e}") from None
    if expect_data_hash is not None and expect_data_hash != data.data_hash:
        raise SettingsError(f"the data differs from the manifest's (data hash {expect_data_hash[:12]} -> "
                            f"{data.data_hash[:12]}): the corpus, the tokenizer or the Python version (which "
                            f"supplies the embedded corpus) changed, so the job cannot be repeated exactly")
    if resume_from is not None:
        mpath = resume_from[1].parent.parent / MANIFEST_FILE
        if mpath.is_file():
            old_hash = read_manifest(mpath).get("data", {}).get("data_hash")
            if old_hash not in (None, data.data_hash):
                raise SettingsError(f"cannot resume {str(resume_from[1])!r}: the data differs from the run's "
                                    f"(data hash {old_hash[:12]} -> {data.data_hash[:12]})")
    eval_micro = _eval_micro_batch(s, ctx, data)
    try:
        TokenSampler(data, seq_len=s.seq_len, micro_batch=s.micro_batch, rank=ctx.rank, world_size=ctx.world_size,
                     seed=s.seed)
    except ValueError as e:
        raise SettingsError(f"{e}: use more data (--max-chars, --data) or a shorter --seq-len") from None
    if eval_micro != s.micro_batch and ctx.is_main:
        dp = ctx.world_size // (s.tp * s.pp)
        print(f"note: validation micro-batch {eval_micro} (the validation split of {data.val_tokens:,} tokens holds "
              f"fewer than micro-batch x {'world size' if dp == ctx.world_size else 'data-parallel size'} = "
              f"{s.micro_batch * dp} windows; --val-fraction)")
    return data, eval_micro


def _set_cpu_threads(ctx: LaunchContext) -> None:
    # ranks on one CPU machine share its cores; OMP_NUM_THREADS, when set, is the user's choice
    if ctx.on_gpu or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, available_cpus() // max(1, ctx.local_world_size)))


def _quiet_libraries(launch: str) -> None:
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if launch == "deepspeed":
        # DeepSpeed sets its logger to INFO when imported, so it is imported before its level is set; an FSDP2
        # run never imports it
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather_into_tensor.*")


# ----------------------------------------------------------------------------------------------------------------
# the loop's components
class _Stop:
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, exit. A signal arriving more than
    ``grace_s`` seconds after the first exits at once; one within it is the same interruption relayed (Ctrl-C
    reaches every process of the terminal's group, and the deepspeed launcher then sends SIGTERM to its ranks).

    The end of a launcher process (``watch``: its pids) counts as a SIGTERM: a launcher killed alone (``kill PID``
    of the ``deepspeed`` command) does not pass the signal on, and its ranks would train on unattended."""

    def __init__(self, grace_s: float = 5.0, watch: tuple[int, ...] = (), poll_s: float = 0.5):
        self.signum = 0
        self.reason = ""
        self.grace_s = grace_s
        self._first = 0.0
        self._old = {}
        self._watch, self._poll_s = tuple(watch), poll_s
        self._done = threading.Event()

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        if self._watch:
            threading.Thread(target=self._watch_launcher, name="adamhd-launcher-watch", daemon=True).start()
        return self

    def _watch_launcher(self):
        while not self._done.wait(self._poll_s):
            gone = next((pid for pid in self._watch if process_gone(pid)), None)
            if gone is not None:
                if not self.signum:
                    self.reason = f"the launcher process {gone} ended"
                    self.signum, self._first = signal.SIGTERM, time.monotonic()
                return

    def _handle(self, signum, frame):
        if self.signum:
            if time.monotonic() - self._first > self.grace_s:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.signum, self._first = signum, time.monotonic()

    def __exit__(self, *exc):
        self._done.set()
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _Rate:
    """Tokens per second since the previous reading."""

    def __init__(self, tokens: int):
        self.t, self.tokens = time.perf_counter(), tokens

    def since_last(self, tokens: int, now: float) -> float:
        rate = (tokens - self.tokens) / max(now - self.t, 1e-9)
        self.t, self.tokens = now, tokens
        return rate


@dataclass
class StepResult:
    """One optimizer step, as every rank sees it after the step's all-reduce."""

    loss: float
    """Training loss of the step, averaged over its micro-batches and the ranks."""
    lr: float
    """Learning rate the step used."""
    grad_norm: Optional[float]
    """Global gradient norm before clipping (None when the engine does not report one)."""
    accum_steps: int
    batch_tokens: int
    signalled: bool
    """Whether any rank got SIGINT/SIGTERM (all ranks then stop after this step)."""
    applied: bool = True
    """Whether the step changed the weights (False: the fp16 loss scaler skipped it after an overflow)."""


class Trainer:
    """One launch of a pre-training job on this rank: set up in the constructor (data, process group, model,
    engine, resumed state, run directory), then :meth:`fit` loops :meth:`train_step`, :meth:`log` (with
    :meth:`evaluate` at evaluation steps) and :meth:`save`.

    Args:
        run, ctx: from :func:`~adamhd_train.resolve.resolve_settings` and
            :func:`~adamhd_train.ranks.launch_context`.
        resume_from: ``(step, folder)`` of the checkpoint to continue from (:func:`check_resume`), or None.
        master_port: rank 0's port when this process finds its ranks itself (mpirun, a single process).
        argv, rerun_command: recorded in the manifest.
        expect_data_hash: the data hash the job must train on (``--from-manifest``); another is an error.
        on_model: called with the freshly built model before the engine wraps it (e.g. to add gradient hooks).
    """

    def __init__(self, run: ResolvedRun, ctx: LaunchContext, *, resume_from: Optional[tuple[int, Path]] = None,
                 master_port: Optional[int] = None, argv: Optional[list[str]] = None,
                 rerun_command: Optional[str] = None, expect_data_hash: Optional[str] = None,
                 on_model: Optional[Callable[[torch.nn.Module], None]] = None):
        self.run, self.ctx, self.s = run, ctx, run.settings
        self.out = Path(self.s.out_dir)
        self.root = self.out / ck.CHECKPOINT_DIR
        self.resume_from = resume_from
        _set_cpu_threads(ctx)
        _quiet_libraries(self.s.launch)
        self.data, eval_micro = prepare_run_data(self.s, ctx, expect_data_hash=expect_data_hash,
                                                 resume_from=resume_from)
        init_process_group(self.s.launch, ctx, master_port)
        self.device = torch.device("cuda", torch.cuda.current_device()) if ctx.on_gpu else torch.device("cpu")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # the data-parallel coordinate: the ranks of one tensor-parallel group (consecutive ranks, DeepSpeed's
        # ("data_parallel", "tensor_parallel") mesh) read the same batch
        self.dp_rank, self.dp_world = self.rank // self.s.tp, self.world // self.s.tp
        self.resume_from = resume_from = self._verified(resume_from)
        self._build(eval_micro, on_model)
        self.step, self.tokens, self.elapsed_before = 0, 0, 0.0
        if resume_from is not None:
            self._restore(resume_from[1])
        self.start_step = self.step
        self.t_start = time.perf_counter()
        threads = torch.get_num_threads()
        self.flops_per_token = flops_per_token(self.s.model, self.data.vocab_size, context=self.s.seq_len)
        self.peak, peak_note = self._peak_flops(threads)
        self.metrics: Optional[MetricsLog] = None
        if ctx.is_main:
            self._open_run_dir(argv, rerun_command, threads, peak_note)
        dist.barrier()

    # ------------------------------------------------------------------------------------------------ set-up
    def _build(self, eval_micro: int, on_model) -> None:
        s, ramp = self.s, self.run.ramp
        self.model = build_model(s.model, vocab_size=self.data.vocab_size, context=s.seq_len, seed=s.seed,
                                 activation_checkpointing=s.activation_checkpointing)
        if s.tp > 1:
            # the blocks as nn.Linear q/k/v/fc/proj (same output), the form torch's tensor-parallel styles cut
            linear_blocks(self.model)
        if on_model is not None:
            on_model(self.model)
        self.groups = param_groups(self.model, s.weight_decay)

        def make_scheduler(optimizer):
            return lr_scheduler(optimizer, warmup=s.warmup_tokens, decay_end=s.decay_tokens,
                                min_ratio=s.min_lr_ratio, tokens_at_step=ramp.tokens_at_step)

        self.engine = build_engine(s.launch, self.model, device=self.device, make_scheduler=make_scheduler,
                                   ds_config=self.run.ds_config, optimizer_kwargs=self.run.adamhd_kwargs,
                                   weight_decay=s.weight_decay, grad_clip=s.grad_clip, dtype=s.dtype, tp=s.tp)
        self.sampler = TokenSampler(self.data, seq_len=s.seq_len, micro_batch=s.micro_batch, rank=self.dp_rank,
                                    world_size=self.dp_world, seed=s.seed)
        self.val = ValBatches(self.data, seq_len=s.seq_len, micro_batch=eval_micro, rank=self.dp_rank,
                              world_size=self.dp_world, max_batches=s.eval_batches)

    def _verified(self, resume_from: Optional[tuple[int, Path]]) -> Optional[tuple[int, Path]]:
        """The checkpoint to resume from, verified against its checksums before the engine reads any of it: every
        rank checks a share of the files and all see every problem. Under ``--resume auto`` a checkpoint that
        fails is set aside (renamed, not deleted) with the file and the reason printed, and the next newest is
        tried; an explicit ``--resume FOLDER`` that fails stops the run (SettingsError)."""
        while resume_from is not None:
            step, folder = resume_from
            files = ck.checkpoint_files(folder) if self.rank == 0 else None
            shared = [files]
            dist.broadcast_object_list(shared, src=0)  # one list of files, the same share on every rank
            mine = shared[0][self.rank::self.world]
            problems = ck.verify_checkpoint(folder, mine)
            gathered = [None] * self.world
            dist.all_gather_object(gathered, problems)
            if all(p is None for p in gathered):
                if self.ctx.is_main:
                    print(f"note: checkpoint {folder} has no checksums (written before they were recorded): "
                          f"loading it unverified", flush=True)
                return resume_from
            problems = sorted({line for p in gathered if p for line in p})
            if not problems:
                return resume_from
            text = "\n  ".join(problems)
            if self.s.resume != "auto":
                raise SettingsError(f"--resume {folder}: the checkpoint fails verification, nothing was loaded:\n"
                                    f"  {text}")
            dist.barrier()
            if self.ctx.is_main:
                moved = ck.set_aside(folder)
                print(f"warning: checkpoint {folder} fails verification and is set aside as {moved}:\n  {text}",
                      flush=True)
            dist.barrier()
            resume_from = ck.latest_checkpoint(self.root)
            if resume_from is None:
                raise SettingsError(f"--resume auto: no checkpoint in {self.root} verifies (those that failed are "
                                    f"kept as .corrupt-*); move them away to start afresh, or give another "
                                    f"--out-dir")
            if self.ctx.is_main:
                print(f"note: resuming from the newest checkpoint that verifies instead: {resume_from[1]}",
                      flush=True)
        return None

    def _restore(self, folder: Path) -> None:
        """Engine state, data position, step and token counts, training time and (same world size) RNG states.
        A file that cannot be read (only possible past verification for a checkpoint without checksums) ends the
        run with a message naming the checkpoint and what the reader said, not a traceback from deep inside it."""
        try:
            self.engine.load(folder.parent, folder.name)
        except Exception as e:  # noqa: BLE001 - torch.load/pickle/DCP raise many kinds for a damaged file
            if _peer_failure(e):
                raise SettingsError(f"rank {self.rank}: another rank could not load checkpoint {folder} (its message "
                                    f"says why)") from None
            raise SettingsError(f"checkpoint {folder} cannot be loaded: {type(e).__name__}: {e}"
                                + ("" if (folder / ck.CHECKSUMS).is_file() else
                                   f" (it has no {ck.CHECKSUMS} to tell which file is damaged: written before "
                                   f"checksums were recorded)")) from None
        state = ck.read_trainer_state(folder)
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))  # metrics' elapsed_s goes on across launches
        if state.get("world_size") == self.world:
            ck.load_rng_state(folder, self.rank)

    def _peak_flops(self, threads: int) -> tuple[Optional[float], str]:
        if self.s.peak_tflops is not None:
            return self.s.peak_tflops * 1e12, f"peak {self.s.peak_tflops:g} TFLOP/s per rank (--peak-tflops)"
        name = torch.cuda.get_device_name(self.device) if self.ctx.on_gpu else None
        return peak_flops(self.device.type, self.s.dtype, threads=threads, device_name=name)

    def _open_run_dir(self, argv, rerun_command, threads: int, peak_note: str) -> None:
        """Rank 0: clear what an interrupted launch left, write or extend the manifest, open the metrics log and
        print the run's derived numbers."""
        s, run, out, resumed = self.s, self.run, self.out, self.resume_from is not None
        out.mkdir(parents=True, exist_ok=True)
        ck.remove_partials(self.root)
        MetricsLog.truncate(out, self.start_step)
        if not resumed:
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        if resumed and (out / MANIFEST_FILE).is_file():
            record_resume(out, step=self.start_step, world_size=self.world, launcher=self.ctx.launcher, argv=argv)
        else:  # a new run, or one started from another run's checkpoint (--resume FOLDER)
            manifest = build_manifest(
                settings=s.to_dict(), world_size=self.world, launcher=self.ctx.launcher,
                deepspeed_config=run.ds_config, deepspeed_config_source=run.ds_config_source,
                data=self.data.manifest(),
                derived=dict(run.derived, parameters=sum(p.numel() for p in self.model.parameters()),
                             flops_per_token=self.flops_per_token, torch_threads=threads),
                argv=argv, rerun_command=rerun_command)
            if resumed:
                manifest["started_from_checkpoint"] = {"folder": str(self.resume_from[1].resolve()),
                                                       "step": self.start_step}
            write_manifest(manifest, out)
        self.metrics = MetricsLog(out, tensorboard=s.tensorboard, purge_step=self.start_step + 1 if resumed else None)
        for note in run.notes:
            print(f"note: {note}")
        print(describe_start(run, self.ctx, self.data, self.model, self.groups, self.resume_from, peak_note),
              flush=True)

    # ------------------------------------------------------------------------------------------------ the loop
    def say(self, msg: str = "") -> None:
        """Print on rank 0, above the progress bar."""
        if self.ctx.is_main:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def elapsed(self) -> float:
        """Training seconds of this run, the earlier launches of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def mfu(self, tokens_per_s: float) -> Optional[float]:
        return tokens_per_s * self.flops_per_token / (self.peak * self.world) if self.peak else None

    def train_step(self, signum: int = 0) -> StepResult:
        """One optimizer step: the ramp's accumulation count of micro-batches, then the engine's step (clipping,
        the LR schedule). ``signum``: this rank's pending signal, shared with the others in the loss all-reduce."""
        accum = self.run.ramp.accum_steps_at(self.tokens)
        self.engine.set_accum_steps(accum)
        lr_used = self.engine.lr()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for k in range(accum):
            loss_sum += self.engine.micro_step(next(self.sampler), last=k == accum - 1).double()
        grad_norm = self.engine.optimizer_step()
        batch_tokens = accum * self.run.plan.tokens_per_micro_step
        self.step += 1
        self.tokens += batch_tokens
        flag = torch.full((), float(signum), dtype=torch.float64, device=self.device)
        reduced = torch.stack([loss_sum / accum, flag])
        dist.all_reduce(reduced)
        reduced = reduced.cpu()
        return StepResult(loss=float(reduced[0]) / self.world, lr=lr_used, grad_norm=grad_norm, accum_steps=accum,
                          batch_tokens=batch_tokens, signalled=int(reduced[1]) > 0,
                          applied=self.engine.step_applied())

    def evaluate(self) -> float:
        """Mean validation loss over the validation batches of every rank (collective)."""
        self.engine.train(False)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for window in self.val:
            total[0] += self.engine.eval_loss(window).double()
            total[1] += 1
        self.engine.train(True)
        dist.all_reduce(total)
        return float(total[0] / total[1])

    def log(self, result: StepResult, *, evaluate: bool, rate: _Rate, print_rate: _Rate) -> dict:
        """The step's ``metrics.jsonl`` record (every rank computes it: δ and validation are collective); rank 0
        writes it, and at an evaluation step also the per-layer δ and a printed line."""
        now = time.perf_counter()
        tps = rate.since_last(self.tokens, now)
        deltas = self.engine.deltas()
        record = {"step": self.step, "tokens": self.tokens, "loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, "batch_tokens": result.batch_tokens,
                  "accum_steps": result.accum_steps, "tokens_per_s": tps, "mfu": self.mfu(tps),
                  "elapsed_s": self.elapsed_before + now - self.t_start, **delta_summary(deltas)}
        if not result.applied:
            record["skipped_step"] = True
        if evaluate:
            vl = self.evaluate()
            record.update(val_loss=vl, val_ppl=math.exp(min(vl, 80.0)))
        if self.ctx.is_main:
            self.metrics.log(record)
            if evaluate:
                self.metrics.log_deltas(self.step, self.tokens, deltas)
                avg_tps = print_rate.since_last(self.tokens, now)
                mfu, dm = self.mfu(avg_tps), record.get("delta_median")
                self.say(f"step {self.step:>6}/{self.s.max_steps} | tokens {self.tokens:,} | loss {result.loss:.4f} | "
                         f"val {record['val_loss']:.4f} (ppl {record['val_ppl']:.1f}) | lr {result.lr:.3g} | "
                         f"{avg_tps:,.0f} tok/s"
                         + (f" | MFU {100 * mfu:.2f}%" if mfu is not None else "")
                         + (f" | δ median {dm:.4g}" if dm is not None else ""))
        return record

    def save(self, step: int) -> Path:
        """Every rank writes its part into a partial folder; rank 0 commits it as ``step<N>`` after a barrier and
        prunes old checkpoints (an interrupted save leaves every earlier checkpoint intact).

        Before writing, every rank checks that its file system has room for a checkpoint the size of the newest
        one (:class:`_SaveFailed` when it has not, on every rank alike). A write that fails on a rank (no space,
        an I/O error, a read-only or forbidden folder) ends the job from that rank (:meth:`_save_failed`)."""
        self._check_space(step)
        tmp_tag = ck.partial_tag(step)
        folder = self.root / tmp_tag
        try:
            folder.mkdir(parents=True, exist_ok=True)
            ck.save_rng_state(folder, self.rank)
            self.engine.save(self.root, tmp_tag)
            if self.ctx.is_main:
                ck.write_json_atomic({"step": step, "tokens": self.tokens, "sampler": self.sampler.state_dict(),
                                      "world_size": self.world, "launch": self.s.launch, "tp": self.s.tp,
                                      "zero_stage": self.run.derived.get("zero_stage"),
                                      "micro_batch": self.s.micro_batch, "time": time.time(),
                                      "elapsed_s": self.elapsed(), "params_finite": True}, folder / ck.TRAINER_STATE)
            dist.barrier()
            # every rank checksums a share of the files; rank 0 records them all as the last write before the rename
            files = [ck.checkpoint_files(folder) if self.ctx.is_main else None]
            dist.broadcast_object_list(files, src=0)
            shares = [None] * self.world
            dist.all_gather_object(shares, ck.checksum_files(folder, files[0][self.rank::self.world]))
            if self.ctx.is_main:
                ck.commit_checkpoint(self.root, step, {k: v for share in shares for k, v in share.items()})
                ck.prune_checkpoints(self.root, self.s.keep_checkpoints)
            dist.barrier()
        except Exception as e:  # noqa: BLE001 - classified below; anything else is raised again
            self._save_failed(step, folder, e)
        return self.root / ck.tag_for(step)

    def _needed_bytes(self) -> Optional[int]:
        newest = ck.latest_checkpoint(self.root)
        return None if newest is None else ck.folder_bytes(newest[1])

    def _check_space(self, step: int) -> None:
        """Every rank: stop the run (all ranks alike, before anything is written) when the checkpoint folder's
        file system has less room than the newest checkpoint took. The first save of a run has no size to go by
        and is not checked before; a failure while writing it is handled like any other."""
        needed = self._needed_bytes() if self.ctx.is_main else None
        shared = [needed]
        dist.broadcast_object_list(shared, src=0)
        needed = shared[0]
        if needed is None:
            return
        free = ck.free_bytes(self.root)
        lowest = torch.tensor([float(free)], dtype=torch.float64, device=self.device)
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        if lowest.item() < needed:
            raise _SaveFailed(f"no room for checkpoint step {step} in {self.root}: it needs about {_bytes(needed)} "
                              f"(the size of the newest checkpoint), the file system has {_bytes(int(lowest.item()))} "
                              f"free on the fullest rank. Nothing was written; the checkpoints there are intact.")

    def _save_failed(self, step: int, folder: Path, e: BaseException) -> None:
        """A save that raised on this rank. A write error (``OSError``, or the ``RuntimeError`` torch's file
        writer raises for one) is reported with the path, the bytes needed and free, the partial folder removed,
        and this process ends at once with :data:`EXIT_SAVE_FAILED`: the other ranks may be waiting inside the
        engine's own collectives, so the launcher ends them (each launcher stops every rank when one fails). A
        rank that sees a peer fail says so in one line and ends the same way. Anything else is raised again."""
        reason = _write_error(e, folder)
        if reason is None:
            if not _peer_failure(e):
                raise e
            print(f"rank {self.rank}: stopping: another rank failed while checkpoint step {step} was written "
                  f"(its message says why)\n", end="", file=sys.stderr, flush=True)
        else:
            needed = self._needed_bytes()
            print(f"rank {self.rank}: checkpoint step {step} could not be written: {reason}; "
                  f"{_bytes(ck.free_bytes(self.root))} free in {self.root}"
                  + (f", about {_bytes(needed)} needed (the newest checkpoint's size)" if needed else "")
                  + ". The partial folder is removed and the earlier checkpoints are intact; free space (or fix the "
                    "folder) and continue with --resume auto.\n", end="", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        if self.metrics is not None:
            try:
                self.metrics.close()
            except OSError:
                pass
        sys.stdout.flush()
        os._exit(EXIT_SAVE_FAILED)

    def all_finite(self) -> bool:
        """Whether the weights are finite on every rank (collective)."""
        ok = torch.tensor([float(self.engine.local_params_finite())], dtype=torch.float64, device=self.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def _progress_bar(self) -> tqdm:
        return tqdm(total=self.s.max_steps, initial=self.start_step, desc=f"{self.s.model} {self.s.launch}",
                    unit="step", dynamic_ncols=True, disable=not (self.ctx.is_main and sys.stderr.isatty()),
                    file=sys.stderr)

    def _stopped(self, result: StepResult, stopper: _Stop) -> int:
        """The exit status after a stop before ``max_steps``, with what to do next."""
        if result.signalled:
            why = f" ({stopper.reason})" if stopper.reason else ""
            self.say(f"interrupted after step {self.step}{why}: checkpoint saved; continue with --resume auto "
                     f"(the same command)")
            return 128 + int(stopper.signum or signal.SIGTERM)
        self.say(f"stopped after {self.step - self.start_step} steps of this launch (--exit-after-steps); "
                 f"continue with --resume auto")
        return 0

    def _diverged(self, result: StepResult) -> Optional[str]:
        """Why the run must stop after this step without saving, or None. In fp16 the loss scaler skips a step
        whose gradients overflowed (normal while it finds its scale): counted, and the run stops after
        :data:`MAX_SKIPPED_IN_A_ROW` in a row. In bf16 and fp32 there is no scaler: a non-finite loss stops the run
        at once, whether or not the engine skipped the step (DeepSpeed ZeRO skips a step with non-finite
        gradients in every precision). Every rank sees the same all-reduced loss, so all agree."""
        if not result.applied:
            self.skipped += 1
            self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0
        if self.s.dtype == "fp16" and not result.applied:
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                return (f"the fp16 loss scaler skipped the last {self.skipped_in_a_row} steps in a row (gradient "
                        f"overflow at every loss scale tried): the run has diverged")
            return None
        if not math.isfinite(result.loss):
            return (f"the training loss of step {self.step} is {result.loss}"
                    + ("" if result.applied else " (the engine skipped the step: its gradients are not finite)"))
        return None

    def _stop_diverged(self, why: str) -> int:
        newest = ck.latest_checkpoint(self.root)
        where = (f"the newest checkpoint, {newest[1]} (step {newest[0]}), holds finite weights"
                 if newest else "no checkpoint was written before it")
        self.say(f"stopped after step {self.step}: {why}. Nothing of this state is saved; {where}. Lower --lr or "
                 f"raise --warmup-tokens (or check the data), then continue with --resume auto.")
        return EXIT_NONFINITE

    def fit(self) -> int:
        """Train to ``max_steps`` (or ``exit_after_steps`` steps of this launch, or a signal), validating, logging
        and saving at their intervals and at the end; returns the process exit status. A loss or weights that
        stop being finite end the run before any checkpoint of that state (:data:`EXIT_NONFINITE`)."""
        s = self.s
        stop_after = None if s.exit_after_steps is None else min(s.max_steps, self.start_step + s.exit_after_steps)
        bar = self._progress_bar()
        self.t_start = time.perf_counter()
        rate, print_rate = _Rate(self.tokens), _Rate(self.tokens)
        exit_code = 0
        self.skipped = self.skipped_in_a_row = 0
        self.engine.train(True)
        with _Stop(watch=tuple(launcher_pids(self.ctx))) as stopper:
            while self.step < s.max_steps:
                result = self.train_step(stopper.signum)
                is_last = self.step == s.max_steps
                do_eval = self.step % s.eval_interval == 0 or is_last
                diverged = self._diverged(result)
                record = None
                if self.step % s.log_interval == 0 or do_eval or diverged or not result.applied:
                    record = self.log(result, evaluate=do_eval and not diverged, rate=rate, print_rate=print_rate)
                if self.ctx.is_main:
                    bar.update(1)
                    if record is not None:
                        post = {"loss": f"{result.loss:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
                        if record["mfu"] is not None:
                            post["mfu"] = f"{100 * record['mfu']:.2f}%"
                        bar.set_postfix(post, refresh=False)
                if diverged:
                    exit_code = self._stop_diverged(diverged)
                    break
                stopping = result.signalled or (stop_after is not None and self.step >= stop_after and not is_last)
                if is_last or stopping or self.step % s.save_interval == 0:
                    if not self.all_finite():
                        exit_code = self._stop_diverged(f"the weights hold non-finite values after step {self.step}")
                        break
                    try:
                        folder = self.save(self.step)
                    except _SaveFailed as e:
                        self.say(f"stopped after step {self.step}: {e} Free space and continue with --resume auto.")
                        exit_code = EXIT_SAVE_FAILED
                        break
                    if stopping or is_last:
                        self.say(f"checkpoint: {folder}")
                if stopping:
                    exit_code = self._stopped(result, stopper)
                    break
        bar.close()
        self.close()
        return exit_code

    def close(self) -> None:
        """Rank 0 closes the metrics log, plots the loss curve and prints the run's outcome; then the process
        group ends."""
        if self.ctx.is_main:
            self.metrics.close()
            png = plot_loss_curve(self.out, title=_plot_title(self.s, self.ctx))
            print(describe_end(self.out, read_metrics(self.out / "metrics.jsonl"), self.engine.deltas(), png),
                  flush=True)
        dist.barrier()
        dist.destroy_process_group()


class _SaveFailed(Exception):
    """A checkpoint that cannot be written, found before anything was (every rank raises it alike)."""


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EIO: "an input/output error", errno.EROFS: "the file system is read-only",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def _write_error(e: BaseException, folder: Path) -> Optional[str]:
    """What a failed checkpoint write ran into, or None when ``e`` is not a write error. torch's file writer
    reports a full disk as a RuntimeError without the errno ("file write failed", "unexpected pos"), so a
    RuntimeError is classified by probing the folder with a small write."""
    seen: Optional[BaseException] = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _WRITE_ERRNOS:
            where = seen.filename or folder
            return f"{_WRITE_ERRNOS[seen.errno]} ({where})"
        seen = seen.__cause__ or seen.__context__
    if isinstance(e, RuntimeError) and not _peer_failure(e):
        probe_dir = folder if folder.is_dir() else folder.parent
        try:
            with open(probe_dir / ".write-probe", "wb") as f:
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as probe:
            if probe.errno in _WRITE_ERRNOS:
                return f"{_WRITE_ERRNOS[probe.errno]} ({probe_dir}; torch reported: {e})"
        finally:
            try:
                os.unlink(probe_dir / ".write-probe")
            except OSError:
                pass
    return None


def _peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank went away."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(k in text for k in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL"))


def _plot_title(s: TrainSettings, ctx: LaunchContext) -> str:
    engine = f"DeepSpeed {Path(s.deepspeed_config).stem}" if s.launch == "deepspeed" else "FSDP2"
    return f"{s.model}, {engine}, {ctx.world_size} rank(s), seed {s.seed}: {Path(s.out_dir).name}"


_UNSET = object()


def train(run: ResolvedRun, ctx: LaunchContext, *, resume_from=_UNSET, master_port: Optional[int] = None,
          argv: Optional[list[str]] = None, rerun_command: Optional[str] = None,
          expect_data_hash: Optional[str] = None,
          on_model: Optional[Callable[[torch.nn.Module], None]] = None) -> int:
    """Run (or continue) the job; returns the process exit status (0 when the run reached ``max_steps`` or
    stopped at ``exit_after_steps``, 128 + signal number after a SIGINT/SIGTERM checkpoint).

    Args:
        run, ctx: from :func:`~adamhd_train.resolve.resolve_settings` and
            :func:`~adamhd_train.ranks.launch_context`.
        resume_from: the result of :func:`check_resume` when the caller already called it (default: call it).
        master_port, argv, rerun_command, expect_data_hash, on_model: see :class:`Trainer`.
    """
    s = run.settings
    if resume_from is _UNSET:
        resume_from = check_resume(run)
    if resume_from is not None and resume_from[0] >= s.max_steps:
        if ctx.is_main:
            plot_loss_curve(Path(s.out_dir), title=_plot_title(s, ctx))
            print(f"the run in {s.out_dir} is complete: checkpoint {resume_from[1].name} is at step "
                  f"{resume_from[0]} and --max-steps is {s.max_steps}. Nothing to do; another --out-dir starts a "
                  f"new run.", flush=True)
        return 0
    trainer = Trainer(run, ctx, resume_from=resume_from, master_port=master_port, argv=argv,
                      rerun_command=rerun_command, expect_data_hash=expect_data_hash, on_model=on_model)
    return trainer.fit()
