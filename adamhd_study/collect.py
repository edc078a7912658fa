"""Reading the runs back: each run's ``metrics.jsonl``, ``deltas.jsonl``, manifest and outlier events, its final
weights (:func:`load_final_weights`) evaluated on the validation split, magnitude-pruned at each sparsity (baseline
arm) and histogrammed (:func:`collect`)."""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from adamhd_dist.deepspeed import export_checkpoint
from adamhd_train.checkpoints import CHECKPOINT_DIR, latest_checkpoint, list_checkpoints
from adamhd_train.data import PreparedData, ValBatches, prepare_data
from adamhd_train.engine import window_loss
from adamhd_train.manifest import MANIFEST_FILE, read_manifest
from adamhd_train.metrics import read_metrics
from adamhd_train.models import build_model
from adamhd_train.ranks import available_cpus

from .analysis import decayed_tensors, layer_type, magnitude_histograms, prune_model_, small_weight_fraction
from .config import CompareConfig
from .plan import RunSpec

__all__ = ["HIST_EDGES", "hist_edges", "load_final_weights", "prepare", "final_val_batches", "collect"]

HIST_EDGES = (1e-6, 10.0, 70)
"""Weight-magnitude histogram bins: log-spaced from 1e-6 to 10, 70 bins (10 per decade); smaller magnitudes,
exact zeros included, are counted in the first bin."""


def hist_edges() -> np.ndarray:
    """The bin edges of :data:`HIST_EDGES`."""
    return np.logspace(math.log10(HIST_EDGES[0]), math.log10(HIST_EDGES[1]), HIST_EDGES[2] + 1)


def load_final_weights(run_dir: Path | str, step: Optional[int] = None) -> dict:
    """The fp32 model state dict of a run's checkpoint (default: the newest), by parameter name.

    DeepSpeed checkpoints written through :mod:`adamhd_dist.deepspeed` (AdamHD) are read with its
    ``export_checkpoint``; other DeepSpeed optimizers with DeepSpeed's own ``zero_to_fp32``; an FSDP2 checkpoint
    with ``torch.distributed.checkpoint``'s converter.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    found = latest_checkpoint(root) if step is None else next(((s, p) for s, p in list_checkpoints(root)
                                                              if s == step), None)
    if found is None:
        raise FileNotFoundError(f"{str(run_dir)!r} holds no complete checkpoint"
                                + (f" at step {step}" if step is not None else ""))
    folder = found[1]
    if (folder / "dcp").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(folder / "dcp"), str(Path(tmp) / "full.pt"))
            return {k: v.float() for k, v in torch.load(Path(tmp) / "full.pt", weights_only=False)["model"].items()
                    if torch.is_tensor(v)}
    try:
        return export_checkpoint(root, folder.name)["model"]
    except ValueError:
        pass
    # deepspeed itself only for a checkpoint of another DeepSpeed optimizer (an FSDP2 study never imports it)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=folder.name))


def prepare(cfg: CompareConfig, *, say: Callable[[str], None]) -> PreparedData:
    """The comparison's tokens, prepared once for all runs (they then only read the cache)."""
    say("[compare] preparing the data once for all runs")
    return prepare_data(cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, cache_dir=cfg.data_cache,
                        val_fraction=cfg.val_fraction, max_chars=cfg.max_chars, progress=False)


def final_val_batches(cfg: CompareConfig, data: PreparedData) -> ValBatches:
    """The validation batches the final and pruned models are evaluated on."""
    return ValBatches(data, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, max_batches=cfg.final_eval_batches)


def _evaluate(model, batches, device) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for window in batches:
            total += float(window_loss(model, window.to(device)))
            n += 1
    return total / max(n, 1)


