"""launch/pretrain_gpt3.py --fsdp --tp 2 on 4 CPU ranks (gloo): FSDP2 over tensor parallelism, dp 2 × tp 2.

The reference is the same launcher job on ONE process at --tp 1 (tests/launcher_tp_worker.py: the launcher's own
entry with the blocks made linear, so it trains the same layers on the unsharded model) with the same global batch
and seed: every step's training loss and gradient norm, the validation losses and every layer's δ of the dp × tp
run must match it within 1e-5. A run resumed from the tp run's mid-run checkpoint continues it bitwise, and bad
--tp values are refused before any rank starts (exit status 2, the option named).

Three launches in all (the reference, the tp run, the resumed half), shared by every test here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import launch_runs as lr
from dist_utils import ROOT, free_port

from adamhd_train.ranks import LaunchContext
from adamhd_train.resolve import check_resume, resolve_settings
from adamhd_train.settings import SettingsError

TOL = 1e-5
STEPS = 4
DATA = ["--max-chars", "200000", "--vocab-size", "512", "--val-fraction", "0.05"]
RUN = ["--fsdp", "--model", "nano", "--max-steps", str(STEPS), "--seed", "3", "--global-batch-tokens", "1024",
       "--micro-batch", "4", "--eval-interval", "1", "--save-interval", "2"] + DATA
WORKER = ROOT / "tests" / "launcher_tp_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(reference, tp run, resumed run) directories and the tp launch's output."""
    from adamhd_train.data import prepare_data

    tmp = tmp_path_factory.mktemp("launcher-tp")
    cache = tmp / "data-cache"
    prepare_data("embedded", vocab_size=512, max_chars=200_000, val_fraction=0.05, cache_dir=cache, progress=False)
    ref, tp, resumed = tmp / "ref", tmp / "tp", tmp / "resumed"
    common = RUN + ["--data-cache", cache]
    # --eval-batches per rank: 4 batches on one rank are the windows 2 batches on each of the 2 dp ranks read
    lr.run([sys.executable, WORKER] + common + ["--tp", "1", "--eval-batches", "4", "--out-dir", ref,
                                                "--master-port", str(free_port())], timeout=300).check()
    tp_args = common + ["--tp", "2", "--eval-batches", "2"]
    launch = lr.run(lr.torchrun_cmd(tp_args + ["--out-dir", tp], nprocs=4), timeout=400).check()
    lr.run(lr.torchrun_cmd(tp_args + ["--out-dir", resumed, "--resume", tp / "checkpoints" / "step2"], nprocs=4),
           timeout=400).check()
    return SimpleNamespace(ref=ref, tp=tp, resumed=resumed, output=launch.output, cache=cache)


def _deltas(run_dir: Path) -> dict:
    return {d["step"]: d["deltas"] for d in map(json.loads, (run_dir / "deltas.jsonl").read_text().splitlines())}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


def test_tp_run_prints_its_grid_and_batch_plan(runs):
    out = runs.output
    assert "engine: FSDP2 (fully_shard per block) over tensor parallelism: a dp 2 × tp 2 mesh" in out
    assert "ranks: dp 2 × tp 2 × pp 1 = 4; 8 sequences per data-parallel rank per step (4 per micro-step x 2); " \
           "the ranks of one tensor-parallel group read the same batch" in out
    assert "global batch 1,024 tokens = 16 sequences x 64 tokens = micro-batch 4 x 2 rank(s) x 2" in out
    m = json.loads((runs.tp / "manifest.json").read_text())
    assert m["world_size"] == 4 and m["settings"]["tp"] == 2 and m["derived"]["dp"] == 2
    assert (runs.tp / "checkpoints" / "step4" / "dcp" / ".metadata").is_file()


def test_losses_equal_the_single_process_run(runs):
    tp, ref = lr.metrics(runs.tp), lr.metrics(runs.ref)
    assert [r["step"] for r in tp] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert [r["accum_steps"] for r in tp] == [2] * STEPS and [r["accum_steps"] for r in ref] == [4] * STEPS
    for a, b in zip(tp, ref):
        for key in ("loss", "grad_norm", "val_loss", "lr"):
            assert _close(a[key], b[key]), (a["step"], key, a[key], b[key])
    assert tp[-1]["loss"] < tp[0]["loss"]


