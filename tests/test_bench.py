"""The benchmark scripts' own logic: how candidates are grouped and compared, their refusals, the GPU check's
start on a machine without a GPU. (Timings themselves are never asserted: they are measured by the scripts.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import optimizer_step as B  # noqa: E402


def test_groups_keep_the_baseline_and_compare_within_their_group(monkeypatch):
    built = []

    def factory(name):
        def build():
            built.append(name)
            return lambda: None
        return build

    cands = {name: factory(name) for name in ("a", "b", "c", "base", "d")}
    groups_seen = []
    # group i's baseline ran at 10*(i+1) ms; every candidate at 5 ms
    def fake_measure(fns, device, reps, warmup):
        groups_seen.append(list(fns))
        i = len(groups_seen) - 1
        return {k: (10.0 * (i + 1) if k == "base" else 5.0) for k in fns}

    monkeypatch.setattr(B, "measure", fake_measure)
    monkeypatch.setattr(B, "group_size_for", lambda n, k, device: 3)
    out = B.run_layout(cands, "base", torch.device("cpu"), 1000, reps=1, warmup=0)
    assert groups_seen == [["a", "b", "base"], ["c", "d", "base"]]
    assert sorted(built) == sorted(["a", "b", "base", "c", "d", "base"])  # each built only for its group
    assert out["a"] == (5.0, 0.5, 0) and out["d"] == (5.0, 0.25, 1)
    assert out["base"] == (10.0, 1.0, 0)

    monkeypatch.setattr(B, "group_size_for", lambda n, k, device: k)  # everything fits: one group
    groups_seen.clear()
    out = B.run_layout(cands, "base", torch.device("cpu"), 1000, reps=1, warmup=0)
    assert groups_seen == [["a", "b", "c", "d", "base"]] and set(out) == set(cands)


def test_cpu_run_writes_every_row(tmp_path):
    out = tmp_path / "o.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "optimizer_step.py"), "--device", "cpu", "--d-model", "8",
                        "--reps", "2", "--warmup", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(x["layout"], x["optimizer"]): x for x in res["rows"]}
    assert {"AdamHD fused", "AdamHD foreach", "AdamW fused (torch)", "AdamW foreach (torch)"} <= {
        o for lay, o in rows if lay == "list"}
    assert ("flat", "AdamHD fused, per-layer δ") in rows
    for (lay, name), x in rows.items():
        assert x["params"] == sum(int(torch.Size(s).numel()) for s in B.gpt3_xl_shapes(8)) and x["tensors"] == 292
        assert x["ms"] > 0
    base = "DeepSpeedCPUAdam" if ("list", "DeepSpeedCPUAdam") in rows else "AdamW fused (torch)"
    assert rows[("list", base)]["ratio_vs_baseline"] == 1.0
    a = rows[("list", "AdamHD fused")]
    assert a["ratio_vs_baseline"] == pytest.approx(a["ms"] / rows[("list", base)]["ms"], rel=0.01, abs=0.002)
    assert "| cpu | flat | AdamHD fused, per-layer δ |" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_without_cuda_the_gpu_runs_refuse_clearly(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "optimizer_step.py"), "--device", "cuda", "--out",
                        str(tmp_path / "o.json")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "--device cuda: no CUDA device" in r.stderr
    assert not (tmp_path / "o.json").exists()

    env = dict(os.environ, OUT=str(tmp_path / "gpu"), WHEELS=str(tmp_path / "no-wheels"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "torch sees no CUDA device" in r.stderr
    info = json.loads((tmp_path / "gpu" / "env.json").read_text())
    assert info["gpu"] is None and info["torch"] == torch.__version__
    assert not (tmp_path / "gpu" / "tests.log").exists()  # nothing ran after the refusal
