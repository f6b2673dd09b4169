"""A method's learning rate chosen on the validation prompts, by reproduce.py's rule.

    python benchmarks/lr_probe.py --method draft                         # both UNet tasks, lr × 1, 0.3, 0.1, 0.03
    python benchmarks/lr_probe.py --method fnf --tasks flow_artifacts flow_safety
    python benchmarks/lr_probe.py --method draft --tasks artifacts --factors 1 0.1 --seeds 0

``reproduce.py`` chooses Focus-N-Fix's settings (λ, threshold, dilation: 8 candidates) on the validation prompts and
runs both methods at the configs' learning rate. Here one method's learning rate (the config's times each factor) is
chosen on the same validation prompts (seed 0) by the same rule (``reproduce.choose``: among the candidates that
meet the bars on alignment and on PSNR outside the judge mask, the lowest target rate; if none does, the highest
PSNR), then the choice is tested on the same test prompts with the same seeds. ``--method draft``: global DRaFT
(λ = 0, the config's K); ``--method fnf``: Focus-N-Fix with the config's settings (the ones reproduce.py chose).
Fits and evaluations are ``reproduce.py``'s own (``fit``, ``evaluate``; runs under ``runs/lr-probe/``, a finished
one is kept), so the factor-1 candidate with seed 0 repeats reproduce.py's fit of that seed: a control for
comparing with its tables. The last table pairs each test run with reproduce.py's run of the other method and the
same seed (``runs/reproduce``, when there; the configs' learning rate), item by item.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import yaml

import reproduce


PROBES = reproduce.ROOT / "runs" / "lr-probe"


def configured(task: str, method: str) -> reproduce.Settings:
    """The settings a method trains with in ``configs/<task>.yaml``: the config's own (Focus-N-Fix), or λ = 0 with
    START's masks (global DRaFT, as reproduce.py runs it; the masks play no part) and the config's K."""
    model = yaml.safe_load((reproduce.ROOT / "configs" / f"{task}.yaml").read_text())["model"]
    if method == "draft":
        return replace(reproduce.START[reproduce.PROBLEM[task]], lam=0.0, k=model["sampler"]["k"])
    return reproduce.Settings(model["lam"], model["masks"]["threshold"], model["masks"]["dilation"],
                              model["rewards"][0]["mask"], model["sampler"]["k"])


def score(task: str, method: str, factor: float, seed: int, split: str) -> dict:
    """``reproduce.fit`` + ``evaluate`` of the method with the config's learning rate × ``factor``."""
    shipped = reproduce.run_config

    def run_config(task: str, root, quick: bool, seed: int) -> dict:
        config = shipped(task, root, quick, seed)
        config["model"]["optimizer"]["init_args"]["lr"] *= factor
        return config

    reproduce.run_config = run_config
    try:
        out = PROBES / f"lr-x{factor:g}"
        return reproduce.evaluate(task, reproduce.fit(task, configured(task, method), seed, out, False), split,
                                  False, seed)
    finally:
        reproduce.run_config = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["draft", "fnf"], required=True,
                        help="draft: global DRaFT (λ = 0); fnf: Focus-N-Fix with the config's settings")
    parser.add_argument("--tasks", nargs="+", choices=list(reproduce.PROBLEM), default=["artifacts", "safety"])
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.03],
                        help="candidate learning rates, as multiples of the config's")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    bars = reproduce.Bars()
    selection, test, by_seed, control = [reproduce.HEADER], [reproduce.HEADER], [reproduce.HEADER], [reproduce.HEADER]
    paired = [reproduce.PAIRED_HEADER]
    for task in args.tasks:
        lr = reproduce.run_config(task, reproduce.ROOT, False, 0)["model"]["optimizer"]["init_args"]["lr"]
        name = configured(task, args.method).label
        name = name if args.method == "draft" else f"Focus-N-Fix ({name})"
        label = lambda factor: f"{name}, lr {lr * factor:g}"  # noqa: E731
        trials = {factor: score(task, args.method, factor, args.seeds[0], "val") for factor in args.factors}
        chosen = reproduce.choose(task, trials, bars)
        for factor, metrics in trials.items():
            mark = ("" if bars.met(metrics) else " (misses a bar)") + (" — **chosen**" if factor == chosen else "")
            selection.append(reproduce.row(label(factor) + mark, task, [metrics]))
        runs = [score(task, args.method, chosen, seed, "test") for seed in args.seeds]
        test += [reproduce.row("base", task, runs, base=True), reproduce.row(label(chosen), task, runs)]
        by_seed += [reproduce.row(f"{label(chosen)}, seed {seed}", task, [run]) for seed, run in zip(args.seeds, runs)]
        if 1.0 in args.factors:  # the control: reproduce.py's own fit of this seed, on the test prompts
            control.append(reproduce.row(f"{label(1.0)}, seed {args.seeds[0]}", task,
                                         [score(task, args.method, 1.0, args.seeds[0], "test")]))
        other = "fnf" if args.method == "draft" else "draft"  # reproduce.py's run of the other method, same seed
        for seed in args.seeds:
            probe = reproduce.run_folder(task, configured(task, args.method), seed, PROBES / f"lr-x{chosen:g}")
            shipped = reproduce.run_folder(task, configured(task, other), seed, reproduce.ROOT / "runs" / "reproduce")
            draft, fnf = (probe, shipped) if args.method == "draft" else (shipped, probe)
            paired.append(reproduce.paired_row(task, seed, *map(reproduce.tested_items, (draft, fnf))))
        print(f"done: {task}, chosen on validation prompts: {label(chosen)}", flush=True)
    over = ", ".join(map(str, args.seeds))
    probed, against = ("global DRaFT", "Focus-N-Fix") if args.method == "draft" else ("Focus-N-Fix", "global DRaFT")
    text = "\n".join([
        reproduce.provenance(), f"\n## Selection of the learning rate on validation prompts (seed "
        f"{args.seeds[0]})\n\nBars: alignment drop ≤ {bars.max_alignment_drop:g} points, PSNR outside the judge mask "
        f"≥ {bars.min_psnr_outside:g} dB; among those, the lowest target rate (ties: higher PSNR); none: the highest "
        "PSNR.\n", *selection, f"\n## Test prompts: the chosen learning rate (mean ± std over seeds {over})\n",
        *test, "\n## Test prompts, seed by seed\n", *by_seed,
        "\n## Control: the configs' learning rate on the test prompts (reproduce.py's row of this seed)\n",
        *control, f"\n## Focus-N-Fix − global DRaFT item by item, seed by seed: {probed} at the chosen learning "
        f"rate against reproduce.py's {against} (the configs' learning rate, runs/reproduce)\n\n"
        "A cell: the difference on the same test items and its 95% paired bootstrap interval over them (as in "
        "reproduce.py's tables).\n", *paired]) + "\n"
    (PROBES / f"tables-{args.method}-{'-'.join(args.tasks)}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
