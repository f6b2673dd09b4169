"""Retrain everything the shapes world ships, deterministically: the reward heads, then the two text-to-image models.

    OMP_WAIT_POLICY=PASSIVE python -m fnf.worlds.shapes.train_all --out fnf/worlds/shapes/weights

About 5 minutes for the heads, 20-30 minutes for shapes-t2i and up to an hour for shapes-flow (which starts
from shapes-t2i's VAE and text encoder) on 2 CPU cores (see the model cards).
The default recipes are the shipped ones; each step writes its own card data (training_info.json,
REWARDS_CARD numbers), and the same command on the same thread counts gives the same weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fnf.worlds.shapes import train_flow, train_rewards, train_t2i


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    train_rewards.main(["--out", str(args.out)])
    rewards = time.perf_counter() - start
    train_t2i.main(["--out", str(args.out / "shapes-t2i"), "--seed", "0"])
    t2i = time.perf_counter() - start
    train_flow.main(["--out", str(args.out / "shapes-flow"), "--t2i", str(args.out / "shapes-t2i"), "--seed", "0"])
    total = time.perf_counter() - start
    print(f"reward heads {rewards / 60:.1f} min, shapes-t2i {(t2i - rewards) / 60:.1f} min, "
          f"shapes-flow {(total - t2i) / 60:.1f} min, total {total / 60:.1f} min")


if __name__ == "__main__":
    main()
