"""Training metrics: ``metrics.jsonl``, per-layer δ dumps, TensorBoard scalars, the MFU peak, the loss-curve PNG.

Files in a run directory (written by rank 0):

- ``metrics.jsonl``: one JSON object per logged optimizer step: ``step``, ``tokens``, ``loss``, ``lr``,
  ``grad_norm``, ``batch_tokens``, ``accum_steps``, ``tokens_per_s``, ``mfu``, ``elapsed_s``, ``delta_min``,
  ``delta_median``, ``delta_max`` and, at evaluation steps, ``val_loss`` and ``val_ppl``;
- ``deltas.jsonl``: ``{"step", "tokens", "deltas": {layer name: δ}}`` at every evaluation;
- ``tensorboard/``: the same scalars (``tensorboard --logdir <run dir>/tensorboard``);
- ``loss_curve.png``: training and validation loss against tokens (:func:`plot_loss_curve`).

On resume, :meth:`MetricsLog.truncate` drops lines logged after the checkpoint, so the files describe one run.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Optional

from adamhd_dist.fsutil import atomic_write

__all__ = ["METRICS_FILE", "DELTAS_FILE", "PLOT_FILE", "MetricsLog", "read_metrics", "delta_summary",
           "peak_flops", "plot_loss_curve"]

METRICS_FILE = "metrics.jsonl"
DELTAS_FILE = "deltas.jsonl"
PLOT_FILE = "loss_curve.png"

# Dense peak throughput per GPU in TFLOP/s, (16-bit tensor cores, fp32 without TF32), from the vendors' data
# sheets. Matched against torch.cuda.get_device_name() in order, so more specific names come first.
_GPU_PEAK_TFLOPS = (
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),
    ("GH200", 989.4, 66.9),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 31.2),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("V100", 125.0, 15.7),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
)
_CPU_GHZ_DEFAULT = 2.5


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or ``deltas.jsonl``) file, in order; [] when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    return [rec for _, rec in _parsed_lines(path)]


def _parsed_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every complete line; a last line cut short (the run was killed while appending it) is
    dropped, any other unreadable line is an error naming the file and line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{str(path)!r} line {i + 1} is not a JSON record") from None
    return out


def delta_summary(deltas: dict) -> dict[str, float]:
    """``{"delta_min", "delta_median", "delta_max"}`` over the layers of ``layer_deltas(...)``; {} for none."""
    values = [float(v) for v in deltas.values()]
    if not values:
        return {}
    return {"delta_min": min(values), "delta_median": statistics.median(values), "delta_max": max(values)}


def _cpu_flops_per_cycle() -> int:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 16
    if re.search(r"\bavx512f\b", flags):
        return 64  # 2 FMA units x 16 fp32 lanes x 2
    if re.search(r"\bfma\b", flags) and re.search(r"\bavx2\b", flags):
        return 32  # 2 FMA units x 8 fp32 lanes x 2
    return 16


def _cpu_ghz() -> float:
    try:
        mhz = [float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
        if mhz:
            return max(mhz) / 1000.0
    except (OSError, ValueError):
        pass
    return _CPU_GHZ_DEFAULT


def peak_flops(device_type: str, dtype: str, *, threads: int = 1, device_name: Optional[str] = None
               ) -> tuple[Optional[float], str]:
    """Peak FLOP/s of one rank for MFU, and a sentence saying where the figure comes from.

    GPU: the dense data-sheet peak of the card (16-bit tensor cores for bf16/fp16, fp32 without TF32), or None
    for a card not in the table. CPU: an estimate, ``threads × clock × FLOP/cycle`` (fp32 FMA width from the
    CPU flags: 32 for AVX2, 64 for AVX-512), the same for bf16.
    """
    if device_type == "cuda":
        name = device_name or ""
        for key, half, single in _GPU_PEAK_TFLOPS:
            if key in name:
                tflops = single if dtype == "fp32" else half
                kind = "fp32 (no TF32)" if dtype == "fp32" else f"{dtype} tensor-core"
                return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense {kind} peak per GPU (data sheet)"
        return None, f"{name}: no peak figure known for this GPU; pass --peak-tflops to log MFU"
    per_cycle = _cpu_flops_per_cycle()
    ghz = _cpu_ghz()
    flops = threads * ghz * 1e9 * per_cycle
    return flops, (f"CPU estimate: {threads} thread(s) x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle = "
                   f"{flops / 1e9:.0f} GFLOP/s per rank (an estimate, not a measured peak; set --peak-tflops)")


class MetricsLog:
    """Rank 0's writer of ``metrics.jsonl``, ``deltas.jsonl`` and TensorBoard scalars in a run directory."""

    def __init__(self, run_dir: Path | str, *, tensorboard: bool = True, purge_step: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.deltas_path = self.run_dir / DELTAS_FILE
        self._metrics = open(self.metrics_path, "a")
        self._deltas = open(self.deltas_path, "a")
        self.writer = None
        if tensorboard:
            # TensorBoard only when asked for (--no-tensorboard runs, and ranks other than 0, never import it)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    @staticmethod
    def truncate(run_dir: Path | str, step: int) -> None:
        """Keep only the records with ``step <= step`` in the run's jsonl files (rewritten atomically)."""
        for name in (METRICS_FILE, DELTAS_FILE):
            path = Path(run_dir) / name
            if not path.is_file():
                continue
            keep = [line for line, rec in _parsed_lines(path) if rec.get("step", 0) <= step]
            atomic_write(path, lambda f: f.write("".join(line + "\n" for line in keep)))

    def log(self, record: dict[str, Any]) -> None:
        """Append one step's record (``step`` and ``tokens`` required) and mirror its numbers to TensorBoard."""
        record = {k: _jsonable(v) for k, v in record.items()}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    group = "val" if key.startswith("val_") else ("delta" if key.startswith("delta_") else "train")
                    self.writer.add_scalar(f"{group}/{key}", value, step)

    def log_deltas(self, step: int, tokens: int, deltas: dict) -> None:
        """Append the per-layer δ of one step to ``deltas.jsonl`` (and a TensorBoard histogram)."""
        self._deltas.write(json.dumps({"step": step, "tokens": tokens,
                                       "deltas": {str(k): float(v) for k, v in deltas.items()}}) + "\n")
        self._deltas.flush()
        if self.writer is not None and deltas:
            import numpy as np

            self.writer.add_histogram("delta/per_layer", np.asarray(list(deltas.values()), dtype=np.float64), step)

    def close(self) -> None:
        self._metrics.close()
        self._deltas.close()
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(run_dir: Path | str, *, title: Optional[str] = None) -> Optional[Path]:
    """Draw training and validation loss against tokens from ``metrics.jsonl`` into ``loss_curve.png``.

    Returns the PNG's path, or None when there is nothing to plot yet.
    """
    # matplotlib only where a plot is drawn (rank 0 at the end of a run); the Agg backend needs no display
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        xs, ys = [t for t, _ in train], [v for _, v in train]
        window = len(ys) // 40
        if window >= 3:
            ax.plot(xs, ys, lw=0.6, color="tab:blue", alpha=0.35)
            smooth = [statistics.fmean(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=1.5, color="tab:blue", label=f"train loss (mean of {window} records)")
        else:
            ax.plot(xs, ys, lw=1.0, color="tab:blue", label="train loss")
    if val:
        ax.plot([t for t, _ in val], [v for _, v in val], "o-", ms=4, lw=1.5, color="tab:orange",
                label="validation loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or run_dir.name, fontsize=10)
    fig.tight_layout()
    out = run_dir / PLOT_FILE
    atomic_write(out, lambda f: fig.savefig(f, format="png"), binary=True)
    plt.close(fig)
    return out
