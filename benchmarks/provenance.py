"""Which code, stack and machine measured a result: one line at the top of every benchmark's output and in the
results files it writes, so each number in the READMEs can be traced to a commit."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def commit() -> str:
    """The checked-out commit, marked when tracked files differ from it (the numbers are then not that commit's)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short=10", "HEAD") or "unknown (not a git checkout)"
    return sha + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def provenance(device: str = "cpu") -> str:
    """``device``: where the measured work ran (the CPU's model and cores, or the GPU's name)."""
    import torch  # here: scripts that only start subprocesses set OMP variables before torch loads

    where = machine() if torch.device(device).type == "cpu" else torch.cuda.get_device_name(device)
    return f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit()}; torch " \
           f"{torch.__version__}; {where}"
