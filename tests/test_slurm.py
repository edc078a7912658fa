"""launch/slurm: the sbatch scripts' dry runs, node lists, errors, and the real path through stand-in srun/mpirun.

No SLURM here: the scripts run under bash with SLURM's variables set by hand. The stand-in srun runs its command
once per node with that node's SLURM_NODEID, and the stand-in launchers print the command line they got, so the
real path is checked against the per-node commands the dry run prints.
"""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "launch" / "slurm"
SCRIPTS = ["deepspeed", "torchrun", "mpirun"]
BASH = shutil.which("bash")

TRAIN = ["--model", "gpt3-small", "--max-steps", "1000", "--seed", "1", "--out-dir", "runs/gpt3s", "--resume", "auto"]
TRAIN_STR = " ".join(TRAIN)

_spec = importlib.util.spec_from_file_location("slurm_plan", SLURM_DIR / "plan.py")
plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan)


# ---------------------------------------------------------------------------------------------------------------
# helpers

_LAUNCHER_STUB = """#!{python}
import os, shlex, sys
prefix = os.environ.get("FAKE_PREFIX", "")
line = " ".join(shlex.quote(a) for a in [os.path.basename(sys.argv[0])] + sys.argv[1:])
print("RAN " + (prefix + " " if prefix else "") + line)
"""

# srun: options up to the first non-option word, then that command once per node, in order, with SLURM_NODEID.
_SRUN_STUB = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
nodes = int(opts["nodes"])
for node in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node))
    rc = subprocess.call(args, env=env, cwd=opts.get("chdir"))
    if rc:
        sys.exit(rc)
"""

# apptainer exec --nv --bind B --pwd P IMAGE CMD...: runs CMD, which prints the apptainer part in front of its own.
_APPTAINER_STUB = """#!{python}
import os, shlex, sys
a = sys.argv[1:]
assert a[0] == "exec" and a[1] == "--nv" and a[2] == "--bind" and a[4] == "--pwd", a
head = ["apptainer"] + a[:7]
os.environ["FAKE_PREFIX"] = " ".join(shlex.quote(x) for x in head)
os.execvp(a[7], a[7:])
"""

_SCONTROL_STUB = """#!{python}
import sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("from-scontrol-a")
print("from-scontrol-b")
"""


def _write_exe(path, text):
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)


@pytest.fixture
def repo(tmp_path):
    """A repository root with the plan script, a stand-in entry script and two DeepSpeed configs."""
    r = tmp_path / "repo"
    (r / "launch" / "slurm").mkdir(parents=True)
    shutil.copy(SLURM_DIR / "plan.py", r / "launch" / "slurm" / "plan.py")
    (r / "adamhd_train").mkdir()
    shutil.copy(ROOT / "adamhd_train" / "ports.py", r / "adamhd_train" / "ports.py")  # the default port
    shutil.copy(ROOT / "adamhd_train" / "layouts.py", r / "adamhd_train" / "layouts.py")  # suggested tp × pp
    (r / "launch" / "pretrain_gpt3.py").write_text("")
    (r / "ds_configs").mkdir()
    for name in ("zero2_adamhd.json", "zero3_adamhd.json"):
        (r / "ds_configs" / name).write_text("{}")
    return r


@pytest.fixture
def fakebin(tmp_path):
    """A PATH with bash only; tests add the stand-ins they need."""
    b = tmp_path / "bin"
    b.mkdir()
    os.symlink(BASH, b / "bash")
    return b


def run_script(name, repo, fakebin, args=(), dry=True, **env_vars):
    env = {
        "PATH": str(fakebin),
        "PLAN_PYTHON": sys.executable,
        "REPO_DIR": str(repo),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
    }
    if dry:
        env["DRY_RUN"] = "1"
    env.update({k: v for k, v in env_vars.items() if v is not None})
    for k, v in env_vars.items():
        if v is None:
            env.pop(k, None)
    script = SLURM_DIR / ("%s.sbatch" % name)
    return subprocess.run([BASH, str(script)] + list(args), env=env, cwd=str(repo), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


NODE_LINE = re.compile(r"^  (\S+) \(node (\d+), ranks (\d+)-(\d+)\): (.*)$")


def per_node(stdout):
    """[(host, node, first_rank, last_rank, command)] from a plan's 'per node:' section."""
    rows = []
    for line in stdout.splitlines():
        m = NODE_LINE.match(line)
        if m:
            rows.append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)))
    return rows


