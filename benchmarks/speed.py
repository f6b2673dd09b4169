"""Step time and peak memory of the fnf training step vs a hand-written DRaFT-K loop, in one run.

    python benchmarks/speed.py              # overhead table + memory vs K and vs total steps
    python benchmarks/speed.py --quick      # fewer timed steps
    OMP_NUM_THREADS=1 python benchmarks/speed.py --interleave --steps 20   # time ratio, variants step by step

Both variants train the same random SD1.x-shaped model (plain diffusers + peft for the hand-written
loop, ``fnf`` through ``lightning.Trainer`` for ours) on the same prompts, seeds and settings: base
pass with the adapter disabled, heatmap mask, DRaFT-K tuned pass with per-step checkpointing,
reward + unsquared Frobenius penalty, AdamW. Each variant runs in its own process; memory is the peak
growth over the level before the first training step (loaded model): resident-set size sampled every
2 ms on CPU (activations, gradients, optimizer state, allocator caches), ``max_memory_allocated`` on CUDA.
Times are medians over the steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from peak_memory import PeakMemory
from provenance import provenance

PROMPTS = ["a red circle top left", "a blue square bottom right", "a green circle", "a red square"]


class HandWrittenLoop:
    """The hand-written reference: diffusers + peft only, no Lightning, no fnf. ``step(i)`` trains on batch i."""

    def __init__(self, args) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import AutoTokenizer, CLIPTextModel

        path, self.device, self.args = args.model, args.device, args
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(self.device).requires_grad_(False)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(self.device).requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(self.device).requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        self.scheduler.set_timesteps(args.num_steps)
        self.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        self.optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)
        with torch.no_grad():
            self.uncond = self.encode([""]).expand(args.batch, -1, -1)
        self.processor_calls = {type(m.processor).__call__ for m in self.unet.modules() if hasattr(m, "processor")}

    @contextmanager
    def diffusers_as_shipped(self):
        """diffusers inspecting each attention processor's signature on every call, as a hand-written loop has it:
        fnf's model, once loaded in this process, keeps those signatures (``remember_processor_signatures``)."""
        kept = {call: vars(call).pop("__signature__") for call in self.processor_calls if "__signature__" in vars(call)}
        try:
            yield
        finally:
            for call, signature in kept.items():
                call.__signature__ = signature

    def encode(self, prompts):
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def denoise(self, x, t, text):
        eps_u, eps_c = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([self.uncond, text])).sample.chunk(2)
        return self.scheduler.step(eps_u + self.args.guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample

    def decode(self, latents):
        return (self.vae.decode(latents / self.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    def sample(self, x, text, k):
        from torch.utils.checkpoint import checkpoint

        n = len(self.scheduler.timesteps)
        with torch.no_grad():
            for t in self.scheduler.timesteps[: n - k]:
                x = self.denoise(x, t, text)
        for t in self.scheduler.timesteps[n - k:]:
            x = checkpoint(self.denoise, x, t, text, use_reentrant=False) if k else self.denoise(x, t, text)
        return checkpoint(self.decode, x, use_reentrant=False) if k else self.decode(x)

    def reward(self, images):  # ColorRegion((1, 0, 0), top-left quarter)
        side = images.shape[-1] // 2
        red = torch.tensor([1.0, 0.0, 0.0], device=self.device)[:, None, None]
        distance = ((images - red) ** 2).mean(1, keepdim=True)
        region = torch.zeros_like(distance[:1])
        region[..., :side, :side] = 1
        return -(distance * region).sum((1, 2, 3)) / region.sum(), (distance * region).clamp(0, 1)

    def step(self, i: int) -> None:
        with self.diffusers_as_shipped():
            self._step(i)

    def _step(self, i: int) -> None:
        args, unet = self.args, self.unet
        prompts = [PROMPTS[(i * args.batch + j) % len(PROMPTS)] for j in range(args.batch)]
        seeds = [i * args.batch + j for j in range(args.batch)]
        shape = (4, unet.config.sample_size, unet.config.sample_size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(self.device)
        with torch.no_grad():
            text = self.encode(prompts)
            unet.disable_adapters()
            base = self.sample(noise, text, 0)
            unet.enable_adapters()
            _, heatmap = self.reward(base)
            mask = F.max_pool2d((heatmap >= 0.5).float(), 3, stride=1, padding=1)
        tuned = self.sample(noise, text, args.k)
        score, _ = self.reward(tuned)
        penalty = torch.linalg.vector_norm(((1 - mask) * (tuned - base)).flatten(1), dim=1)
        loss = -score.mean() + args.lam * penalty.mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()


def run_manual(args) -> tuple[list[float], int]:
    loop, times = HandWrittenLoop(args), []
    for i in range(args.warmup + args.steps):
        if i == 0:
            memory = PeakMemory(args.device)
            memory.start()
        start = time.perf_counter()
        loop.step(i)
        times.append(time.perf_counter() - start)
    return times[args.warmup:], memory.stop()


def run_fnf(args, partner: HandWrittenLoop | None = None) -> tuple[list[float], int]:
    """fnf's FocusNFix through lightning.Trainer, timed per batch by a callback.

    With ``partner``, one hand-written step runs next to every fnf step in the same process (before it on odd
    batches, after it on even ones), so both variants see the same machine load; returns per-pair
    (fnf wall, hand-written wall, fnf CPU, hand-written CPU) seconds instead of wall times.
    """
    from functools import partial

    import lightning as L
    from torch.utils.data import DataLoader

    from fnf.data import collate
    from fnf.masks import MaskArgs
    from fnf.module import FocusNFix, RewardTerm
    from fnf.pipeline import LoraArgs
    from fnf.rewards import ColorRegion
    from fnf.sampling import SamplerArgs

    def clocks() -> tuple[float, float]:
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter(), time.thread_time()  # thread CPU time: compute runs here with 1 thread

    def timed_partner_step(i: int) -> tuple[float, float]:
        wall, cpu = clocks()
        partner.step(i)
        end_wall, end_cpu = clocks()
        return end_wall - wall, end_cpu - cpu

    class Timer(L.Callback):
        """A step's time runs from one step's end to the next one's, less the partner's step when it ran in between:
        Lightning's batch fetch and loop are in it, as the whole step is in the hand-written loop's."""

        def __init__(self):
            self.times, self.memory, self.partner_times = [], PeakMemory(args.device), {}

        def on_train_start(self, trainer, module):
            with torch.no_grad():  # same state as the hand-written loop at its start: one text-encoder call
                module.model.encode_prompts([""])  # done (cuBLAS / oneDNN workspaces exist), no training step yet
            self.memory.start()
            self.start = clocks()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if partner is not None and batch_idx % 2:
                paused = clocks()
                self.partner_times[batch_idx] = timed_partner_step(batch_idx)
                resumed = clocks()  # the partner's step and its clocks' own cost are not fnf's
                self.start = tuple(s + r - p for s, r, p in zip(self.start, resumed, paused))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            end = clocks()
            self.times.append((end[0] - self.start[0], end[1] - self.start[1]))
            if partner is not None and batch_idx % 2 == 0:
                self.partner_times[batch_idx] = timed_partner_step(batch_idx)
            self.start = clocks()

    module = FocusNFix(
        rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=args.model, lam=args.lam,
        sampler=SamplerArgs(num_steps=args.num_steps, k=args.k, guidance_scale=args.guidance, grad_mode=args.grad_mode),
        masks=MaskArgs(threshold=0.5, dilation=1), lora=LoraArgs(rank=args.rank),
        optimizer=partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.1), base_cache=args.base_cache,
    )
    n = args.warmup + args.steps
    # with the I0 cache, every step re-uses the first batch: only step 0 samples I0 and computes masks
    distinct = args.batch if args.base_cache == "memory" else n * args.batch
    items = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i % distinct} for i in range(n * args.batch)]
    timer = Timer()
    L.Trainer(max_steps=n, accelerator=args.device, logger=False, enable_checkpointing=False, callbacks=[timer],
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
        module, DataLoader(items, batch_size=args.batch, collate_fn=collate))
    if partner is not None:
        return [(timer.times[i][0], timer.partner_times[i][0], timer.times[i][1], timer.partner_times[i][1])
                for i in range(args.warmup, n)], 0
    return [wall for wall, _ in timer.times[args.warmup:]], timer.memory.stop()


def interleaved(args) -> None:
    """Both variants in one process, step by step: the time ratio without the drift between processes."""
    torch.manual_seed(0)
    pairs, _ = run_fnf(args, partner=HandWrittenLoop(args))
    print("\n| step | fnf s | hand-written s | wall ratio | fnf CPU s | hand-written CPU s | CPU ratio |\n"
          "|---|---|---|---|---|---|---|")
    for i, (ours, manual, ours_cpu, manual_cpu) in enumerate(pairs):
        print(f"| {i + 1} | {ours:.3f} | {manual:.3f} | {ours / manual:.3f} | {ours_cpu:.3f} | {manual_cpu:.3f} | "
              f"{ours_cpu / manual_cpu:.3f} |")
    wall = statistics.median(p[0] / p[1] for p in pairs)
    cpu = statistics.median(p[2] / p[3] for p in pairs)
    total = sum(p[0] for p in pairs) / sum(p[1] for p in pairs)
    print(f"| **median** | | | **{wall:.3f}** | | | **{cpu:.3f}** |\n\ntotal-time ratio {total:.3f} over {len(pairs)} pairs")
    for name, ours, manual in (("wall", 0, 1), ("CPU", 2, 3)):
        print(f"{name}-time ratio, geometric mean with 95% t-interval: {geometric_interval([p[ours] / p[manual] for p in pairs])}")


def geometric_interval(ratios: list[float]) -> str:
    from scipy.stats import t

    logs = [math.log(r) for r in ratios]
    mean, half = statistics.mean(logs), t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return f"{math.exp(mean):.3f} [{math.exp(mean - half):.3f}, {math.exp(mean + half):.3f}]"


def child(args) -> None:
    torch.manual_seed(0)
    times, memory = (run_fnf if args.variant == "fnf" else run_manual)(args)
    print(json.dumps({"median_s": statistics.median(times), "peak_mb": memory / 2**20}))


def measure(args, variant: str, **overrides) -> dict:
    options = {**vars(args), **overrides, "variant": variant}
    command = [sys.executable, __file__, "--child"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k not in ("child", "quick", "ratio_only", "repeats", "interleave") and v is not None]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def separate_processes(args) -> None:
    """Alternating (fnf, hand-written) process pairs: time and the memory ratio (each process its own probe)."""
    print("\n| run | hand-written s/step | fnf s/step | time ratio | hand-written MB | fnf MB | memory ratio |\n"
          "|---|---|---|---|---|---|---|")
    ratios = []
    for run in range(args.repeats):  # alternate the order so drifts in machine load hit both variants
        order = ("manual", "fnf") if run % 2 == 0 else ("fnf", "manual")
        result = {variant: measure(args, variant) for variant in order}
        manual, ours = result["manual"], result["fnf"]
        ratios.append((ours["median_s"] / manual["median_s"], ours["peak_mb"] / max(manual["peak_mb"], 1e-9)))
        print(f"| {run + 1} | {manual['median_s']:.3f} | {ours['median_s']:.3f} | {ratios[-1][0]:.3f} | "
              f"{manual['peak_mb']:.1f} | {ours['peak_mb']:.1f} | {ratios[-1][1]:.3f} |", flush=True)
    print(f"| **median** | | | **{statistics.median(r[0] for r in ratios):.3f}** | | | "
          f"**{statistics.median(r[1] for r in ratios):.3f}** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="diffusers folder (default: a random SD-shaped model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--grad-mode", default="last_k", help="fnf only: last_k (DRaFT-K) or full (DRaFT)")
    parser.add_argument("--base-cache", default="none", help="fnf only: memory = I0 and masks cached per item")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--latent-side", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="alternating fnf / hand-written process pairs (0: none)")
    parser.add_argument("--ratio-only", action="store_true", help="skip the K and total-steps tables")
    parser.add_argument("--interleave", action="store_true",
                        help="time ratio only: both variants in one process, alternating step by step")
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.steps = 4
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from fnf.worlds.random_sd import build_random_sd

            args.model = str(build_random_sd(Path(tmp) / "model", latent_side=args.latent_side,
                                             block_out_channels=(32, 64, 128), text_width=64))
        print(f"device={args.device} batch={args.batch} steps={args.num_steps} K={args.k} rank={args.rank} "
              f"latent={args.latent_side}² threads={torch.get_num_threads()}\n{provenance(args.device)}")
        if args.interleave:
            return interleaved(args)
        if args.repeats:
            separate_processes(args)
        if args.ratio_only:
            return
        print("\n| K | s/step | peak MB |\n|---|---|---|")
        for k in (1, 2, 4):
            result = measure(args, "fnf", k=k)
            print(f"| {k} | {result['median_s']:.3f} | {result['peak_mb']:.1f} |")
        result = measure(args, "fnf", grad_mode="full")
        print(f"| full ({args.num_steps}, DRaFT) | {result['median_s']:.3f} | {result['peak_mb']:.1f} |")
        print(f"\n| total steps (K={args.k}) | s/step | peak MB |\n|---|---|---|")
        for num_steps in (10, 20, 50):
            result = measure(args, "fnf", num_steps=num_steps)
            print(f"| {num_steps} | {result['median_s']:.3f} | {result['peak_mb']:.1f} |")
        print("\n| batch | s/step | images/s | peak MB |\n|---|---|---|---|")
        for batch in (1, 2, 4, 8):
            result = measure(args, "fnf", batch=batch)
            print(f"| {batch} | {result['median_s']:.3f} | {batch / result['median_s']:.2f} | {result['peak_mb']:.1f} |")
        fresh, cached = measure(args, "fnf"), measure(args, "fnf", base_cache="memory")
        print(f"\n| I0 and masks | s/step | peak MB |\n|---|---|---|\n"
              f"| computed every step | {fresh['median_s']:.3f} | {fresh['peak_mb']:.1f} |\n"
              f"| cached (base_cache: memory) | {cached['median_s']:.3f} | {cached['peak_mb']:.1f} |\n"
              f"| cost of I0 + masks | {fresh['median_s'] - cached['median_s']:.3f} | |")


if __name__ == "__main__":
    main()
