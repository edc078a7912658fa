"""The optimizer library installs and imports with torch alone; the layers import one way.

The core's only requirement is torch (a range); DeepSpeed, transformers, Accelerate, Triton and the training app's
dependencies are extras. These tests install the project into a fresh virtual environment that sees nothing but
torch (and its own requirements), offline, and use it there; and check in this environment that importing the
core loads no engine and that no lower layer imports a higher one.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("deepspeed", "transformers", "accelerate", "matplotlib", "datasets", "tokenizers", "triton", "tensorboard")


def _closure(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need, transitively (markers evaluated, extras not taken)."""
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _link_distributions(names: set[str], into: Path) -> None:
    """Make ``into`` a site folder holding exactly these installed distributions (symbolic links)."""
    into.mkdir()
    for name in names:
        dist = md.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (into / top).exists() and top != "__pycache__":
                (into / top).symlink_to(src)


def test_core_installs_and_steps_with_torch_alone(tmp_path):
    venv = tmp_path / "venv"
    # no pip nor setuptools of its own: this interpreter's pip installs into it (pip --python)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    only = tmp_path / "torch-only"
    # torch and what it requires; setuptools only builds this project (no build isolation: offline)
    _link_distributions(_closure(["torch"]) | {"setuptools"}, only)
    (Path(purelib) / "torch_only.pth").write_text(str(only) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    env["PIP_NO_INDEX"] = "1"
    src = tmp_path / "src"  # what a source distribution holds, so the build writes nothing into this checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "adamhd_dist", "adamhd_train", "adamhd_study"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir()
                                        else {}))
    install = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-build-isolation",
                              "--no-cache-dir", str(src)],
                             capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    code = (
        "import sys, torch, adamhd_dist\n"
        f"heavy = {HEAVY!r}\n"
        "assert not any(m.split('.')[0] in heavy for m in sys.modules), sorted(sys.modules)\n"
        "m = torch.nn.Linear(8, 4)\n"
        "opt = adamhd_dist.AdamHD(adamhd_dist.param_groups(m, weight_decay=0.1), lr=1e-2, foreach=True)\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); m(torch.randn(5, 8)).square().mean().backward(); opt.step()\n"
        "d = adamhd_dist.layer_deltas(opt)\n"
        "assert set(d) == {'weight'} and d['weight'] > 0, d\n"
        "import importlib.util as u\n"
        "print('deepspeed' if u.find_spec('deepspeed') else 'no deepspeed', adamhd_dist.__file__)\n")
    run = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout.strip()
    assert out.startswith("no deepspeed") and str(venv) in out, out  # the installed copy, in a torch-only world
    # the app and the study, installed without their extra, say which extra to install (no bare ModuleNotFoundError)
    for script in ("pretrain_gpt3.py", "compare.py"):
        app = subprocess.run([py, str(ROOT / "launch" / script), "--help"], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tmp_path)
        assert app.returncode == 2, app.stdout + app.stderr
        assert 'pip install "adamhd_dist[train]"' in app.stderr and "Traceback" not in app.stderr, app.stderr


def test_importing_the_core_loads_no_engine():
    code = ("import sys, adamhd_dist\n"
            f"heavy = {HEAVY!r}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(("
            "'torch.distributed.tensor', 'torch.distributed.fsdp', 'adamhd_dist.distributed', "
            "'adamhd_dist.integrations', 'adamhd_train', 'adamhd_study')))\n"
            "assert not bad, bad\n"
            "import adamhd_dist.deepspeed\n"  # the integration itself imports DeepSpeed only when used
            "assert 'deepspeed' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


LAYERS = ["adamhd_dist.optim", "adamhd_dist.distributed", "adamhd_dist.integrations", "adamhd_train", "adamhd_study"]


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports (relative imports resolved against ``package``)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_layers_import_only_downwards(layer):
    """app -> integrations -> distributed -> optim: no module of a layer imports a layer above it."""
    above = LAYERS[LAYERS.index(layer) + 1:]
    folder = ROOT / Path(*layer.split("."))
    for path in folder.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        package = ".".join(rel.parts[:-1]) if rel.name != "__init__" else ".".join(rel.parts[:-1])
        bad = sorted(m for m in _imports(path, package) if any(m == a or m.startswith(a + ".") for a in above))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}, a layer above {layer}"
