#!/usr/bin/env python3
"""Plan and start a multi-node pre-training job inside a SLURM allocation.

The sbatch scripts beside this file call it with the launcher's name and the training arguments:

    plan.py deepspeed [TRAIN_ARGS...]   srun starts one DeepSpeed launcher per node (--no_ssh --node_rank=$SLURM_NODEID)
    plan.py torchrun  [TRAIN_ARGS...]   srun starts one torchrun per node; they meet at a c10d rendezvous on node 0
    plan.py mpirun    [TRAIN_ARGS...]   one mpirun starts every rank; DeepSpeed finds them through mpi4py

It reads the allocation from SLURM's variables, writes the hostfile (deepspeed, mpirun), prints the plan (nodes,
ranks, master, the command of the batch step and the exact command each node runs) and replaces itself with
that command. With DRY_RUN=1 (or --dry-run) it prints the plan and starts nothing, which works outside SLURM too
with the variables set by hand:

    DRY_RUN=1 SLURM_JOB_NODELIST='node[01-02]' SLURM_GPUS_ON_NODE=8 bash launch/slurm/deepspeed.sbatch

Variables read (SLURM sets the first group):
    SLURM_JOB_NODELIST (or SLURM_NODELIST)   the allocation's hosts, e.g. "node[01-03],gpu7"; expanded with
                                             `scontrol show hostnames` when scontrol is on PATH, else here
    SLURM_NNODES (or SLURM_JOB_NUM_NODES)    number of nodes; must match the node list when set
    SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE  GPUs per node (GPUS_PER_NODE overrides both)
    SLURM_JOB_ID                             names the hostfile and the rendezvous
    SLURM_CPUS_ON_NODE                       CPUs given to each one-per-node launcher step
    SLURM_SUBMIT_DIR                         the repository root, unless REPO_DIR is set
    DS_CONFIG        DeepSpeed config, relative to the repository root (default ds_configs/zero2_adamhd.json)
    TRAIN_SCRIPT     entry script (default launch/pretrain_gpt3.py)
    MASTER_PORT      port on node 0 for torch.distributed / the rendezvous (default 29500)
    HOSTFILE         where to write the hostfile (default runs/slurm-$SLURM_JOB_ID/hostfile)
    CONTAINER_IMAGE  run inside a container: an enroot/pyxis image (srun --container-image) or an Apptainer .sif
    CONTAINER_RUNTIME  pyxis or apptainer (default: apptainer for a .sif file or directory, else pyxis)
    CONTAINER_MOUNTS   extra mounts, comma-separated SRC:DST (pyxis --container-mounts, apptainer --bind)
    CONTAINER_WORKDIR  where the repository is mounted in the container (default /workspace, the images' WORKDIR)
    SRUN_ARGS, MPIRUN_ARGS  extra options for srun / mpirun (split like a shell would)
    PYTHON           interpreter of the ranks under mpirun (default python)
Without training arguments the job trains `--model gpt3-small --out-dir runs/slurm-$SLURM_JOB_ID --resume auto`,
so a requeued job resumes from its last checkpoint.

Runs on the Python of a cluster's login/batch node: standard library only, Python 3.6+.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

LAUNCHERS = ("deepspeed", "torchrun", "mpirun")
DEFAULT_CONFIG = "ds_configs/zero2_adamhd.json"
DEFAULT_SCRIPT = "launch/pretrain_gpt3.py"

def _default_port() -> int:
    # One definition of the default rendezvous port, in the repository's stdlib-only ports module (loaded by path:
    # this script runs outside the job's Python environment, e.g. before srun enters a container).
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "adamhd_train", "ports.py")
    spec = importlib.util.spec_from_file_location("_adamhd_ports", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DEFAULT_MASTER_PORT


DEFAULT_PORT = _default_port()


def _layouts():
    # The suggested tp × pp × dp of the large sizes, from the repository's stdlib-only layouts module (by path, as
    # the port above).
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "adamhd_train",
                        "layouts.py")
    spec = importlib.util.spec_from_file_location("_adamhd_layouts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_option(args, name, default=None):
    """The value of ``--name`` in the training arguments (``--name V`` or ``--name=V``; the last one wins)."""
    value = default
    for i, arg in enumerate(args):
        if arg == "--" + name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--%s=" % name):
            value = arg.split("=", 1)[1]
    return value
DEFAULT_WORKDIR = "/workspace"
# In the one command srun runs on every node, the node's rank is SLURM's own SLURM_NODEID.
NODE_RANK_VAR = "SLURM_NODEID"
_NODE_RANK_MARK = "@NODE_RANK@"


class PlanError(Exception):
    """A problem with the allocation or the settings; the message says what to change."""


def quote(argv):
    return " ".join(shlex.quote(str(a)) for a in argv)


# ---------------------------------------------------------------------------------------------------------------
# Node lists


def _split_top_level(text, sep=","):
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise PlanError("node list %r: nested '['" % text)
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise PlanError("node list %r: ']' without '['" % text)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PlanError("node list %r: '[' without ']'" % text)
    parts.append("".join(cur))
    return parts


def _expand_range_set(body, whole):
    values = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise PlanError("node list %r: bad range %r (expected N or N-M)" % (whole, item))
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise PlanError("node list %r: range %s-%s runs backwards" % (whole, lo, hi))
        width = len(lo)  # node[01-10] keeps the zero padding of its first number
        values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return values


def expand_nodelist(text):
    """Expand a SLURM host list ("node[01-03],gpu7", "rack[1-2]-n[1,3]") into host names, in order."""
    text = text.strip()
    if not text:
        raise PlanError("the node list is empty")
    hosts = []
    for item in _split_top_level(text):
        if not item:
            raise PlanError("node list %r: empty entry" % text)
        if "[]" in item or re.search(r"[^\w.\-\[\],]", item):
            raise PlanError("node list %r: %r is not a host name or a host range like node[01-04]" % (text, item))
        pieces = [""]
        for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            if not literal and not body:
                continue
            values = _expand_range_set(body, text) if body else [""]
            pieces = [p + literal + v for p in pieces for v in values]
        hosts.extend(pieces)
    dupes = sorted({h for h in hosts if hosts.count(h) > 1})
    if dupes:
        raise PlanError("node list %r names %s more than once" % (text, ", ".join(dupes)))
    return hosts


def resolve_hosts(nodelist, env):
    """Hosts of the allocation: `scontrol show hostnames` when scontrol is there, else expand_nodelist."""
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol:
        proc = subprocess.run([scontrol, "show", "hostnames", nodelist], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
        if proc.returncode != 0:
            raise PlanError("`scontrol show hostnames %s` failed: %s" % (nodelist, proc.stderr.strip()))
        hosts = proc.stdout.split()
        if not hosts:
            raise PlanError("`scontrol show hostnames %s` printed no host" % nodelist)
        return hosts
    return expand_nodelist(nodelist)


# ---------------------------------------------------------------------------------------------------------------
# Settings


def _positive_int(name, value):
    try:
        n = int(value)
    except ValueError:
        raise PlanError("%s=%r is not a whole number" % (name, value))
    if n < 1:
        raise PlanError("%s=%s: need at least 1" % (name, n))
    return n


def gpus_per_node(env):
    if env.get("GPUS_PER_NODE"):
        return _positive_int("GPUS_PER_NODE", env["GPUS_PER_NODE"])
    if env.get("SLURM_GPUS_ON_NODE"):
        return _positive_int("SLURM_GPUS_ON_NODE", env["SLURM_GPUS_ON_NODE"])
    if env.get("SLURM_GPUS_PER_NODE"):  # "8" or "h100:8"
        return _positive_int("SLURM_GPUS_PER_NODE", env["SLURM_GPUS_PER_NODE"].rsplit(":", 1)[-1])
    raise PlanError("cannot tell how many GPUs each node has: request them with `#SBATCH --gpus-per-node=G` "
                    "(SLURM then sets SLURM_GPUS_ON_NODE) or set GPUS_PER_NODE")


class Settings(object):
    def __init__(self, launcher, train_args, env):
        self.launcher = launcher
        self.env = env
        self.repo = os.path.abspath(env.get("REPO_DIR") or env.get("SLURM_SUBMIT_DIR") or os.getcwd())

        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
        if nnodes is not None and nnodes.strip() != "":
            nnodes = _positive_int("SLURM_NNODES", nnodes.strip())
        else:
            nnodes = None
        if not nodelist:
            raise PlanError("SLURM_JOB_NODELIST is not set: submit with sbatch (or run inside salloc), or for a dry "
                            "run set it by hand, e.g. SLURM_JOB_NODELIST='node[01-02]'")
        self.hosts = resolve_hosts(nodelist, env)
        if nnodes is not None and nnodes != len(self.hosts):
            raise PlanError("SLURM_NNODES=%d but SLURM_JOB_NODELIST=%r names %d host(s): %s"
                            % (nnodes, nodelist, len(self.hosts), " ".join(self.hosts)))
        self.gpus = gpus_per_node(env)
        self.world_size = self.gpus * len(self.hosts)
        self.master = self.hosts[0]
        self.port = _positive_int("MASTER_PORT", env.get("MASTER_PORT") or DEFAULT_PORT)
        if self.port > 65535:
            raise PlanError("MASTER_PORT=%d: a port is at most 65535" % self.port)
        self.job_id = env.get("SLURM_JOB_ID") or "0"

        self.script = env.get("TRAIN_SCRIPT") or DEFAULT_SCRIPT
        self._require_file("TRAIN_SCRIPT", self.script, "the training entry script")
        self.config = None
        if launcher in ("deepspeed", "mpirun"):
            self.config = env.get("DS_CONFIG") or DEFAULT_CONFIG
            self._require_file("DS_CONFIG", self.config, "choose one of ds_configs/*.json")
        self.train_args = list(train_args) or ["--model", "gpt3-small", "--out-dir", "runs/slurm-%s" % self.job_id,
                                               "--resume", "auto"]
        self.hostfile = env.get("HOSTFILE") or "runs/slurm-%s/hostfile" % self.job_id
        # the model-parallel grid, checked here before any node starts (the launcher checks the rest)
        self.tp = _positive_int("--tp", train_option(self.train_args, "tp", "1"))
        self.pp = _positive_int("--pp", train_option(self.train_args, "pp", "1"))
        if self.world_size % (self.tp * self.pp):
            raise PlanError("--tp %d × --pp %d = %d must divide the allocation's %d GPUs (%d node(s) × %d)"
                            % (self.tp, self.pp, self.tp * self.pp, self.world_size, len(self.hosts), self.gpus))
        self.model = train_option(self.train_args, "model", "gpt3-small")

        self.image = env.get("CONTAINER_IMAGE") or ""
        runtime = env.get("CONTAINER_RUNTIME") or ""
        if runtime and not self.image:
            raise PlanError("CONTAINER_RUNTIME=%s is set but CONTAINER_IMAGE is not" % runtime)
        if self.image and not runtime:
            runtime = "apptainer" if self.image.rstrip("/").endswith(".sif") else "pyxis"
        if runtime not in ("", "pyxis", "apptainer"):
            raise PlanError("CONTAINER_RUNTIME=%r: use pyxis (srun --container-image) or apptainer" % runtime)
        if runtime == "pyxis" and launcher == "mpirun":
            raise PlanError("mpirun.sbatch cannot start its ranks in a pyxis container (pyxis wraps srun steps, "
                            "not mpirun's processes): use CONTAINER_RUNTIME=apptainer with a .sif image, or "
                            "deepspeed.sbatch / torchrun.sbatch with pyxis")
        self.runtime = runtime
        self.mounts = [m for m in (env.get("CONTAINER_MOUNTS") or "").split(",") if m.strip()]
        self.workdir = env.get("CONTAINER_WORKDIR") or DEFAULT_WORKDIR
        self.srun_args = shlex.split(env.get("SRUN_ARGS") or "")
        self.mpirun_args = shlex.split(env.get("MPIRUN_ARGS") or "")
        self.python = env.get("PYTHON") or "python"

    def _require_file(self, var, rel, hint):
        path = rel if os.path.isabs(rel) else os.path.join(self.repo, rel)
        if not os.path.isfile(path):
            raise PlanError("%s=%s: no such file under %s (%s)" % (var, rel, self.repo, hint))

    def ranks(self, node):
        return node * self.gpus, (node + 1) * self.gpus - 1

    def hostfile_text(self):
        return "".join("%s slots=%d\n" % (h, self.gpus) for h in self.hosts)


# ---------------------------------------------------------------------------------------------------------------
# Commands


def apptainer_prefix(s):
    binds = ["%s:%s" % (s.repo, s.workdir)] + s.mounts
    return ["apptainer", "exec", "--nv", "--bind", ",".join(binds), "--pwd", s.workdir, s.image]


def launcher_command(s, node_rank):
    """What one node runs (for mpirun: what each rank runs), before any container wrapping."""
    if s.launcher == "deepspeed":
        return (["deepspeed", "--hostfile=%s" % s.hostfile, "--no_ssh", "--node_rank=%s" % node_rank,
                 "--master_addr=%s" % s.master, "--master_port=%d" % s.port,
                 "--num_nodes=%d" % len(s.hosts), "--num_gpus=%d" % s.gpus,
                 s.script, "--deepspeed", s.config] + s.train_args)
    if s.launcher == "torchrun":
        return (["torchrun", "--nnodes=%d" % len(s.hosts), "--nproc-per-node=%d" % s.gpus,
                 "--rdzv-id=%s" % s.job_id, "--rdzv-backend=c10d", "--rdzv-endpoint=%s:%d" % (s.master, s.port),
                 s.script, "--fsdp"] + s.train_args)
    return [s.python, s.script, "--deepspeed", s.config] + s.train_args


def node_command(s, node):
    """The exact command node `node` runs (inside the container for apptainer; pyxis wraps the whole step)."""
    cmd = launcher_command(s, node)
    if s.runtime == "apptainer":
        cmd = apptainer_prefix(s) + cmd
    return cmd


def step_command(s):
    """The one command the batch step runs: srun (one task per node) or mpirun (one process per GPU)."""
    if s.launcher == "mpirun":
        inner = launcher_command(s, None)
        if s.runtime == "apptainer":
            inner = apptainer_prefix(s) + inner
        return (["mpirun", "-np", str(s.world_size), "--hostfile", s.hostfile,
                 "--map-by", "ppr:%d:node" % s.gpus, "--bind-to", "none", "-x", "PATH"]
                + s.mpirun_args + inner)

    srun = ["srun", "--nodes=%d" % len(s.hosts), "--ntasks=%d" % len(s.hosts), "--ntasks-per-node=1",
            "--kill-on-bad-exit=1", "--chdir=%s" % s.repo]
    cpus = s.env.get("SLURM_CPUS_ON_NODE", "").strip()
    if cpus:
        srun.append("--cpus-per-task=%s" % cpus)
    if s.runtime == "pyxis":
        mounts = ["%s:%s" % (s.repo, s.workdir)] + s.mounts
        srun += ["--container-image=%s" % s.image, "--container-mounts=%s" % ",".join(mounts),
                 "--container-workdir=%s" % s.workdir]
    srun += s.srun_args

    prefix = apptainer_prefix(s) if s.runtime == "apptainer" else []
    cmd = launcher_command(s, _NODE_RANK_MARK)
    if not any(_NODE_RANK_MARK in a for a in cmd):
        return srun + prefix + cmd
    # The node rank is known only on the node: one shell per node expands $SLURM_NODEID.
    script = "exec " + quote(cmd).replace(_NODE_RANK_MARK, '"$%s"' % NODE_RANK_VAR)
    return srun + prefix + ["bash", "-c", script]


def describe(s):
    lines = []
    how = {
        "deepspeed": "srun starts one DeepSpeed launcher per node (--no_ssh, node rank = $SLURM_NODEID)",
        "torchrun": "srun starts one torchrun per node; they meet at a c10d rendezvous on node 0",
        "mpirun": "one mpirun starts %d rank(s) per node; DeepSpeed finds them through mpi4py" % s.gpus,
    }[s.launcher]
    lines.append("launcher: %s: %s" % (s.launcher, how))
    lines.append("nodes: %d (%s); GPUs per node: %d; world size: %d"
                 % (len(s.hosts), " ".join(s.hosts), s.gpus, s.world_size))
    lines.append("ranks: dp %d × tp %d × pp %d (--tp, --pp)" % (s.world_size // (s.tp * s.pp), s.tp, s.pp))
    if s.tp > 1:
        run = ("runs with --fsdp (FSDP2 over tensor parallelism); with --deepspeed the launcher refuses it"
               if s.launcher == "torchrun" else "the launcher runs --tp with --fsdp under torchrun only, and refuses "
               "it with --deepspeed")
        lines.append("  tensor-parallel groups: %d consecutive ranks%s; --tp %s"
                     % (s.tp, " (inside one node)" if s.gpus % s.tp == 0 else
                        " (spanning nodes: %d GPUs per node)" % s.gpus, run))
    layout = _layouts().describe_layout(s.model, s.world_size)
    if layout:
        lines.append(layout)
    if s.launcher == "mpirun":
        lines.append("master: %s (rank 0; DeepSpeed's MPI discovery takes its address from `hostname -I`)"
                     % s.master)
    else:
        lines.append("master: %s:%d" % (s.master, s.port))
    if s.runtime:
        lines.append("container: %s %s (repository %s mounted at %s)" % (s.runtime, s.image, s.repo, s.workdir))
    if s.launcher in ("deepspeed", "mpirun"):
        lines.append("hostfile: %s" % s.hostfile)
        lines.extend("  " + line for line in s.hostfile_text().splitlines())
    lines.append("batch step (in %s):" % s.repo)
    lines.append("  " + quote(step_command(s)))
    lines.append("per node:")
    for node, host in enumerate(s.hosts):
        first, last = s.ranks(node)
        lines.append("  %s (node %d, ranks %d-%d): %s" % (host, node, first, last, quote(node_command(s, node))))
    return "\n".join(lines)


def write_hostfile(s):
    path = s.hostfile if os.path.isabs(s.hostfile) else os.path.join(s.repo, s.hostfile)
    d = os.path.dirname(path)
    if d and not os.path.isdir(d):
        os.makedirs(d)
    with open(path, "w") as f:
        f.write(s.hostfile_text())


def main(argv=None, env=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    dry_run = env.get("DRY_RUN", "") not in ("", "0")
    if argv and argv[0] == "--dry-run":
        dry_run, argv = True, argv[1:]
    if not argv or argv[0] not in LAUNCHERS:
        sys.stderr.write("usage: plan.py [--dry-run] {%s} [TRAIN_ARGS...]\n" % ",".join(LAUNCHERS))
        return 2
    launcher, train_args = argv[0], argv[1:]
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    try:
        s = Settings(launcher, train_args, env)
        step = step_command(s)
        if not dry_run and shutil.which(step[0], path=env.get("PATH")) is None:
            raise PlanError("%s is not on PATH: run this inside a SLURM allocation (sbatch), or set DRY_RUN=1 to "
                            "print the commands without running them" % step[0])
    except PlanError as e:
        sys.stderr.write("%s.sbatch: error: %s\n" % (launcher, e))
        return 2
    print(("dry run: nothing is started\n" if dry_run else "") + describe(s))
    sys.stdout.flush()
    if dry_run:
        return 0
    if launcher in ("deepspeed", "mpirun"):
        write_hostfile(s)
    os.chdir(s.repo)
    os.execvpe(step[0], step, env)


if __name__ == "__main__":
    sys.exit(main())
