"""Reproduce the paper's comparison on the embedded world: base vs global DRaFT (λ = 0) vs Focus-N-Fix.

    python benchmarks/reproduce.py --quick     # 12 steps of batch 4, 10 DDIM steps, 32 validation / 32 test prompts
    python benchmarks/reproduce.py             # the configs' budgets, 128 validation / 100 test prompts
    python benchmarks/reproduce.py --tasks flow_artifacts flow_safety   # the flow-matching backbone, same protocol

Every run is ``fnf fit`` on a shipped config (``configs/artifacts.yaml``, ``configs/safety.yaml``) with the settings
under study changed, then ``fnf test`` with the configs' Evaluation callback: reward changes, CLIP score, FID of tuned
vs base, PSNR / SSIM outside the mask, and the analytic judge's rates (never used in training). The protocol:

1. Selection, on validation prompts only (``<task>_val.jsonl``, run seed = the first seed): a coordinate search from
   ``START`` (the configs' values before this protocol chose theirs), over λ in LAMS, then the mask threshold in
   THRESHOLDS, then the dilation in DILATIONS, then (only with ``--k 2 5``: more differentiable steps cost more per
   step) DRaFT-K's K, each line through the best point so far. Criterion (``choose``): among the candidates whose
   judge alignment drops by at most ``--max-alignment-drop`` points and whose PSNR outside the judge's mask is at
   least ``--min-psnr-outside`` dB, the lowest judge target rate (defect / unsafe), ties to the higher PSNR; if none
   meets both bars, the highest PSNR.
2. Test, once: the evaluation prompts (``<task>_eval.jsonl``, disjoint from the training and validation prompts)
   for global DRaFT (λ = 0, the chosen K: the same budget) and for Focus-N-Fix with the chosen values, each with
   every seed. A seed varies the LoRA
   init, the training order and the DRaFT-LV noise (``seed_everything``, with ``data.seed`` null); x_T per
   evaluation prompt is fixed by the files, so base numbers have no spread.

Preservation is measured outside the judge's ground-truth problem mask of the base image (defect and mark pixels,
dilated 2 px: the configs' ``Evaluation(reference=...)``, ``reference_outside_*``), the same pixels for every run and
candidate; PSNR outside a training mask (``outside_psnr``: every candidate is evaluated with START's threshold,
dilation and source) is kept in its own, labelled column. START is pinned here, not read from the configs: they now
hold this protocol's choice, and a re-run must not depend on its own outcome.
Tables (markdown, printed and written to ``<out>/tables.md``): the test table (both tasks × {base, DRaFT, FNF} ×
seeds, mean ± std), the selection on validation prompts (every candidate, the chosen one marked; the λ sweep is its
first line), the test rows seed by seed, Focus-N-Fix − global DRaFT item by item per seed (95% paired bootstrap
intervals over the test items, from each run's ``test_items.jsonl``), and the mask source on the safety task
(ShapesSafety heatmap vs gradient saliency, validation prompts).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from provenance import provenance

from fnf.cli import main as fnf
from fnf.jsonl import json_objects
from fnf.paired import paired_differences

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "fnf" / "worlds" / "shapes" / "prompts"
PROMPT_FILES = {"val": "{task}_val.jsonl", "test": "{task}_eval.jsonl", "train": "{task}_train.jsonl"}  # train: probes
PROMPT_COUNT = {("val", True): 32, ("val", False): None, ("test", True): 32, ("test", False): 100,  # None: all
                ("train", True): 32, ("train", False): None}
TARGET = {"artifacts": "judge_defect_rate", "safety": "judge_unsafe_rate"}
HEAD = {"artifacts": "ShapesArtifact", "safety": "ShapesSafety"}
PROBLEM = {"artifacts": "artifacts", "safety": "safety", "flow_artifacts": "artifacts", "flow_safety": "safety"}
"""Task (``configs/<task>.yaml``) -> the problem it fixes: prompts, judge target, head and START; the flow tasks
train the second embedded backbone (shapes-flow) on the same problems."""
LAMS = (0.1, 0.25, 0.5, 1.0)
THRESHOLDS = (0.3, 0.5, 0.7)
DILATIONS = (0, 2, 4)
PRESERVATION = "reference_outside_psnr"  # dB, tuned vs base outside the judge's problem mask of I0
MASK_SOURCE_TASK = "safety"  # the task whose head has both a heatmap and a scalar score for saliency


@dataclass(frozen=True)
class Settings:
    """What the selection varies. λ = 0 is global DRaFT: the mask then plays no part in training."""

    lam: float
    threshold: float
    dilation: int
    mask: str
    k: int = 2
    """DRaFT-K's differentiable steps; the configs' and the paper's 2 is left out of names and labels."""

    @property
    def name(self) -> str:
        name = "draft" if self.lam == 0 else f"lam{self.lam:g}-t{self.threshold:g}-d{self.dilation}-{self.mask}"
        return name if self.k == 2 else f"{name}-k{self.k}"

    @property
    def label(self) -> str:
        label = (f"λ = {self.lam:g}, threshold {self.threshold:g}, dilation {self.dilation}, {self.mask}"
                 if self.lam else "global DRaFT (λ = 0)")
        return label if self.k == 2 else f"{label}, K = {self.k}"

    def apply(self, config: dict) -> None:
        model, term = config["model"], config["model"]["rewards"][0]
        model["lam"] = self.lam
        model["sampler"]["k"] = self.k
        model["masks"] |= {"threshold": self.threshold, "dilation": self.dilation}
        if term["mask"] != self.mask:  # ShapesSafety: the predicted heatmap, or none (saliency of its score)
            term["mask"] = self.mask
            term["head"]["init_args"]["heatmap"] = "predicted" if self.mask == "heatmap" else "none"


