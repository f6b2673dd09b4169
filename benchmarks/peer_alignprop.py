"""fnf vs a peer, trl's ``AlignPropTrainer``: time per optimizer step and peak memory, same tiny model and settings.

    make -s .venv/.installed && python3.11 -m venv .venv-peer \\
        && .venv-peer/bin/pip install -r benchmarks/peer_requirements.txt       # once: the peer's own venv
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peer_alignprop.py --quick     # 2 warm-up + 4 timed steps, 3 repeats

The orchestrator (this file, in fnf's venv) builds the random SD1.x-shaped model of ``benchmarks/speed.py``
(``build_random_sd``: UNet 32/64/128, text width 64, 16×16×4 latents, 32×32 images) and starts one worker
process per variant, each in its own venv, all three alive at once:

- ``alignprop``: trl's ``AlignPropTrainer.step`` (``.venv-peer``: an older trl, the last that ships it);
  reward backpropagation through the last K steps (``truncated_backprop_rand=False``,
  ``truncated_backprop_timestep = num_steps - K``), LoRA rank r on the same attention projections.
- ``fnf``: ``FocusNFix`` with λ = 0 (plain DRaFT-K) through ``lightning.Trainer``, exactly as speed.py runs it:
  every step still samples the base image I0 (LoRA off, no grad) and its heatmap mask before the tuned pass.
- ``fnf-cached``: the same with ``base_cache="memory"`` and one fixed batch of (prompt, seed) pairs, so after
  the first (warm-up) step I0 comes from the cache: the step is the tuned DRaFT-K pass alone, the work AlignProp does.

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
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

PROMPTS = ["a red circle top left", "a blue square bottom right", "a green circle", "a red square"]
VARIANTS = ("alignprop", "fnf", "fnf-cached")
ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = "@@ "  # worker -> orchestrator lines; anything else a library prints goes to the worker's stderr


# ---- measured in every worker ---------------------------------------------------------------------
class PeakMemory:
    """Peak memory above the level at ``start()``, sampled only while a step runs (``resume`` .. ``pause``)."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self.base = device, 0, 0
        self._active = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.base = self.peak = self._rss()

        def poll() -> None:
            while self._active.wait():
                self.peak = max(self.peak, self._rss())
                time.sleep(0.002)

        threading.Thread(target=poll, daemon=True).start()

    def resume(self) -> None:
        self._active.set()

    def pause(self) -> None:
        if self.device != "cuda":
            self.peak = max(self.peak, self._rss())
        self._active.clear()

    def growth(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return self.peak - self.base


class CallCounter:
    """Forward calls per module during one step: (name, autograd on?) -> count (checkpoint recomputes count too)."""

    def __init__(self, modules: dict) -> None:
        self.counts: Counter = Counter()
        for name, module in modules.items():
            module.register_forward_pre_hook(
                lambda m, a, name=name: self.counts.update([(name, torch.is_grad_enabled())]))

    def summary(self) -> dict:
        return {name: {"calls": sum(n for (m, _), n in self.counts.items() if m == name),
                       "with_autograd": self.counts[(name, True)]}
                for name in sorted({m for m, _ in self.counts})}


def reward_color_region(images: torch.Tensor) -> torch.Tensor:
    """fnf's ColorRegion() score, written out for the peer venv: −mean squared distance to red, top-left quarter."""
    _, _, height, width = images.shape
    region = torch.zeros(1, 1, height, width, device=images.device, dtype=images.dtype)
    region[..., : height // 2, : width // 2] = 1
    color = torch.tensor([1.0, 0.0, 0.0], device=images.device, dtype=images.dtype)[None, :, None, None]
    distance = ((images - color) ** 2).mean(dim=1, keepdim=True)
    return -(distance * region).sum(dim=(1, 2, 3)) / region.sum()


class Channel:
    """stdin commands in, protocol lines out on the real stdout; fd 1 itself goes to stderr."""

    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, **message) -> None:
        self.out.write(PROTOCOL + json.dumps(message) + "\n")

    @staticmethod
    def receive() -> str:
        return sys.stdin.readline().strip()


def model_fingerprint(unet, vae, text_encoder, tokenizer) -> dict:
    """Same weights and tokens in both venvs? Weight sums per part and |sum| of one prompt's text embedding."""
    def total(module) -> float:
        return round(sum(p.double().sum().item() for n, p in module.named_parameters() if "lora_" not in n), 4)

    with torch.no_grad():
        ids = tokenizer([PROMPTS[0]], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        text = text_encoder(ids.to(text_encoder.device))[0].double().abs().sum().item()
    return {"unet": total(unet), "vae": total(vae), "text_encoder": total(text_encoder),
            "text_embedding": round(text, 3), "ids": ids[0, :8].tolist()}


def serve(channel: Channel, step, memory: PeakMemory, counter: CallCounter, n: int, device: str) -> list[float]:
    """Run ``n`` steps, each when the orchestrator says so; report its time."""
    times = []
    for _ in range(n):
        if channel.receive() != "step":
            raise SystemExit("worker: expected 'step'")
        times.append(timed(step, memory, counter, device))
        channel.send(time=times[-1])
    return times


def timed(step, memory: PeakMemory, counter: CallCounter, device: str) -> float:
    counter.counts.clear()
    memory.resume()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    memory.pause()
    return elapsed


def finish(channel: Channel, memory: PeakMemory, counter: CallCounter) -> None:
    if channel.receive() != "stop":
        raise SystemExit("worker: expected 'stop'")
    channel.send(peak_mb=memory.growth() / 2**20, work=counter.summary())


def worker_alignprop(args, channel: Channel) -> None:
    from importlib.metadata import version

    from accelerate import PartialState

    PartialState()  # trl's pipeline logs through accelerate's logger before the trainer makes its Accelerator
    from peft import LoraConfig
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    class Pipeline(DefaultDDPOStableDiffusionPipeline):
        def get_trainable_layers(self):
            """trl's own code with the rank made a setting (trl hard-codes r = alpha = 4)."""
            self.sd_pipeline.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
            for param in self.sd_pipeline.unet.parameters():
                if param.requires_grad:
                    param.data = param.to(torch.float32)
            return self.sd_pipeline.unet

    calls = iter(range(10**9))

    def prompt_fn():  # the same 4 prompts per batch as fnf's DataLoader
        return PROMPTS[next(calls) % len(PROMPTS)], {}

    def reward_fn(images, prompts, metadata):
        return reward_color_region(images), {}

    last = args.num_steps - args.k  # steps i >= last keep their gradient: the last K
    with tempfile.TemporaryDirectory() as logdir:
        config = AlignPropConfig(
            sample_num_steps=args.num_steps, sample_eta=0.0, sample_guidance_scale=args.guidance,
            train_batch_size=args.batch, train_learning_rate=3e-4, train_adam_weight_decay=0.1,
            truncated_backprop_rand=False, truncated_backprop_timestep=last, truncated_rand_backprop_minmax=(last, last),
            mixed_precision="no", log_with=None, logdir=logdir, project_kwargs={"project_dir": logdir},
            accelerator_kwargs={"cpu": args.device == "cpu"}, num_epochs=1, seed=0,
        )
        pipeline = Pipeline(args.model, use_lora=True)
        trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)  # its __init__ runs the text encoder once
        pipeline.set_progress_bar_config(disable=True)  # trl leaves a tqdm bar per sampling loop on; fnf has none
        counter = CallCounter({"unet": pipeline.unet, "vae_decoder": pipeline.vae.decoder,
                               "text_encoder": pipeline.text_encoder})
        channel.send(ready=True, versions={p: version(p) for p in ("trl", "diffusers", "peft", "transformers",
                                                                   "accelerate", "torch")},
                     lora_params=sum(p.numel() for p in trainer.trainable_layers),
                     fingerprint=model_fingerprint(pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer))
        memory = PeakMemory(args.device)
        memory.start()
        state = {"global_step": 0}

        def step():  # epoch 0: AlignPropTrainer.step saves a checkpoint only for epoch != 0
            state["global_step"] = trainer.step(0, state["global_step"])

        serve(channel, step, memory, counter, args.warmup + args.steps, args.device)
        finish(channel, memory, counter)


def worker_fnf(args, channel: Channel, cached: bool) -> None:
    from functools import partial
    from importlib.metadata import version

    import lightning as L
    from torch.utils.data import DataLoader

    from fnf.data import collate
    from fnf.masks import MaskArgs
    from fnf.module import FocusNFix, RewardTerm
    from fnf.pipeline import LoraArgs
    from fnf.rewards import ColorRegion
    from fnf.sampling import SamplerArgs

    module = FocusNFix(
        rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=args.model, lam=0.0,
        sampler=SamplerArgs(num_steps=args.num_steps, k=args.k, guidance_scale=args.guidance),
        masks=MaskArgs(threshold=0.5, dilation=1), lora=LoraArgs(rank=args.rank),
        optimizer=partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.1),
        base_cache="memory" if cached else "off",
    )
    model = module.model
    counter = CallCounter({"unet": model.unet, "vae_decoder": model.vae.decoder, "text_encoder": model.text_encoder})
    memory = PeakMemory(args.device)
    n = args.warmup + args.steps
    if cached:  # one fixed batch: I0 and its mask are sampled at the first step, then read from the cache
        items = [{"prompt": PROMPTS[j % len(PROMPTS)], "seed": j} for j in range(args.batch)] * n
    else:  # as speed.py: a new seed per item, so every step samples I0
        items = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(n * args.batch)]

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:  # same state as AlignProp's at its first step: one text-encoder call done
                with torch.no_grad():
                    module.model.encode_prompts([""])
                memory.start()
            if channel.receive() != "step":
                raise SystemExit("worker: expected 'step'")
            counter.counts.clear()
            memory.resume()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.start
            memory.pause()
            channel.send(time=elapsed)

    channel.send(ready=True, versions={p: version(p) for p in ("diffusers", "peft", "transformers", "lightning",
                                                               "torch")},
                 lora_params=sum(p.numel() for p in model.lora_parameters()),
                 fingerprint=model_fingerprint(model.unet, model.vae, model.text_encoder, model.tokenizer))
    L.Trainer(max_steps=n, accelerator=args.device, logger=False, enable_checkpointing=False, callbacks=[Steps()],
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
        module, DataLoader(items, batch_size=args.batch, collate_fn=collate))
    finish(channel, memory, counter)