def batch_step(stdout):
    lines = stdout.splitlines()
    return lines[lines.index(next(line for line in lines if line.startswith("batch step"))) + 1].strip()


# ---------------------------------------------------------------------------------------------------------------
# scripts


@pytest.mark.parametrize("name", SCRIPTS)
def test_sbatch_scripts_parse_and_carry_sbatch_headers(name):
    path = SLURM_DIR / ("%s.sbatch" % name)
    proc = subprocess.run([BASH, "-n", str(path)], stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    assert text.startswith("#!/bin/bash\n#SBATCH ")
    for option in ("--nodes=", "--gpus-per-node=", "--ntasks-per-node="):
        assert "#SBATCH %s" % option in text


def test_hostfile_example_is_in_the_launchers_format():
    hosts = [line.split() for line in (SLURM_DIR / "hostfile.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert hosts and all(len(h) == 2 and re.fullmatch(r"slots=\d+", h[1]) for h in hosts)


# ---------------------------------------------------------------------------------------------------------------
# dry runs: the exact per-node commands


def test_deepspeed_dry_run(repo, fakebin):
    proc = run_script("deepspeed", repo, fakebin, TRAIN, SLURM_CPUS_ON_NODE="64")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dry run: nothing is started" in out
    assert "nodes: 2 (node01 node02); GPUs per node: 4; world size: 8" in out
    assert "master: node01:29500" in out
    assert "hostfile: runs/slurm-4242/hostfile\n  node01 slots=4\n  node02 slots=4\n" in out
    common = ("--master_addr=node01 --master_port=29500 --num_nodes=2 --num_gpus=4 launch/pretrain_gpt3.py "
              "--deepspeed ds_configs/zero2_adamhd.json " + TRAIN_STR)
    assert per_node(out) == [
        ("node01", 0, 0, 3, "deepspeed --hostfile=runs/slurm-4242/hostfile --no_ssh --node_rank=0 " + common),
        ("node02", 1, 4, 7, "deepspeed --hostfile=runs/slurm-4242/hostfile --no_ssh --node_rank=1 " + common),
    ]
    assert batch_step(out) == (
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --chdir=%s --cpus-per-task=64 "
        "bash -c 'exec deepspeed --hostfile=runs/slurm-4242/hostfile --no_ssh --node_rank=\"$SLURM_NODEID\" %s'"
        % (repo, common))
    assert not (repo / "runs").exists(), "a dry run writes nothing"


def test_torchrun_dry_run(repo, fakebin):
    proc = run_script("torchrun", repo, fakebin, TRAIN, SLURM_JOB_NODELIST="gpu[7,9]", MASTER_PORT="31000")
    assert proc.returncode == 0, proc.stderr
    cmd = ("torchrun --nnodes=2 --nproc-per-node=4 --rdzv-id=4242 --rdzv-backend=c10d --rdzv-endpoint=gpu7:31000 "
           "launch/pretrain_gpt3.py --fsdp " + TRAIN_STR)
    assert per_node(proc.stdout) == [("gpu7", 0, 0, 3, cmd), ("gpu9", 1, 4, 7, cmd)]
    assert batch_step(proc.stdout) == (
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --chdir=%s %s" % (repo, cmd))
    assert "hostfile" not in proc.stdout


def test_mpirun_dry_run(repo, fakebin):
    proc = run_script("mpirun", repo, fakebin, TRAIN, SLURM_JOB_NODELIST="node[01-03]", SLURM_NNODES="3",
                      SLURM_GPUS_ON_NODE="8", DS_CONFIG="ds_configs/zero3_adamhd.json")
    assert proc.returncode == 0, proc.stderr
    rank_cmd = "python launch/pretrain_gpt3.py --deepspeed ds_configs/zero3_adamhd.json " + TRAIN_STR
    assert per_node(proc.stdout) == [("node01", 0, 0, 7, rank_cmd), ("node02", 1, 8, 15, rank_cmd),
                                     ("node03", 2, 16, 23, rank_cmd)]
    assert batch_step(proc.stdout) == ("mpirun -np 24 --hostfile runs/slurm-4242/hostfile --map-by ppr:8:node "
                                       "--bind-to none -x PATH " + rank_cmd)
    assert "world size: 24" in proc.stdout and "master: node01 (rank 0" in proc.stdout


def test_default_training_arguments_resume_the_job(repo, fakebin):
    proc = run_script("torchrun", repo, fakebin, SLURM_JOB_ID="77")
    assert proc.returncode == 0, proc.stderr
    assert per_node(proc.stdout)[0][4].endswith(
        "launch/pretrain_gpt3.py --fsdp --model gpt3-small --out-dir runs/slurm-77 --resume auto")


def test_pyxis_container(repo, fakebin):
    proc = run_script("deepspeed", repo, fakebin, TRAIN, CONTAINER_IMAGE="ghcr.io/acme/adamhd-dist:cuda",
                      CONTAINER_MOUNTS="/data:/data")
    assert proc.returncode == 0, proc.stderr
    step = batch_step(proc.stdout)
    assert ("--container-image=ghcr.io/acme/adamhd-dist:cuda --container-mounts=%s:/workspace,/data:/data "
            "--container-workdir=/workspace bash -c 'exec deepspeed " % repo) in step
    assert "container: pyxis ghcr.io/acme/adamhd-dist:cuda" in proc.stdout
    assert per_node(proc.stdout)[1][4].startswith("deepspeed --hostfile=runs/slurm-4242/hostfile --no_ssh "
                                                  "--node_rank=1 ")


@pytest.mark.parametrize("name", SCRIPTS)
def test_apptainer_container(repo, fakebin, name):
    proc = run_script(name, repo, fakebin, TRAIN, CONTAINER_IMAGE="/shared/adamhd.sif")
    assert proc.returncode == 0, proc.stderr
    prefix = "apptainer exec --nv --bind %s:/workspace --pwd /workspace /shared/adamhd.sif " % repo
    rows = per_node(proc.stdout)
    assert len(rows) == 2 and all(row[4].startswith(prefix) for row in rows)
    assert prefix in batch_step(proc.stdout)


# ---------------------------------------------------------------------------------------------------------------
# node lists


@pytest.mark.parametrize("text, hosts", [
    ("node[01-03],gpu7", ["node01", "node02", "node03", "gpu7"]),
    ("gpu7", ["gpu7"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[1,3-4],b[2]", ["a1", "a3", "a4", "b2"]),
    ("rack[1-2]-node[1,3]", ["rack1-node1", "rack1-node3", "rack2-node1", "rack2-node3"]),
    ("x.y[1-2].cluster", ["x.y1.cluster", "x.y2.cluster"]),
])
def test_expand_nodelist(text, hosts):
    assert plan.expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("node[01-03", "'[' without ']'"),
    ("node01]", "']' without '['"),
    ("node[3-1]", "runs backwards"),
    ("node[a-b]", "bad range"),
    ("node[]", "not a host name"),
    ("node01,,node02", "empty entry"),
    ("node01 node02", "not a host name"),
    ("node[1-2],node2", "more than once"),
])
def test_expand_nodelist_rejects(text, message):
    with pytest.raises(plan.PlanError, match=re.escape(message)):
        plan.expand_nodelist(text)


def test_nodelist_expanded_here_in_the_script(repo, fakebin):
    proc = run_script("torchrun", repo, fakebin, TRAIN, SLURM_JOB_NODELIST="node[01-03],gpu7", SLURM_NNODES="4")
    assert proc.returncode == 0, proc.stderr
    assert [(r[0], r[1], r[2]) for r in per_node(proc.stdout)] == [
        ("node01", 0, 0), ("node02", 1, 4), ("node03", 2, 8), ("gpu7", 3, 12)]
    assert "--nnodes=4 " in batch_step(proc.stdout) and "world size: 16" in proc.stdout


def test_scontrol_expands_the_nodelist_when_present(repo, fakebin):
    _write_exe(fakebin / "scontrol", _SCONTROL_STUB)
    proc = run_script("deepspeed", repo, fakebin, TRAIN, SLURM_JOB_NODELIST="whatever[1-2]")
    assert proc.returncode == 0, proc.stderr
    assert [r[0] for r in per_node(proc.stdout)] == ["from-scontrol-a", "from-scontrol-b"]
    assert "--master_addr=from-scontrol-a " in per_node(proc.stdout)[1][4]


# ---------------------------------------------------------------------------------------------------------------
# bad input: a clear message and a non-zero exit


@pytest.mark.parametrize("name, env, message", [
    ("deepspeed", {"DS_CONFIG": "ds_configs/nope.json"}, "DS_CONFIG=ds_configs/nope.json: no such file"),
    ("mpirun", {"DS_CONFIG": "ds_configs/nope.json"}, "DS_CONFIG=ds_configs/nope.json: no such file"),
    ("torchrun", {"TRAIN_SCRIPT": "launch/missing.py"}, "TRAIN_SCRIPT=launch/missing.py: no such file"),
    ("deepspeed", {"SLURM_NNODES": "0"}, "SLURM_NNODES=0: need at least 1"),
    ("torchrun", {"SLURM_NNODES": "3"}, "SLURM_NNODES=3 but SLURM_JOB_NODELIST='node[01-02]' names 2 host(s)"),
    ("deepspeed", {"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
    ("torchrun", {"SLURM_JOB_NODELIST": "node[01-02"}, "'[' without ']'"),
    ("deepspeed", {"SLURM_GPUS_ON_NODE": None}, "cannot tell how many GPUs each node has"),
    ("mpirun", {"SLURM_GPUS_ON_NODE": "0"}, "SLURM_GPUS_ON_NODE=0: need at least 1"),
    ("torchrun", {"MASTER_PORT": "70000"}, "MASTER_PORT=70000: a port is at most 65535"),
    ("mpirun", {"CONTAINER_IMAGE": "ghcr.io/acme/adamhd-dist:cuda"}, "cannot start its ranks in a pyxis container"),
    ("torchrun", {"CONTAINER_IMAGE": "x.sif", "CONTAINER_RUNTIME": "docker"}, "CONTAINER_RUNTIME='docker'"),
    ("deepspeed", {"CONTAINER_RUNTIME": "pyxis"}, "CONTAINER_IMAGE is not"),
    ("deepspeed", {"SLURM_GPUS_ON_NODE": "3"}, "--tp 4 × --pp 1 = 4 must divide the allocation's 6 GPUs"),
])
def test_bad_input(repo, fakebin, name, env, message):
    proc = run_script(name, repo, fakebin, TRAIN + (["--tp", "4"] if "--tp" in message else []), **env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("%s.sbatch: error: " % name)
    assert message in proc.stderr


def test_tp_and_pp_pass_through_and_the_grid_is_printed(repo, fakebin):
    """--tp/--pp reach every node's command unchanged (both spellings), the plan names dp × tp × pp, and the large
    presets print their suggested layout at the allocation's size."""
    args = ["--model", "gpt3-175b", "--tp=8", "--pp", "16", "--out-dir", "runs/175b"]
    proc = run_script("deepspeed", repo, fakebin, args, SLURM_JOB_NODELIST="node[01-32]", SLURM_NNODES="32",
                      SLURM_GPUS_ON_NODE="8")
    assert proc.returncode == 0, proc.stderr
    assert "ranks: dp 2 × tp 8 × pp 16 (--tp, --pp)" in proc.stdout
    assert "suggested layout for gpt3-175b on 256 GPUs in 8-GPU nodes: tp 8 × pp 16 × dp 2" in proc.stdout
    nodes = per_node(proc.stdout)
    assert len(nodes) == 32 and all(cmd.endswith(" ".join(args)) for *_, cmd in nodes)
    proc = run_script("torchrun", repo, fakebin, ["--model", "gpt3-13b"], SLURM_GPUS_ON_NODE="8")
    assert proc.returncode == 0, proc.stderr
    assert "ranks: dp 16 × tp 1 × pp 1" in proc.stdout
    assert "suggested layout for gpt3-13b on 16 GPUs in 8-GPU nodes: tp 8 × pp 1 × dp 2" in proc.stdout
    proc = run_script("torchrun", repo, fakebin, TRAIN)  # gpt3-small: data parallel, no suggestion
    assert "ranks: dp 8 × tp 1 × pp 1" in proc.stdout and "suggested layout" not in proc.stdout
    proc = run_script("torchrun", repo, fakebin, TRAIN + ["--pp", "0"])
    assert proc.returncode == 2 and "--pp=0: need at least 1" in proc.stderr


def test_missing_plan_script(tmp_path, fakebin):
    proc = run_script("deepspeed", tmp_path, fakebin)
    assert proc.returncode == 2
    assert "launch/slurm/plan.py not found: submit from the repository root or set REPO_DIR" in proc.stderr


def test_real_run_without_srun_says_what_to_do(repo, fakebin):
    proc = run_script("deepspeed", repo, fakebin, TRAIN, dry=False)
    assert proc.returncode == 2
    assert "srun is not on PATH" in proc.stderr and "DRY_RUN=1" in proc.stderr
    assert not (repo / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# the real path: what srun / mpirun start is what the dry run printed


def _ran(stdout):
    return [line[len("RAN "):] for line in stdout.splitlines() if line.startswith("RAN ")]


@pytest.mark.parametrize("name", ["deepspeed", "torchrun"])
@pytest.mark.parametrize("image", [None, "/shared/adamhd.sif", "ghcr.io/acme/adamhd-dist:cuda"])
def test_srun_starts_the_dry_run_commands(repo, fakebin, name, image):
    for exe, text in (("srun", _SRUN_STUB), (name, _LAUNCHER_STUB), ("apptainer", _APPTAINER_STUB)):
        _write_exe(fakebin / exe, text)
    env = dict(SLURM_JOB_NODELIST="node[01-03]", SLURM_NNODES="3", CONTAINER_IMAGE=image)
    dry = run_script(name, repo, fakebin, TRAIN + ["--note", "two words"], **env)
    real = run_script(name, repo, fakebin, TRAIN + ["--note", "two words"], dry=False, **env)
    assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
    expected = [row[4] for row in per_node(dry.stdout)]
    assert len(expected) == 3 and "'two words'" in expected[0]
    assert _ran(real.stdout) == expected
    assert real.stdout.startswith(dry.stdout[len("dry run: nothing is started\n"):])
    if name == "deepspeed":
        hostfile = repo / "runs" / "slurm-4242" / "hostfile"
        assert hostfile.read_text() == "node01 slots=4\nnode02 slots=4\nnode03 slots=4\n"


def test_mpirun_starts_the_dry_run_command(repo, fakebin):
    _write_exe(fakebin / "mpirun", _LAUNCHER_STUB)
    dry = run_script("mpirun", repo, fakebin, TRAIN, HOSTFILE="runs/h/hosts")
    real = run_script("mpirun", repo, fakebin, TRAIN, dry=False, HOSTFILE="runs/h/hosts")
    assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
    assert _ran(real.stdout) == [batch_step(dry.stdout)]
    assert (repo / "runs" / "h" / "hosts").read_text() == "node01 slots=4\nnode02 slots=4\n"


def test_plan_quotes_what_it_prints():
    assert plan.quote(["a b", "c", "$X"]) == "'a b' c '$X'"
    assert shlex.split(plan.quote(["--x=1", "it's"])) == ["--x=1", "it's"]