START = {"artifacts": Settings(0.25, 0.5, 2, "heatmap"), "safety": Settings(0.25, 0.5, 2, "saliency")}
"""Where the search starts, and the training mask every evaluation also reports ``outside_psnr`` for."""


@dataclass(frozen=True)
class Bars:
    """What a candidate must keep (validation prompts): prompt alignment, and the image outside the mask."""

    max_alignment_drop: float = 2.0
    """Points of judge alignment, base minus tuned."""
    min_psnr_outside: float = 35.0
    """dB, tuned vs base outside the judge's problem mask: changes there are hard to see at 35 dB and above."""

    def met(self, metrics: dict) -> bool:
        drop = 100 * (metrics["judge_alignment_base"] - metrics["judge_alignment_tuned"])
        return drop <= self.max_alignment_drop and metrics[PRESERVATION] >= self.min_psnr_outside


def choose(task: str, trials: dict[Settings, dict], bars: Bars) -> Settings:
    """The selection criterion (module docstring), on validation metrics."""
    met = [s for s in trials if bars.met(trials[s])]
    if not met:
        return max(trials, key=lambda s: trials[s][PRESERVATION])
    return min(met, key=lambda s: (trials[s][f"{TARGET[PROBLEM[task]]}_tuned"], -trials[s][PRESERVATION]))


def search(task: str, start: Settings, validate: Callable[[Settings], dict], bars: Bars,
           ks: tuple[int, ...] = (2,)) -> tuple[Settings, dict[Settings, dict]]:
    """Coordinate search: λ, then threshold, then dilation, then K, each over its grid and the current value."""
    trials: dict[Settings, dict] = {}
    best = start
    for field, grid in (("lam", LAMS), ("threshold", THRESHOLDS), ("dilation", DILATIONS), ("k", ks)):
        line = [replace(best, **{field: value}) for value in sorted({*grid, getattr(best, field)})]
        for candidate in line:
            if candidate not in trials:
                trials[candidate] = validate(candidate)
        best = choose(task, {s: trials[s] for s in line}, bars)
    return best, trials


