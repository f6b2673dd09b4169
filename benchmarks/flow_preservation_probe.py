"""Why does preservation saturate near 30 dB on shapes-flow (benchmarks/results/reproduce_flow_full.md)?

    python benchmarks/flow_preservation_probe.py k5 attn k20 train unet lam10 latent

One validation candidate of ``reproduce.py`` (flow_artifacts, λ = 1, threshold 0.5, dilation 2, heatmap, seed 0:
29.2 dB outside the judge mask) refit with one change each, through the same ``fit`` / ``evaluate`` on the 128
validation prompts: ``k5`` DRaFT-K with K = 5 instead of 2 (the fidelity gradient reaches more of the steps the
LoRA acts in); ``k20`` K = 20, every step (DRaFT's full backpropagation: does the gradient reaching all the steps
close the gap?); ``attn`` LoRA on the image stream's attention only (not the text stream nor the MLP). ``train``:
the candidate as is, evaluated on its 64 training items (the very prompts and x_T the fidelity term saw) as well
as on the validation prompts: is preservation a matter of generalising from 64 items? ``unet``: the same
candidate on shapes-t2i (``artifacts``), both splits, for comparison. ``lam10``: λ = 10 (does preservation follow
λ at all on this backbone?); ``latent``: the fidelity term on the latents (LatentFrobenius: each latent token
penalised directly) instead of the decoded pixels.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import reproduce

CANDIDATE = reproduce.Settings(1.0, 0.5, 2, "heatmap")
VARIANTS = {  # name: (task, settings, config change, splits evaluated)
    "k5": ("flow_artifacts", replace(CANDIDATE, k=5), lambda config: None, ["val"]),  # K: a setting fit applies
    "k20": ("flow_artifacts", replace(CANDIDATE, k=20), lambda config: None, ["val"]),  # all 20 Euler steps
    "attn": ("flow_artifacts", CANDIDATE, lambda config: config["model"]["lora"].update(
        target_modules=["to_q", "to_k", "to_v", "to_out.0"]), ["val"]),
    "train": ("flow_artifacts", CANDIDATE, lambda config: None, ["train", "val"]),
    "unet": ("artifacts", CANDIDATE, lambda config: None, ["train", "val"]),
    "lam10": ("flow_artifacts", replace(CANDIDATE, lam=10.0), lambda config: None, ["train", "val"]),
    "latent": ("flow_artifacts", CANDIDATE, lambda config: config["model"].update(
        regularizer={"class_path": "LatentFrobenius"}), ["train", "val"]),
}
KEYS = ("judge_defect_rate_base", "judge_defect_rate_tuned", "judge_alignment_base", "judge_alignment_tuned",
        "reference_outside_psnr", "reward_change/ShapesArtifact")


def main() -> None:
    shipped = reproduce.run_config
    for variant in sys.argv[1:] or list(VARIANTS):
        task, settings, change, splits = VARIANTS[variant]

        def run_config(task, root, quick, seed, change=change):
            config = shipped(task, root, quick, seed)
            change(config)
            return config

        reproduce.run_config = run_config
        run = reproduce.fit(task, settings, 0, reproduce.ROOT / "runs" / "flow-probe" / variant, False)
        for split in splits:
            metrics = reproduce.evaluate(task, run, split, False, 0)
            print(variant, split, {key: round(metrics[key], 4) for key in KEYS if key in metrics}, flush=True)


if __name__ == "__main__":
    main()