def worker(args) -> None:
    channel = Channel()
    torch.manual_seed(0)
    if args.worker == "alignprop":
        worker_alignprop(args, channel)
    else:
        worker_fnf(args, channel, cached=args.worker == "fnf-cached")


# ---- orchestrator ------------------------------------------------------------------------------------
class Worker:
    def __init__(self, variant: str, python: str, model: str, args, logdir: Path) -> None:
        self.variant, self.log = variant, logdir / f"{variant}.log"
        options = {"model": model} | {k: getattr(args, k) for k in ("device", "batch", "num_steps", "k", "rank", "guidance",
                                                 "warmup", "steps")}
        command = [python, str(Path(__file__).resolve()), f"--worker={variant}"] + [
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
    pythons = {"alignprop": args.peer_python, "fnf": args.fnf_python, "fnf-cached": args.fnf_python}
    models = {"alignprop": args.peer_model, "fnf": args.model, "fnf-cached": args.model}
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


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
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
    if args.worker:
        return worker(args)
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
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}\nmachine: {machine()}", flush=True)
        short = {"alignprop": "AlignProp", "fnf": "fnf", "fnf-cached": "fnf cached-I0"}
        others = [v for v in args.variants if v != "alignprop"]
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
                      + " | ".join(f"{short[v]} / AlignProp time" for v in others) + " | "
                      + " | ".join(f"{short[v]} MB" for v in args.variants) + " | "
                      + " | ".join(f"{short[v]} / AlignProp memory" for v in others) + " |")
                print("|---" * (1 + 2 * len(args.variants) + 2 * len(others)) + "|")
            row = [f"{result[v]['median_s']:.3f}" for v in args.variants]
            if "alignprop" in result:
                row += [f"{result[v]['median_s'] / result['alignprop']['median_s']:.3f}" for v in others]
            row += [f"{result[v]['peak_mb']:.1f}" for v in args.variants]
            if "alignprop" in result:
                row += [f"{result[v]['peak_mb'] / max(result['alignprop']['peak_mb'], 1e-9):.3f}" for v in others]
            print(f"| {repeat + 1} | " + " | ".join(row) + " |", flush=True)
        if "alignprop" in args.variants and others:
            medians = [f"**{statistics.median(r[v]['median_s'] / r['alignprop']['median_s'] for r in results):.3f}**"
                       for v in others]
            memories = [f"**{statistics.median(r[v]['peak_mb'] / max(r['alignprop']['peak_mb'], 1e-9) for r in results):.3f}**"
                         for v in others]
            blank = [""] * len(args.variants)
            print("| " + " | ".join(["**median**", *blank, *medians, *blank, *memories]) + " |")
            paired = {v: [t / a for r in results for t, a in zip(r[v]["times"][args.warmup:],
                                                              r["alignprop"]["times"][args.warmup:])] for v in others}
            print("\nPaired time ratio (each timed round's step over AlignProp's step in the same round, all runs): "
                  + "; ".join(f"{short[v]} / AlignProp median {statistics.median(paired[v]):.3f} "
                              f"(min {min(paired[v]):.3f}, max {max(paired[v]):.3f}, n={len(paired[v])})" for v in others))
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
