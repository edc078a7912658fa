import os

import pytest
import torch

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

# The three implementations of the same update, as optimizer keyword arguments.
PATHS = {
    "loop": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True, fused=None),
    "fused": dict(foreach=None, fused=True),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