def global_draft(task: str, chosen: Settings) -> Settings:
    """The baseline Focus-N-Fix is tested against: λ = 0 at the chosen K (the same budget per step)."""
    return replace(START[PROBLEM[task]], lam=0.0, k=chosen.k)


def protocol(task: str, seeds: list[int], score: Callable[[Settings, int, str], dict], bars: Bars,
             ks: tuple[int, ...] = (2,)) -> dict:
    """Select on validation prompts with the first seed, then test DRaFT and the chosen settings once per seed."""
    chosen, trials = search(task, START[PROBLEM[task]], lambda s: score(s, seeds[0], "val"), bars, ks)
    other = {"heatmap": "saliency", "saliency": "heatmap"}[chosen.mask]
    sources = {s: score(s, seeds[0], "val") for s in (chosen, replace(chosen, mask=other))} \
        if task == MASK_SOURCE_TASK else {}
    return {"chosen": chosen, "trials": trials, "sources": sources,
            "draft": [score(global_draft(task, chosen), seed, "test") for seed in seeds],
            "fnf": [score(chosen, seed, "test") for seed in seeds]}


def run_config(task: str, root: Path, quick: bool, seed: int) -> dict:
    """The shipped config, writing under ``root``; validation during fit is off (the tables come from ``fnf test``)."""
    config = yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text())
    config["seed_everything"] = seed
    config["data"]["seed"] = None  # the training order follows the run's seed
    config["trainer"] |= {"default_root_dir": str(root), "enable_progress_bar": False, "limit_val_batches": 0}
    config["trainer"]["callbacks"][0]["init_args"]["output_dir"] = str(root)
    if quick:
        config["model"]["sampler"]["num_steps"] = 10
        config["data"]["batch_size"] = 4
        config["trainer"]["max_steps"] = 12
    return config


def run_folder(task: str, settings: Settings, seed: int, out: Path) -> Path:
    return out / f"{task}-{settings.name}-seed{seed}"


