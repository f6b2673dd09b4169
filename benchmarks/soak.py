"""Long-run memory check: does the fnf fit leak? Trains for ``--minutes`` and fits a line to the RSS.

    python benchmarks/soak.py --minutes 30          # the issue's soak: embedded shapes world, small settings

The run is the main job's model and rewards (``embedded:shapes-t2i``, ShapesArtifact, heatmap masks,
base cache on, so later epochs take the cached-I0 path too) with fewer sampling steps so that many
optimizer steps fit the budget. A callback samples the resident-set size every ``--every`` steps; the
slope is a least-squares fit over the second half of the samples (after allocator warm-up and after
the base cache is full), printed in MB per hour with the first/last RSS.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from fnf.data import collate
from fnf.masks import MaskArgs
from fnf.module import FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs
from fnf.rewards import ShapesArtifact
from fnf.sampling import SamplerArgs
from fnf.worlds.shapes.generator import artifact_prompts


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


class RSSRecorder(L.Callback):
    def __init__(self, every: int, deadline: float) -> None:
        self.every, self.deadline, self.samples = every, deadline, []  # (elapsed s, step, RSS MB)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.samples.append((time.perf_counter() - self.start, trainer.global_step, rss_mb()))
        if time.perf_counter() > self.deadline:
            trainer.should_stop = True


def slope_mb_per_hour(samples: list[tuple[float, int, float]]) -> float:
    seconds, _, rss = zip(*samples)
    return statistics.linear_regression(seconds, rss).slope * 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--every", type=int, default=10, help="record RSS every N optimizer steps")
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = FocusNFix(rewards=[RewardTerm(ShapesArtifact(), mask="heatmap")], pretrained="embedded:shapes-t2i",
                       lam=0.25, sampler=SamplerArgs(num_steps=8, k=2, guidance_scale=4.0),
                       masks=MaskArgs(dilation=2), lora=LoraArgs(rank=8), base_cache="memory",
                       optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    items = [{"prompt": p, "seed": s} for p, s in artifact_prompts(args.prompts, seed=1)]
    recorder = RSSRecorder(args.every, time.perf_counter() + 60 * args.minutes)
    L.Trainer(max_steps=10**9, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[recorder], limit_val_batches=0).fit(
        module, DataLoader(items, batch_size=4, shuffle=True, collate_fn=collate))
    samples = recorder.samples
    tail = samples[len(samples) // 2:]
    print(f"{samples[-1][1]} optimizer steps in {samples[-1][0] / 60:.1f} min; RSS {samples[0][2]:.0f} MB at step "
          f"{samples[0][1]}, {samples[len(samples) // 2][2]:.0f} MB at step {tail[0][1]}, {samples[-1][2]:.0f} MB at "
          f"the end; slope over the second half: {slope_mb_per_hour(tail):+.1f} MB/hour ({len(tail)} samples)")
    print("step,seconds,rss_mb")
    for seconds, step, rss in samples:
        print(f"{step},{seconds:.0f},{rss:.1f}")


if __name__ == "__main__":
    main()
