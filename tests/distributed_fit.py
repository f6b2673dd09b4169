"""Helpers of the multi-process tests (test_ddp.py, test_fsdp.py): ``fnf fit`` in a subprocess on the tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fit(tmp_path: Path, model: str, name: str, batch_size: int, args: tuple[str, ...] = (),
        **trainer) -> dict[str, torch.Tensor]:
    """3 steps of ``fnf fit`` on 8 prompts, logged to ``tmp_path/name``; ``trainer`` keys (devices, strategy,
    callbacks, ...) extend the trainer config, ``args`` are extra command-line arguments. Returns the LoRA weights
    of the final checkpoint (of a checkpoint, if a callback writes several). One process runs in this one (the
    suite's time: an ``fnf`` process takes ~10 s to start), more as ``fnf fit`` and its launcher run them."""
    if trainer.get("devices", 1) == 1:
        from fnf.cli import main

        command, _ = _fit_command(tmp_path, model, name, batch_size, args, **trainer)
        main(command[command.index("fit"):])
    else:
        done = launch(tmp_path, model, name, batch_size, args, **trainer)
        assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = next((tmp_path / name / "checkpoints").glob("*.ckpt"))
    return torch.load(checkpoint, weights_only=True)["state_dict"]


def launch(tmp_path: Path, model: str, name: str, batch_size: int, args: tuple[str, ...] = (),
           timeout: float = 600, **trainer) -> subprocess.CompletedProcess:
    """``fnf fit`` as ``fit`` runs it (``trainer`` may override max_steps), whatever its outcome."""
    command, env = _fit_command(tmp_path, model, name, batch_size, args, **trainer)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def launch_each_rank(tmp_path: Path, model: str, name: str, ranks: int, args: tuple[str, ...] = (),
                     **trainer) -> list[subprocess.Popen]:
    """``fnf fit`` started once per rank, as srun or torchrun start them (no launcher watching the ranks): the
    processes, stderr piped; ``trainer`` needs ``devices=ranks``."""
    command, env = _fit_command(tmp_path, model, name, 1, args, **trainer)
    return [subprocess.Popen(command, env={**env, "LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(ranks)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in range(ranks)]


def _fit_command(tmp_path: Path, model: str, name: str, batch_size: int, args: tuple[str, ...],
                 **trainer) -> tuple[list[str], dict[str, str]]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {c} {s} {p}\n" for c in ("red", "blue") for s in ("circle", "square")
                               for p in ("top left", "bottom right")))  # 8 prompts
    run = tmp_path / name
    config = {
        "seed_everything": 3,
        # λ = 0 and SGD: the unsquared Frobenius penalty's gradient (I − I0)/‖I − I0‖ and Adam's g/(|g| + eps)
        # are unit-scale directions of near-zero differences in the first steps, so they amplify the 1e-7
        # float noise of batch-2 vs batch-4 kernels into 1e-4 weight differences; DDP itself is exact.
        "model": {"pretrained": model, "lam": 0.0, "lora": {"rank": 4}, "sampler": {"num_steps": 3, "k": 2},
                  "rewards": [{"head": {"class_path": "ColorRegion"}, "mask": "heatmap"}],
                  "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}},
        "data": {"train_file": str(prompts), "batch_size": batch_size},
        "trainer": {"max_steps": 3, "accelerator": "cpu", "devices": 1, "default_root_dir": str(run),
                    "enable_progress_bar": False, "logger": False, **trainer},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # probe callbacks
    return [sys.executable, "-m", "fnf.cli", "fit", "--config", str(path), *args], env
