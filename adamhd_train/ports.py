"""The default rendezvous port, and a free loopback port for a local rendezvous (standard library only: importable
before torch, and read by ``launch/slurm/plan.py`` outside any environment)."""

from __future__ import annotations

import socket

__all__ = ["DEFAULT_MASTER_PORT", "free_port"]

DEFAULT_MASTER_PORT = 29500
"""Rank 0's rendezvous port when none is given: torch.distributed's conventional port, which torchrun and the
deepspeed launcher default to (``launch/slurm/plan.py`` reads it from this file)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a local rendezvous (MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