def test_every_layers_delta_equals_the_single_process_run(runs):
    tp, ref = _deltas(runs.tp), _deltas(runs.ref)
    assert sorted(tp) == sorted(ref) == list(range(1, STEPS + 1))
    assert "transformer.h.0.attn.c_attn.q.weight" in ref[1] and len(ref[1]) == 14
    for step in ref:
        assert set(tp[step]) == set(ref[step])
        for name, d in ref[step].items():
            assert abs(tp[step][name] - d) <= TOL * abs(d), (step, name, tp[step][name], d)


def test_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(runs):
    resumed = lr.metrics(runs.resumed)
    assert [r["step"] for r in resumed] == [3, 4]
    assert lr.exact(resumed) == lr.exact(lr.metrics(runs.tp)[2:])
    assert _deltas(runs.resumed) == {s: d for s, d in _deltas(runs.tp).items() if s > 2}


def _ctx(world: int) -> LaunchContext:
    return LaunchContext(rank=0, world_size=world, local_rank=0, local_world_size=world, launcher="torchrun",
                         on_gpu=False)


def _given(args: list) -> dict:
    from adamhd_train import cli

    return cli.given_options(cli.build_parser().parse_args([str(a) for a in args]))


def test_a_tp_checkpoint_is_refused_at_tp_1(runs):
    """A --tp checkpoint holds separate q/k/v layers: it cannot continue at --tp 1 (nor the reverse)."""
    common = RUN + ["--data-cache", runs.cache]
    with pytest.raises(SettingsError, match="written at --tp 2, this run uses --tp 1"):
        check_resume(resolve_settings(_given(common + ["--tp", "1", "--out-dir", runs.tp]), _ctx(4)))
    with pytest.raises(SettingsError, match="written at --tp 1, this run uses --tp 2"):
        check_resume(resolve_settings(_given(common + ["--tp", "2", "--out-dir", runs.ref]), _ctx(4)))


def test_a_bad_tp_exits_2_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    """The launcher's entry (in this process: a refusal starts nothing) with a --seq-len that --tp does not divide."""
    from adamhd_train import cli

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    code = cli.main(["--fsdp", "--model", "nano", "--tp", "2", "--seq-len", "63", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "pretrain_gpt3.py: error: --seq-len 63 must be a multiple of --tp 2: the norms and the residual stream " \
           "run sequence-parallel, seq_len / tp tokens per rank; nearest: 62" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, world, message", [
    (["--tp", "3"], 6, "--tp 3 must divide the 4 attention heads of nano (each rank holds whole heads); allowed: "
                       "[1, 2, 4]"),
    (["--tp", "2"], 3, "the world size (3 ranks) must be a multiple of --tp 2 × --pp 1 = 2"),
    (["--tp", "2", "--pp", "2"], 4, "--pp 2: pipeline stages are not yet supported by the launcher"),
    (["--tp", "4", "--global-batch-tokens", "192", "--seq-len", "64"], 8,
     "the data-parallel size (world 8 / tp · pp) (2 ranks) must divide the global batch of 3 sequences"),
])
def test_tp_layouts_are_checked_at_resolution(args, world, message, tmp_path):
    with pytest.raises(SettingsError) as e:
        resolve_settings(_given(["--fsdp", "--model", "nano", "--out-dir", tmp_path / "run"] + args), _ctx(world))
    assert message in str(e.value), str(e.value)


def test_a_tp_layout_that_passes_is_planned_over_data_parallel_ranks(tmp_path):
    run = resolve_settings(_given(["--fsdp", "--model", "nano", "--tp", "2", "--global-batch-tokens", "1024",
                                   "--micro-batch", "4", "--out-dir", tmp_path / "run"]), _ctx(8))
    assert (run.derived["dp"], run.derived["tp"], run.plan.world_size, run.plan.grad_accum_steps) == (4, 2, 4, 1)


def test_the_validation_batch_is_planned_over_data_parallel_ranks():
    """6 validation windows on 4 ranks at tp 2: 3 per data-parallel rank (the tp ranks of a group share them)."""
    from adamhd_train.train import _eval_micro_batch

    s = SimpleNamespace(seq_len=64, micro_batch=4, tp=2, pp=1, val_fraction=0.05)
    data = SimpleNamespace(val_tokens=6 * 64 + 1)
    assert _eval_micro_batch(s, _ctx(4), data) == 3
    assert _eval_micro_batch(SimpleNamespace(**{**vars(s), "tp": 1}), _ctx(4), data) == 1
    with pytest.raises(SettingsError, match="fewer than one per data-parallel rank"):
        _eval_micro_batch(s, _ctx(4), SimpleNamespace(val_tokens=64 + 1))
