"""Host-to-GPU copies the host does not wait for.

A plain ``.to("cuda")`` of a tensor in ordinary (pageable) host memory makes the host wait until the GPU has run
everything queued before it: in a training step bound by host work (Python, op dispatch, kernel launches) that
stalls the host's run-ahead, e.g. a reward head's token ids copied after the sampling pass was queued. A copy from
pinned memory with ``non_blocking=True`` is ordered on the stream like any kernel and returns at once (PyTorch's
pinned-memory cache keeps the buffer until the copy has run)."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(cpu: Tensor, device: torch.device | str) -> Tensor:
    """``cpu`` on ``device``: from pinned memory without waiting on a GPU; a plain copy elsewhere."""
    if torch.device(device).type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)
