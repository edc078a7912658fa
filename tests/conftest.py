import os

import pytest
import torch

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
if not torch.cuda.is_available():
    # No GPU: run the Triton kernels through Triton's interpreter on CPU tensors (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The implementations of the same update, as optimizer keyword arguments.
PATHS = {
    "loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=None),
    "fused": dict(foreach=None, fused=True),  # C++ kernel on CPU tensors
}
if not torch.cuda.is_available():
    PATHS["fused_triton"] = dict(foreach=None, fused=True)  # the GPU kernel, interpreted on CPU tensors


@pytest.fixture(autouse=True)
def _seed_and_backend(request, monkeypatch):
    torch.manual_seed(0)
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("path") == "fused_triton":
        import adamhd_dist.optim.functional as F

        monkeypatch.setattr(F, "FUSED_CPU_BACKEND", "triton")
    yield
