"""The benchmark scripts' own logic: how candidates are grouped and compared, their refusals, the GPU check's
start on a machine without a GPU. (Timings themselves are never asserted: they are measured by the scripts.)"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import optimizer_step as B  # noqa: E402

from adamhd_dist.optim.kernels import cpu as kcpu  # noqa: E402


def test_groups_keep_the_baseline_and_compare_within_their_group(monkeypatch):
    built = []

    def factory(name):
        def build():
            built.append(name)
            return lambda: None
        return build

    cands = {name: factory(name) for name in ("a", "b", "c", "base", "d")}
    groups_seen = []
    # group i's baseline ran at 10*(i+1) ms in every round but the last, 100 ms there; every candidate at 5 ms
    def fake_measure(fns, device, reps, warmup):
        groups_seen.append(list(fns))
        i = len(groups_seen) - 1
        return {k: ([10.0 * (i + 1)] * (reps - 1) + [100.0] if k == "base" else [5.0] * reps) for k in fns}

    monkeypatch.setattr(B, "measure", fake_measure)
    monkeypatch.setattr(B, "group_size_for", lambda n, k, device: 3)
    out = B.run_layout(cands, "base", torch.device("cpu"), 1000, reps=3, warmup=0)
    assert groups_seen == [["a", "b", "base"], ["c", "d", "base"]]
    assert sorted(built) == sorted(["a", "b", "base", "c", "d", "base"])  # each built only for its group
    # the ratio is the median over rounds of time / baseline time in the same round (not moved by the slow round)
    assert out["a"][:3] == (5.0, 0.5, 0) and out["d"][:3] == (5.0, 0.25, 1)
    assert out["base"][:3] == (10.0, 1.0, 0) and out["base"][3] == [10.0, 10.0, 100.0]

    monkeypatch.setattr(B, "group_size_for", lambda n, k, device: k)  # everything fits: one group
    groups_seen.clear()
    out = B.run_layout(cands, "base", torch.device("cpu"), 1000, reps=1, warmup=0)
    assert groups_seen == [["a", "b", "c", "d", "base"]] and set(out) == set(cands)


def test_rounds_alternate_the_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "xyz"}
    times = B.measure(fns, torch.device("cpu"), reps=3, warmup=1)
    assert calls == list("xyz") + list("xyz") + list("zyx") + list("xyz")  # warm-up, then rounds
    assert {k: len(v) for k, v in times.items()} == {"x": 3, "y": 3, "z": 3}


def test_each_cpu_isa_is_a_group_with_its_own_baseline(monkeypatch):
    """One group of candidates per ISA, built and measured with ADAMHD_CPU_ISA set to it and DeepSpeedCPUAdam asked
    for it; the foreach candidates only in the first group."""
    seen = []

    def fake_candidates(layout):
        def make(shapes, device, cpu_isa=None, foreach=True):
            seen.append((layout, cpu_isa, os.environ.get(kcpu.ISA_ENV), foreach))
            names = ["AdamHD fused", "AdamW fused (torch)", "DeepSpeedCPUAdam"]
            names += ["AdamHD foreach"] if foreach else []
            return {n: (lambda: (lambda: None)) for n in names}
        return make

    monkeypatch.setattr(B, "list_candidates", fake_candidates("list"))
    monkeypatch.setattr(B, "flat_candidates", fake_candidates("flat"))
    monkeypatch.setattr(kcpu, "load", lambda isa=None: None)
    monkeypatch.setattr(B, "measure", lambda fns, device, reps, warmup: {k: [2.0 if k == "DeepSpeedCPUAdam" else 3.0]
                                                                         * reps for k in fns})
    monkeypatch.setenv(kcpu.ISA_ENV, "generic")
    rows = B.run_device(torch.device("cpu"), 8, 3, 0, "DeepSpeedCPUAdam", ["avx2", "avx512"])
    assert seen == [("list", "avx2", "avx2", True), ("flat", "avx2", "avx2", True),
                    ("list", "avx512", "avx512", False), ("flat", "avx512", "avx512", False)]
    assert os.environ[kcpu.ISA_ENV] == "generic"  # restored
    by = {(r["cpu_isa"], r["layout"], r["optimizer"]): r for r in rows}
    for isa in ("avx2", "avx512"):
        for layout in ("list", "flat"):
            assert by[(isa, layout, "DeepSpeedCPUAdam")]["ratio_vs_baseline"] == 1.0
            assert by[(isa, layout, "AdamHD fused")]["ratio_vs_baseline"] == 1.5
            assert by[(isa, layout, "AdamHD fused")]["baseline"] == "DeepSpeedCPUAdam"
    assert ("avx512", "list", "AdamHD foreach") not in by and ("avx2", "list", "AdamHD foreach") in by


def test_cpu_isa_argument(monkeypatch):
    monkeypatch.setattr(kcpu, "cpu_flags", lambda: set("avx avx2 fma f16c bmi1 bmi2 abm movbe xsave".split()))
    monkeypatch.setattr(kcpu, "_machine", lambda machine=None: "x86_64")
    assert B.cpu_isas_arg("auto") == ["avx2"]
    assert B.cpu_isas_arg("generic, AVX2") == ["generic", "avx2"]
    for bad, match in (("avx512", r"avx512: this CPU cannot execute it \(it lacks avx512f"),
                       ("sse4", "expected auto or"), ("avx2,avx2", "distinct"), (",", "distinct")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            B.cpu_isas_arg(bad)
    monkeypatch.setattr(kcpu, "cpu_flags", lambda: set("sse2 avx".split()))
    assert B.cpu_isas_arg("auto") == ["generic"]


def test_cpu_run_writes_every_row(tmp_path):
    """A real run (tiny model) for the ISA the kernel is built for by default: every candidate, with its own
    per-round times, the ratio their median over rounds."""
    out = tmp_path / "o.json"
    isa = kcpu.default_isa() if kcpu.default_isa() != "native" else "generic"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "optimizer_step.py"), "--device", "cpu", "--d-model", "8",
                        "--cpu-isa", isa, "--reps", "3", "--warmup", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(x["layout"], x["optimizer"]): x for x in res["rows"]}
    assert {"AdamHD fused", "AdamHD foreach", "AdamW fused (torch)", "AdamW foreach (torch)"} <= {
        o for lay, o in rows if lay == "list"}
    assert ("flat", "AdamHD fused, per-layer δ") in rows
    for (lay, name), x in rows.items():
        assert x["params"] == sum(int(torch.Size(s).numel()) for s in B.gpt3_xl_shapes(8)) and x["tensors"] == 292
        assert x["ms"] > 0 and x["cpu_isa"] == isa and len(x["rounds_ms"]) == 3
    base = "DeepSpeedCPUAdam" if ("list", "DeepSpeedCPUAdam") in rows else "AdamW fused (torch)"
    assert rows[("list", base)]["ratio_vs_baseline"] == 1.0
    a, b = rows[("list", "AdamHD fused")], rows[("list", base)]
    assert a["baseline"] == base
    per_round = [x / y for x, y in zip(a["rounds_ms"], b["rounds_ms"])]
    assert a["ratio_vs_baseline"] == pytest.approx(statistics.median(per_round), rel=0.01, abs=0.002)
    assert res["machine"]["cpu_simd_flags"] == sorted(res["machine"]["cpu_simd_flags"])
    assert f"| cpu | {isa} | flat | AdamHD fused, per-layer δ |" in r.stdout


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