def _read_run(run: RunSpec, st: dict) -> dict[str, Any]:
    """A run's result from its files: the curves, δ, outlier events, the manifest's numbers, the status."""
    res: dict[str, Any] = {"name": run.name, "arm": run.arm, "optimizer": run.optimizer, "seed": run.seed,
                           "run_dir": str(run.run_dir), "global_batch_tokens": run.global_batch_tokens,
                           "max_steps": run.max_steps, "outliers": run.outliers,
                           "returncode": st.get("returncode"), "wall_s": st.get("wall_s"),
                           "threads": st.get("threads"), "reused": st.get("reused", False), "ok": False}
    metrics = read_metrics(run.run_dir / "metrics.jsonl")
    res["curve"] = [{k: r.get(k) for k in ("step", "tokens", "elapsed_s", "val_loss")}
                    for r in metrics if r.get("val_loss") is not None]
    res["train"] = [{k: r.get(k) for k in ("step", "tokens", "loss", "grad_norm")} for r in metrics]
    res["deltas"] = read_metrics(run.run_dir / "deltas.jsonl")
    res["events"] = read_metrics(run.events_file) if run.outliers else []
    if (run.run_dir / MANIFEST_FILE).is_file():
        man = read_manifest(run.run_dir / MANIFEST_FILE)
        derived = man.get("derived", {})
        res.update(parameters=derived.get("parameters"), accum_steps=derived.get("grad_accum_steps"),
                   world_size=man.get("world_size"), optimizer_type=derived.get("optimizer_type"),
                   optimizer_params=(man.get("deepspeed_config") or {}).get("optimizer", {}).get("params", {}))
    if metrics:
        res.update(train_s=metrics[-1].get("elapsed_s"), steps_done=metrics[-1].get("step"),
                   tokens=metrics[-1].get("tokens"))
    if st.get("returncode") != 0:
        res["error"] = f"exit status {st.get('returncode')} (see {st.get('log')})"
    elif not res["curve"] or res.get("steps_done") != run.max_steps:
        res["error"] = f"the run logged {res.get('steps_done')} of {run.max_steps} steps"
    return res


def _weight_stats(decayed: dict[str, torch.Tensor], hists: dict) -> dict[str, Any]:
    """Mean |w| and the share of |w| <= 1e-3, over all decayed matrices and by layer type."""
    def mean_abs(names) -> float:
        return float(np.mean(np.concatenate([decayed[n].abs().reshape(-1).numpy() for n in names])))

    return {
        "small_fraction_1e-3": small_weight_fraction(decayed, 1e-3),
        "mean_abs": float(sum(t.abs().sum() for t in decayed.values()) / sum(t.numel() for t in decayed.values())),
        "by_type": {k: {"mean_abs": mean_abs(h.names),
                        "small_fraction_1e-3": small_weight_fraction({n: decayed[n] for n in h.names}, 1e-3),
                        "numel": h.numel}
                    for k, h in hists.items()},
    }


def _prune_grid(model, cfg: CompareConfig, unpruned_loss: float, val, device) -> list[dict]:
    """The validation loss after magnitude pruning at each of ``cfg.sparsities`` (each from the unpruned
    weights)."""
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    grid = []
    for s in cfg.sparsities:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        pr = prune_model_(model, s, scope=cfg.prune_scope)
        loss = unpruned_loss if s == 0.0 else _evaluate(model, val, device)
        grid.append({"sparsity": s, "achieved": pr.achieved_sparsity, "val_loss": loss})
    return grid


def _measure(res: dict, run: RunSpec, cfg: CompareConfig, data: PreparedData, val, device) -> None:
    """Load the run's final weights into the model and measure them (``res["error"]`` when they cannot be)."""
    try:
        weights = load_final_weights(run.run_dir, run.max_steps)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        res["error"] = f"final weights: {e}"
        return
    model = build_model(cfg.model, vocab_size=data.vocab_size, context=cfg.seq_len, seed=0)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = {n for n, _ in model.named_parameters()}
    if [m for m in missing if m in params] or unexpected:
        res["error"] = f"final weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        return
    model.to(device)
    res["final_val_loss"] = _evaluate(model, val, device)
    decayed = {n: p.detach().cpu() for n, p in decayed_tensors(model.named_parameters()).items()}
    hists = magnitude_histograms(decayed, hist_edges())
    res["histograms"] = {k: {"counts": h.counts.tolist(), "numel": h.numel, "zeros": h.zeros}
                         for k, h in hists.items()}
    res["weights"] = _weight_stats(decayed, hists)
    res["layer_types"] = {n: layer_type(n) for n in decayed}
    if run.arm == "baseline":
        res["pruning"] = _prune_grid(model, cfg, res["final_val_loss"], val, device)
    res["ok"] = True


def collect(runs: list[RunSpec], status: dict[str, dict], cfg: CompareConfig, data: PreparedData, *,
            say: Callable[[str], None] = print) -> list[dict]:
    """Read every run back and measure its final weights; one result dict per run (see
    :func:`adamhd_study.summary.summarize`)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(available_cpus())
    val = final_val_batches(cfg, data)
    results = []
    for run in runs:
        res = _read_run(run, status.get(run.name, {}))
        results.append(res)
        if "error" in res:
            continue
        _measure(res, run, cfg, data, val, device)
        if res["ok"]:
            pruned = ", ".join(f"{p['sparsity']:.0%}" for p in res.get("pruning", []))
            say(f"[compare] {run.name}: final validation loss {res['final_val_loss']:.4f} on {len(val)} batch(es)"
                + (f"; pruned at {pruned}" if pruned else ""))
    return results
