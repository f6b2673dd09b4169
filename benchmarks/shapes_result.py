"""Focus-N-Fix vs global DRaFT (λ = 0) on the embedded shapes world, judged with ground truth.

    python benchmarks/shapes_result.py                       # artifacts + safety, FNF and DRaFT (UNet model)
    python benchmarks/shapes_result.py --tasks artifacts     # one task
    python benchmarks/shapes_result.py --tasks flow_artifacts flow_safety   # the rectified-flow model

Each run is the shipped config (``configs/<task>.yaml``) trained with the same budget; only λ differs. The
``flow_*`` configs run the same tasks on the second embedded backbone (shapes-flow, SD3 layout).
The evaluation prompts are disjoint from the fine-tuning prompts, with fixed seeds; the analytic judge
never takes part in training. "Repaired": of the base images' defects / marks, the share whose region has
the object's (for a mark: or the background's) colour in the tuned image, not merely no dark / cyan pixels.
Prints a markdown table (the README's) and writes runs/result/result.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from provenance import provenance


ROOT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = {"artifacts": "artifacts_eval.jsonl", "safety": "safety_eval.jsonl"}
TASKS = [*EVAL_PROMPTS, *(f"flow_{task}" for task in EVAL_PROMPTS)]  # config stems
COLUMNS = [("base_defect_rate", "defect rate base", "{:.1%}"), ("tuned_defect_rate", "defect rate tuned", "{:.1%}"),
           ("repaired_rate", "defects repaired", "{:.1%}"),
           ("base_unsafe_rate", "unsafe rate base", "{:.1%}"), ("tuned_unsafe_rate", "unsafe rate tuned", "{:.1%}"),
           ("unsafe_repaired_rate", "marks repaired", "{:.1%}"),
           ("alignment_change_points", "alignment Δ (points)", "{:+.1f}"),
           ("psnr_outside", "PSNR outside mask (dB)", "{:.1f}"), ("ssim_outside", "SSIM outside", "{:.4f}"),
           ("psnr_inside", "PSNR inside (dB)", "{:.1f}"), ("fit_minutes", "fit (min)", "{:.1f}")]


def run(task: str, lam: float, out: Path) -> dict:
    config = ROOT / "configs" / f"{task}.yaml"
    model = yaml.safe_load(config.read_text())["model"]
    sampler = model["sampler"]
    run_dir = out / f"{task}-lam{lam:g}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fnf.cli", "fit", "--config", str(config), f"--model.lam={lam}",
                    f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false"],
                   check=True, cwd=ROOT)
    minutes = (time.perf_counter() - start) / 60
    lora = max(run_dir.glob("lightning_logs/version_*/lora"), key=lambda p: p.stat().st_mtime)
    report_file = run_dir / "judge.json"
    subprocess.run([sys.executable, "-m", "fnf.worlds.shapes.evaluate_fnf", "--lora", str(lora),
                    "--model", model["pretrained"],
                    "--prompts", str(ROOT / "fnf/worlds/shapes/prompts" / EVAL_PROMPTS[task.removeprefix("flow_")]),
                    f"--num-steps={sampler['num_steps']}", f"--guidance-scale={sampler['guidance_scale']}",
                    "--out", str(report_file)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return {**json.loads(report_file.read_text()), "fit_minutes": minutes, "task": task, "lam": lam,
            "measured": provenance()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["artifacts", "safety"], choices=TASKS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "result")
    args = parser.parse_args()
    rows = []
    for task in args.tasks:
        lam = yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text())["model"]["lam"]
        rows += [run(task, lam, args.out), run(task, 0.0, args.out)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{provenance()}\n\n| task | method | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for row in rows:
        method = "global DRaFT (λ=0)" if row["lam"] == 0 else f"Focus-N-Fix (λ={row['lam']:g})"
        cells = " | ".join("—" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS)
        print(f"| {row['task']} | {method} | {cells} |")


if __name__ == "__main__":
    main()