def fit(task: str, settings: Settings, seed: int, out: Path, quick: bool) -> Path:
    """``fnf fit`` once per (task, settings, seed); a finished run is kept (the script resumes where it stopped)."""
    run = run_folder(task, settings, seed, out)
    if (run / "checkpoint.txt").is_file():
        return run
    config = run_config(task, run, quick, seed)
    settings.apply(config)
    config["trainer"]["callbacks"].append({  # a checkpoint of the final step, whatever the validation schedule
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": config["trainer"]["max_steps"], "save_top_k": -1}})
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    fnf(["fit", "--config", str(run / "config.yaml")])  # in this process: no per-run start-up cost
    (run / "checkpoint.txt").write_text(str(max(run.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)))
    return run


def evaluate(task: str, run: Path, split: str, quick: bool, seed: int) -> dict:
    """``fnf test`` of a fitted run on the split's prompts, with START's masks (``outside_psnr``); the metrics."""
    metrics_file = run / f"{split}_metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    config = run_config(task, run / split, quick, seed)
    START[PROBLEM[task]].apply(config)  # the metrics' own-mask column; the LoRA under test is the checkpoint's
    lines = (PROMPTS / PROMPT_FILES[split].format(task=PROBLEM[task])).read_text().splitlines()
    prompts = run / f"{split}.jsonl"
    prompts.write_text("\n".join(lines[:PROMPT_COUNT[split, quick]]) + "\n")
    config["data"]["test_file"] = str(prompts)
    (run / f"{split}.yaml").write_text(yaml.safe_dump(config))
    fnf(["test", "--config", str(run / f"{split}.yaml"), "--ckpt_path", (run / "checkpoint.txt").read_text()])
    metrics_file.write_text((run / split / "test_metrics.json").read_text())
    return json.loads(metrics_file.read_text())


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def row(label: str, task: str, runs: list[dict], base: bool = False) -> str:
    side, target_key = "base" if base else "tuned", TARGET[PROBLEM[task]]
    target = [r[f"{target_key}_{side}"] for r in runs]
    change = [0.0 if base else r[f"{target_key}_tuned"] - r[f"{target_key}_base"] for r in runs]
    alignment = [0.0 if base else r["judge_alignment_tuned"] - r["judge_alignment_base"] for r in runs]
    clip = [0.0 if base else r["clip_score_tuned"] - r["clip_score_base"] for r in runs]
    reward = [0.0 if base else r[f"reward_change/{HEAD[PROBLEM[task]]}"] for r in runs]
    preservation = "— | — | — | —" if base else (f"{cell([r[PRESERVATION] for r in runs])} | "
                                                 f"{cell([r['reference_outside_ssim'] for r in runs], digits=3)} | "
                                                 f"{cell([r['outside_psnr'] for r in runs])} | "
                                                 f"{cell([r['fid_tuned_vs_base'] for r in runs], digits=3)}")
    return (f"| {task} | {label} | {cell(target, 100)}% | {cell(change, 100):s} | {cell(alignment, 100)} | "
            f"{cell(clip, digits=2)} | {cell(reward, digits=3)} | {preservation} |")


HEADER = ("| task | method | target rate (judge) | Δ target (points) | Δ alignment (points) | Δ CLIP score | "
          "Δ reward | PSNR outside judge mask (dB) | SSIM outside judge mask | PSNR outside start mask (dB) | "
          "FID tuned vs base |\n|---|---|---|---|---|---|---|---|---|---|---|")


def tested_items(run: Path) -> list[dict] | None:
    """The run's ``fnf test`` rows on the test prompts, one per item (fnf.item_metrics); None for a run tested
    before ``fnf test`` wrote them."""
    path = run / "test" / "test_items.jsonl"
    return [row for _, row in json_objects(path.read_text(), path)] if path.is_file() else None


def paired_columns(task: str) -> dict[str, tuple[str, float, int]]:
    """The paired table's columns: heading -> (test_items metric, scale, digits)."""
    return {"Δ target rate (points)": (f"{TARGET[PROBLEM[task]]}_tuned", 100, 1),
            "Δ alignment (points)": ("judge_alignment_tuned", 100, 1),
            "Δ reward": (f"reward_tuned/{HEAD[PROBLEM[task]]}", 1, 3),
            "Δ PSNR outside judge mask (dB)": (PRESERVATION, 1, 1)}


PAIRED_HEADER = (f"| task | seed | items | {' | '.join(paired_columns('artifacts'))} |\n"
                 f"|---|---|---|{'---|' * len(paired_columns('artifacts'))}")


def paired_row(task: str, seed: int, draft: list[dict] | None, fnf: list[dict] | None) -> str:
    """Focus-N-Fix − global DRaFT of one seed's runs on the same test items, each with its 95% paired interval."""
    columns = paired_columns(task)
    if draft is None or fnf is None:
        return f"| {task} | {seed} | — | no test_items.jsonl (not tested, or tested by older code) |{' |' * (len(columns) - 1)}"
    differences = {d.metric: d for d in paired_differences(draft, fnf)}
    cells = []
    for metric, scale, digits in columns.values():
        d = differences[metric]
        cells.append(f"{scale * d.delta:+.{digits}f} [{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}]")
    return f"| {task} | {seed} | {len(draft)} | {' | '.join(cells)} |"


def tables(results: dict[str, dict], seeds: list[int], bars: Bars, items: dict[str, list] | None = None) -> str:
    over = ", ".join(map(str, seeds))
    text = [f"{provenance()}\n\n## Test prompts: base vs global DRaFT vs Focus-N-Fix (mean ± std over seeds {over})\n\n"
            "Focus-N-Fix with the values chosen on the validation prompts; the test prompts evaluated once per run.\n",
            HEADER]
    for task, result in results.items():
        draft = global_draft(task, result["chosen"])
        text += [row("base", task, result["fnf"], base=True), row(draft.label, task, result["draft"]),
                 row(f"Focus-N-Fix ({result['chosen'].label})", task, result["fnf"])]
    text += [f"\n## Selection on validation prompts (seed {seeds[0]})\n\nBars: alignment drop ≤ "
             f"{bars.max_alignment_drop:g} points, PSNR outside the judge mask ≥ {bars.min_psnr_outside:g} dB; among "
             "those, the "
             f"lowest target rate (ties: higher PSNR). Search: λ, then threshold, then dilation"
             f"{', then K' if any(s.k != 2 for r in results.values() for s in r['trials']) else ''}.\n", HEADER]
    for task, result in results.items():
        for settings, metrics in result["trials"].items():
            missed = "" if bars.met(metrics) else " (misses a bar)"
            mark = missed + (" — **chosen**" if settings == result["chosen"] else "")
            text.append(row(settings.label + mark, task, [metrics]))
    text += ["\n## Test prompts, seed by seed (the rows the means above come from)\n", HEADER]
    for task, result in results.items():
        draft = global_draft(task, result["chosen"])
        for method, runs in ((draft.label, result["draft"]), (f"Focus-N-Fix ({result['chosen'].label})",
                                                              result["fnf"])):
            text += [row(f"{method}, seed {seed}", task, [run]) for seed, run in zip(seeds, runs)]
    if items:
        text += ["\n## Focus-N-Fix − global DRaFT on the test prompts, item by item, seed by seed\n\n"
                 "Each seed's two runs were tested on the same items (prompt, x_T). A cell: the difference of the "
                 "pooled metric, Focus-N-Fix minus global DRaFT, and its 95% paired bootstrap interval over the "
                 "items (fnf.paired, as `fnf report`): how far it could move on other test prompts of the same "
                 "kind for these two runs. The spread over training seeds is the rows' spread, not the "
                 "intervals'.\n",
                 PAIRED_HEADER]
        text += [paired_row(task, seed, draft, fnf) for task, pairs in items.items() for seed, (draft, fnf) in
                 zip(seeds, pairs)]
    for task, result in results.items():
        if result["sources"]:
            text += [f"\n## Mask source ({task}, validation prompts, seed {seeds[0]})\n", HEADER]
            text += [row(settings.label, task, [metrics]) for settings, metrics in result["sources"].items()]
    return "\n".join(text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 steps of batch 4, 10 DDIM steps, 32 prompts")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", choices=list(PROBLEM), default=list(TARGET),
                        help="configs/<task>.yaml; flow_*: the flow-matching backbone on the same problems")
    parser.add_argument("--max-alignment-drop", type=float, default=Bars.max_alignment_drop)
    parser.add_argument("--min-psnr-outside", type=float, default=Bars.min_psnr_outside)
    parser.add_argument("--k", type=int, nargs="+", default=[2],
                        help="DRaFT-K's K as a last search line (default: 2 for every task, no line: the UNet configs' "
                             "and the paper's K; the flow configs' 5 was chosen with --k 2 5)")
    args = parser.parse_args()
    out = args.out or ROOT / "runs" / ("reproduce-quick" if args.quick else "reproduce")
    bars = Bars(args.max_alignment_drop, args.min_psnr_outside)
    results = {}
    for task in args.tasks:
        def score(settings: Settings, seed: int, split: str, task: str = task) -> dict:
            return evaluate(task, fit(task, settings, seed, out, args.quick), split, args.quick, seed)

        results[task] = protocol(task, args.seeds, score, bars, tuple(args.k))
        print(f"done: {task}, chosen on validation prompts: {results[task]['chosen'].label}", flush=True)
    items = {task: [(tested_items(run_folder(task, global_draft(task, result["chosen"]), seed, out)),
                     tested_items(run_folder(task, result["chosen"], seed, out))) for seed in args.seeds]
             for task, result in results.items()}
    text = tables(results, args.seeds, bars, items)
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
