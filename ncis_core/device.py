"""Devices and seeds: ``device: auto | cpu | cuda | mps`` resolved in one place; process sharding.

    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

__all__ = ["resolve_device", "seed_everything", "process_state", "broadcast", "intra_op_threads"]

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable device fails with a message."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("run.device=mps but MPS is not available; use run.device=auto or cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def process_state(device_name: str = "auto"):
    """``(accelerate PartialState, torch.device)`` for a stage that shards across processes."""
    from accelerate import PartialState

    device = resolve_device(device_name)
    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes > 1 and device.type != "cpu":
        device = state.device
    return state, device


def broadcast(state, values: list) -> list:
    """``values`` of the main process, on every process (a no-op in a single process)."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(values)
    return values


@contextlib.contextmanager
def intra_op_threads(count: int):
    """Run torch's CPU kernels on ``count`` intra-op threads inside the block (process-wide), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
