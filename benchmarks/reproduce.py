"""Reproduce the paper's comparison on the embedded world: base vs global DRaFT (λ = 0) vs Focus-N-Fix.

    python benchmarks/reproduce.py --quick     # ≤ 15 min on 2 CPU cores: 12 steps of batch 4, 32 evaluation prompts
    python benchmarks/reproduce.py             # the configs' budgets, 100 evaluation prompts (≤ 2 h)

Every run is ``fnf fit`` on a shipped config (``configs/artifacts.yaml``, ``configs/safety.yaml``) with
one thing changed, then ``fnf test`` on the task's evaluation prompts (disjoint from the fine-tuning
prompts, fixed seeds) with the configs' Evaluation callback: reward changes, CLIP score, FID of tuned
vs base, PSNR / SSIM outside the mask, and the analytic judge's rates (never used in training).
Tables (markdown, printed and written to ``<out>/tables.md``):

1. the main table: both tasks × {base, DRaFT, FNF} × 3 seeds, mean ± std;
2. a λ sweep on the artifact task (seed 0; 0 and the config's λ are the main table's runs);
3. a mask-source ablation on the safety task (seed 0): the ShapesSafety heatmap vs gradient saliency of
   its score, each with two dilation radii.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from fnf.cli import main as fnf

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "fnf" / "worlds" / "shapes" / "prompts"
EVAL_FILES = {"artifacts": "artifacts_eval.jsonl", "safety": "safety_eval.jsonl"}
TARGET = {"artifacts": "judge_defect_rate", "safety": "judge_unsafe_rate"}
HEAD = {"artifacts": "ShapesArtifact", "safety": "ShapesSafety"}


def fit_and_test(name: str, task: str, out: Path, quick: bool, seed: int, edit=None) -> dict:
    """One fit + test; returns test_metrics.json. ``edit(config)`` changes the config dict in place."""
    run = out / name
    metrics_file = run / "test_metrics.json"
    if metrics_file.is_file():  # resumable: finished runs are kept
        return json.loads(metrics_file.read_text())
    config = yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text())
    config["seed_everything"] = seed
    # the tables come from ``fnf test``; validation during fit would only cost time
    config["trainer"] |= {"default_root_dir": str(run), "enable_progress_bar": False, "limit_val_batches": 0}
    config["trainer"]["callbacks"][0]["init_args"]["output_dir"] = str(run)
    if quick:
        config["model"]["sampler"]["num_steps"] = 10
        config["data"]["batch_size"] = 4
        config["trainer"]["max_steps"] = 12
    if edit:
        edit(config)
    config["trainer"]["callbacks"].append({  # a checkpoint of the final step, whatever the validation schedule
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": config["trainer"]["max_steps"], "save_top_k": -1}})
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    eval_prompts = run / "eval.jsonl"
    lines = (PROMPTS / EVAL_FILES[task]).read_text().splitlines()
    eval_prompts.write_text("\n".join(lines[:32] if quick else lines[:100]) + "\n")
    fnf(["fit", "--config", str(run / "config.yaml")])  # in this process: no per-run start-up cost
    checkpoint = max(run.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    fnf(["test", "--config", str(run / "config.yaml"), "--data.test_file", str(eval_prompts), "--ckpt_path", str(checkpoint)])
    return json.loads(metrics_file.read_text())


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def row(label: str, task: str, runs: list[dict], base: bool = False) -> str:
    side = "base" if base else "tuned"
    target = [r[f"{TARGET[task]}_{side}"] for r in runs]
    change = [0.0 if base else r[f"{TARGET[task]}_tuned"] - r[f"{TARGET[task]}_base"] for r in runs]
    alignment = [0.0 if base else r["judge_alignment_tuned"] - r["judge_alignment_base"] for r in runs]
    clip = [0.0 if base else r["clip_score_tuned"] - r["clip_score_base"] for r in runs]
    reward = [0.0 if base else r[f"reward_change/{HEAD[task]}"] for r in runs]
    preservation = "— | — | —" if base else (f"{cell([r['outside_psnr'] for r in runs])} | "
                                             f"{cell([r['outside_ssim'] for r in runs], digits=3)} | "
                                             f"{cell([r['fid_tuned_vs_base'] for r in runs], digits=3)}")
    return (f"| {task} | {label} | {cell(target, 100)}% | {cell(change, 100):s} | {cell(alignment, 100)} | "
            f"{cell(clip, digits=2)} | {cell(reward, digits=3)} | {preservation} |")


HEADER = ("| task | method | target rate (judge) | Δ target (points) | Δ alignment (points) | Δ CLIP score | "
          "Δ reward | PSNR outside (dB) | SSIM outside | FID tuned vs base |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 steps of batch 4, 10 DDIM steps, 32 prompts")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    out = args.out or ROOT / "runs" / ("reproduce-quick" if args.quick else "reproduce")
    tables = ["## Base vs global DRaFT vs Focus-N-Fix (mean ± std over seeds "
              f"{', '.join(map(str, args.seeds))})\n", HEADER]
    lam = {task: yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text())["model"]["lam"] for task in TARGET}
    results: dict = {}
    for task in TARGET:
        for method, value in (("draft", 0.0), ("fnf", lam[task])):
            results[task, method] = [
                fit_and_test(f"{task}-{method}-seed{seed}", task, out, args.quick, seed,
                             lambda c, v=value: c["model"].__setitem__("lam", v)) for seed in args.seeds]
            print(f"done: {task} {method}", flush=True)
        tables += [row("base", task, results[task, "fnf"], base=True),
                   row("global DRaFT (λ = 0)", task, results[task, "draft"]),
                   row(f"Focus-N-Fix (λ = {lam[task]:g})", task, results[task, "fnf"])]

    seed = args.seeds[0]
    tables += [f"\n## λ sweep (artifact task, seed {seed})\n", HEADER]
    for value in sorted({0.0, lam["artifacts"], 0.5, 1.0}):
        name = {0.0: "draft", lam["artifacts"]: "fnf"}.get(value, f"lam{value:g}")  # reuse the main table's runs
        runs = [fit_and_test(f"artifacts-{name}-seed{seed}", "artifacts", out, args.quick, seed,
                             lambda c, v=value: c["model"].__setitem__("lam", v))]
        tables.append(row(f"λ = {value:g}", "artifacts", runs))

    tables += [f"\n## Mask source (safety task, seed {seed})\n", HEADER]
    shipped = yaml.safe_load((ROOT / "configs" / "safety.yaml").read_text())["model"]
    for source in ("heatmap", "saliency"):
        for dilation in (0, 2):
            def edit(config, source=source, dilation=dilation):
                term = config["model"]["rewards"][0]
                term["mask"] = source
                term["head"]["init_args"]["heatmap"] = "predicted" if source == "heatmap" else "none"
                config["model"]["masks"]["dilation"] = dilation

            is_shipped = shipped["rewards"][0]["mask"] == source and shipped["masks"]["dilation"] == dilation
            name = "fnf" if is_shipped else f"{source}-d{dilation}"
            runs = [fit_and_test(f"safety-{name}-seed{seed}", "safety", out, args.quick, seed, edit)]
            tables.append(row(f"{source}, dilation {dilation}", "safety", runs))
    text = "\n".join(tables) + "\n"
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
