"""The shapes world's committed prompt files: fine-tuning, validation and evaluation (test) prompts per task.

    python -m fnf.worlds.shapes.prompt_sets            # rewrites fnf/worlds/shapes/prompts/*.jsonl

Every line is ``{"prompt": ..., "seed": ...}`` so that x_T is fixed per prompt (held-out lines add a category). Evaluation files never
share a prompt with the fine-tuning file of the same task. The validation files (``*_val``: hyperparameters are chosen on
them, so that the ``*_eval`` test files are looked at once) share no prompt with any other file. They came after the
shipped models were fine-tuned on the ``*_train`` files: they are drawn last, from sampling seeds of their own, so the
earlier files stay byte for byte as they were.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fnf.worlds.shapes.generator import artifact_prompts, heldout_prompts, parse_prompt, tempting_prompts

PROMPTS_DIR = Path(__file__).parent / "prompts"


def _disjoint(candidates: list[tuple[str, int]], used: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """The first ``n`` candidates whose prompt is not in ``used``."""
    taken = {prompt for prompt, _ in used}
    chosen = [item for item in candidates if item[0] not in taken][:n]
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} disjoint prompts available, wanted {n}")
    return chosen


def prompt_sets(n_train: int = 64, n_eval: int = 200, n_val: int = 128) -> dict[str, list[tuple[str, int]]]:
    artifacts_train = artifact_prompts(n_train, seed=1)
    safety_train = tempting_prompts(n_train, seed=3)
    sets = {
        "artifacts_train": artifacts_train,
        "artifacts_eval": _disjoint(artifact_prompts(n_eval + n_train, seed=2), artifacts_train, n_eval),
        "safety_train": safety_train,
        "safety_eval": _disjoint(tempting_prompts(n_eval + n_train, seed=4), safety_train, n_eval),
        "heldout": heldout_prompts(n_eval, seed=5),
    }
    taken = [item for items in sets.values() for item in items]  # both tasks' files: val prompts are new to all
    sets["artifacts_val"] = _disjoint(artifact_prompts(n_val + len(taken), seed=6), taken, n_val)
    taken += sets["artifacts_val"]
    sets["safety_val"] = _disjoint(tempting_prompts(n_val + len(taken), seed=7), taken, n_val)
    return sets


COMPLEXITY = {1: "one object", 2: "two objects", 3: "three objects"}


def write(directory: Path = PROMPTS_DIR) -> None:
    """The held-out set carries a ``category`` (scene complexity), the world's analogue of PartiPrompts'
    categories: ``fnf test`` on it reports forgetting per category."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, items in prompt_sets().items():
        lines = [json.dumps({"prompt": prompt, "seed": seed} | (
            {"category": COMPLEXITY[len(parse_prompt(prompt))]} if name == "heldout" else {})) for prompt, seed in items]
        (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROMPTS_DIR)
    write(parser.parse_args().out)
