"""fnf vs a peer, trl's ``AlignPropTrainer``: time per optimizer step and peak memory, same tiny model and settings.

    make -s .venv/.installed && python3.11 -m venv .venv-peer \\
        && .venv-peer/bin/pip install -r benchmarks/peer_requirements.txt       # once: the peer's own venv
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peer_alignprop.py --quick     # 2 warm-up + 4 timed steps, 3 repeats

The orchestrator (this file, in fnf's venv) builds the random SD1.x-shaped model of ``benchmarks/speed.py``
(``build_random_sd``: UNet 32/64/128, text width 64, 16×16×4 latents, 32×32 images) and starts one worker
process per variant (``benchmarks/peer_worker.py``), each in its own venv, all alive at once:

- ``alignprop``: trl's ``AlignPropTrainer.step`` (``.venv-peer``: an older trl, the last that ships it);
  reward backpropagation through the last K steps (``truncated_backprop_rand=False``,
  ``truncated_backprop_timestep = num_steps - K``), LoRA rank r on the same attention projections.
- ``fnf``: ``FocusNFix`` with λ = 0 (plain DRaFT-K) through ``lightning.Trainer``, exactly as speed.py runs it:
  every step still samples the base image I0 (LoRA off, no grad) and its heatmap mask before the tuned pass.
- ``fnf-cached``: the same with ``base_cache="memory"`` and one fixed batch of (prompt, seed) pairs, so after
  the first (warm-up) step I0 comes from the cache: the step is the tuned DRaFT-K pass alone, the work AlignProp does.
- ``fnf-draft``: ``fnf`` with ``train_base="if_needed"``: at λ = 0 no step samples I0 (a new seed per item, as
  ``fnf``), so the step is the tuned DRaFT-K pass alone without any cache: fnf's plain-DRaFT setting.

Steps are interleaved: in each round every worker runs one optimizer step while the others wait, and the
order rotates from round to round (and from repeat to repeat), so drifts in machine load hit all variants
alike. Each repeat starts fresh processes. Settings for all: batch 4, 20 DDIM steps (eta 0), CFG 7.5, K = 2,
LoRA rank 16 (alpha = rank, gaussian init), AdamW lr 3e-4 / weight decay 0.1, the ColorRegion reward
(red, top-left quarter) of speed.py, fp32. Time: median over the steps after ``--warmup``; memory: peak
growth over the level before the first step (one text-encoder call already done in both), RSS sampled
every 2 ms while a step runs on CPU, ``max_memory_allocated`` on CUDA. Each worker also counts the
UNet / VAE-decoder / text-encoder calls of its last step (and how many UNet calls ran with autograd on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from peer_worker import PROTOCOL, VARIANTS
from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent


# ---- orchestrator ------------------------------------------------------------------------------------
class Worker:
    def __init__(self, variant: str, python: str, model: str, args, logdir: Path) -> None:
        self.variant, self.log = variant, logdir / f"{variant}.log"
        options = {"model": model} | {k: getattr(args, k) for k in ("device", "batch", "num_steps", "k", "rank", "guidance",
                                                 "warmup", "steps")}
        command = [python, str(Path(__file__).resolve().parent / "peer_worker.py"), f"--variant={variant}"] + [
            f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log.open("w"), text=True, bufsize=1, cwd=ROOT, env=env)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        tail = self.log.read_text().splitlines()[-25:]
        raise RuntimeError(f"worker {self.variant} died (rc={self.process.wait()}):\n" + "\n".join(tail))

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()


def peer_model_folder(model: Path, tmp: Path) -> Path:
    """The same model in the files the peer's transformers 4 reads; ``model`` itself when it already has them.

    transformers 5 (fnf's venv) saves the CLIP tokenizer as tokenizer.json only and the text encoder's weights
    without the ``text_model.`` prefix; transformers 4.57 wants the slow tokenizer's vocab.json + merges.txt (the
    model index names ``CLIPTokenizer``) and, for unprefixed weights, silently keeps a random text encoder. Both
    are renamings: the BPE table and the tensors are written out unchanged (checked by the workers' fingerprints).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = model / "text_encoder" / "model.safetensors"
    with safe_open(weights, "pt") as file:
        unprefixed = not all(key.startswith("text_model.") for key in file.keys())
    if (model / "tokenizer" / "vocab.json").exists() and not unprefixed:
        return model
    folder = tmp / "model-for-transformers-4"
    shutil.copytree(model, folder)
    tokenizer = folder / "tokenizer"
    if not (tokenizer / "vocab.json").exists():
        bpe = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
        (tokenizer / "vocab.json").write_text(json.dumps(bpe["vocab"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    if unprefixed:
        tensors = load_file(weights)
        save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()},
                  folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    return folder


def run_repeat(args, repeat: int, logdir: Path) -> dict:
    pythons = {v: args.peer_python if v == "alignprop" else args.fnf_python for v in VARIANTS}
    models = {v: args.peer_model if v == "alignprop" else args.model for v in VARIANTS}
    workers = {v: Worker(v, pythons[v], models[v], args, logdir) for v in args.variants}
    try:
        info = {v: w.read() for v, w in workers.items()}
        times = {v: [] for v in workers}
        names = list(workers)
        for round_ in range(args.warmup + args.steps):
            shift = (round_ + repeat) % len(names)
            for v in names[shift:] + names[:shift]:
                times[v].append(workers[v].ask("step")["time"])
        ends = {v: w.ask("stop") for v, w in workers.items()}
        for w in workers.values():
            w.process.stdin.close()
            if w.process.wait(timeout=120):
                raise RuntimeError(f"worker {w.variant} exited with {w.process.returncode}; see {w.log}")
    finally:
        for w in workers.values():
            if w.process.poll() is None:
                w.process.kill()
    return {v: {"median_s": statistics.median(times[v][args.warmup:]), "times": times[v], **info[v], **ends[v]}
            for v in workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: speed.py's random SD-shaped model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="fresh worker processes per repeat")
    parser.add_argument("--quick", action="store_true", help="--steps 4")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--peer-python", default=str(ROOT / ".venv-peer" / "bin" / "python"))
    parser.add_argument("--fnf-python", default=sys.executable)
    parser.add_argument("--latent-side", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.steps = 4
    args.variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if "fnf-cached" in args.variants and args.warmup < 1:
        parser.error("fnf-cached needs --warmup >= 1 (its first step fills the I0 cache)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run run_repeat's finally: no orphaned workers
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from fnf.worlds.random_sd import build_random_sd

            args.model = str(build_random_sd(Path(tmp) / "model", latent_side=args.latent_side,
                                             block_out_channels=(32, 64, 128), text_width=64))
        args.peer_model = str(peer_model_folder(Path(args.model), Path(tmp)))
        print(f"device={args.device} batch={args.batch} steps={args.num_steps} K={args.k} rank={args.rank} "
              f"CFG={args.guidance} latent={args.latent_side}² warmup={args.warmup} timed={args.steps} "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}\n{provenance(args.device)}", flush=True)
        short = {"alignprop": "AlignProp", "fnf": "fnf", "fnf-cached": "fnf cached-I0", "fnf-draft": "fnf no-I0"}
        ratios = [v for v in args.variants if v != "alignprop"] if "alignprop" in args.variants else []  # vs AlignProp
        results = []
        for repeat in range(args.repeats):
            result = run_repeat(args, repeat, Path(tmp))
            results.append(result)
            if repeat == 0:
                prints = {v: result[v]["fingerprint"] for v in args.variants}
                if len({json.dumps(f, sort_keys=True) for f in prints.values()}) > 1:
                    raise SystemExit(f"the variants do not run the same model: {prints}")
                for v in args.variants:
                    print(f"{short[v]}: versions {result[v]['versions']} LoRA params {result[v]['lora_params']} "
                          f"model {result[v]['fingerprint']}")
                print("\n| run | " + " | ".join(f"{short[v]} s/step" for v in args.variants) + " | "
                      + "".join(f"{short[v]} / AlignProp time | " for v in ratios)
                      + " | ".join(f"{short[v]} MB" for v in args.variants) + " | "
                      + "".join(f"{short[v]} / AlignProp memory | " for v in ratios))
                print("|---" * (1 + 2 * len(args.variants) + 2 * len(ratios)) + "|")
            row = [f"{result[v]['median_s']:.3f}" for v in args.variants]
            row += [f"{result[v]['median_s'] / result['alignprop']['median_s']:.3f}" for v in ratios]
            row += [f"{result[v]['peak_mb']:.1f}" for v in args.variants]
            row += [f"{result[v]['peak_mb'] / max(result['alignprop']['peak_mb'], 1e-9):.3f}" for v in ratios]
            print(f"| {repeat + 1} | " + " | ".join(row) + " |", flush=True)
        if ratios:
            medians = [f"**{statistics.median(r[v]['median_s'] / r['alignprop']['median_s'] for r in results):.3f}**"
                       for v in ratios]
            memories = [f"**{statistics.median(r[v]['peak_mb'] / max(r['alignprop']['peak_mb'], 1e-9) for r in results):.3f}**"
                         for v in ratios]
            blank = [""] * len(args.variants)
            print("| " + " | ".join(["**median**", *blank, *medians, *blank, *memories]) + " |")
            paired = {v: [t / a for r in results for t, a in zip(r[v]["times"][args.warmup:],
                                                              r["alignprop"]["times"][args.warmup:])] for v in ratios}
            print("\nPaired time ratio (each timed round's step over AlignProp's step in the same round, all runs): "
                  + "; ".join(f"{short[v]} / AlignProp median {statistics.median(paired[v]):.3f} "
                              f"(min {min(paired[v]):.3f}, max {max(paired[v]):.3f}, n={len(paired[v])})" for v in ratios))
        print("\nWork in one step (last timed step of run 1; calls = forward calls incl. checkpoint recomputes, "
              "autograd = of those, run with autograd on; one UNet call = a CFG batch of 2×batch):\n")
        print("| variant | UNet calls | UNet with autograd | VAE-decoder calls | VAE-decoder with autograd "
              "| text-encoder calls |\n|---|---|---|---|---|---|")
        for v in args.variants:
            work = results[0][v]["work"]
            get = lambda name, key: work.get(name, {}).get(key, 0)  # noqa: E731
            print(f"| {short[v]} | {get('unet', 'calls')} | {get('unet', 'with_autograd')} | "
                  f"{get('vae_decoder', 'calls')} | {get('vae_decoder', 'with_autograd')} | "
                  f"{get('text_encoder', 'calls')} |")
        print(f"\nPer-step times (s; the first {args.warmup} of each are warm-up):")
        for repeat, result in enumerate(results):
            print(f"- run {repeat + 1}: " + "; ".join(
                f"{short[v]} " + " ".join(f"{t:.2f}" for t in result[v]["times"]) for v in args.variants))
    print(f"\nwall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
