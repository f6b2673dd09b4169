"""Step time and peak memory of the fnf training step vs a hand-written DRaFT-K loop, in one run.

    python benchmarks/speed.py              # overhead table + memory vs K and vs total steps
    python benchmarks/speed.py --quick      # fewer timed steps

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPTS = ["a red circle top left", "a blue square bottom right", "a green circle", "a red square"]


class PeakMemory:
    """Peak memory above the level at ``start()``: CUDA allocator stats, or RSS sampled every 2 ms."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._running = device, 0, False

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
        self.base, self.peak, self._running = self._rss(), self._rss(), True

        def poll() -> None:
            while self._running:
                self.peak = max(self.peak, self._rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        self._running = False
        self._thread.join()
        return max(self.peak, self._rss()) - self.base


def run_manual(args) -> list[float]:
    """The hand-written reference: diffusers + peft only, no Lightning, no fnf."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.checkpoint import checkpoint
    from transformers import AutoTokenizer, CLIPTextModel
    from diffusers import AutoencoderKL

    path, device = args.model, args.device
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device).requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device).requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    scheduler.set_timesteps(args.num_steps)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)

    def encode(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids.to(device))[0]

    def step(x, t, text, uncond):
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, text])).sample.chunk(2)
        return scheduler.step(eps_u + args.guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample

    def decode(latents):
        return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)

    def sample(x, text, uncond, k):
        n = len(scheduler.timesteps)
        with torch.no_grad():
            for t in scheduler.timesteps[: n - k]:
                x = step(x, t, text, uncond)
        for t in scheduler.timesteps[n - k:]:
            x = checkpoint(step, x, t, text, uncond, use_reentrant=False) if k else step(x, t, text, uncond)
        return checkpoint(decode, x, use_reentrant=False) if k else decode(x)

    def reward(images):  # ColorRegion((1, 0, 0), top-left quarter)
        side = images.shape[-1] // 2
        distance = ((images - torch.tensor([1.0, 0.0, 0.0], device=device)[:, None, None]) ** 2).mean(1, keepdim=True)
        region = torch.zeros_like(distance[:1])
        region[..., :side, :side] = 1
        return -(distance * region).sum((1, 2, 3)) / region.sum(), (distance * region).clamp(0, 1)

    times = []
    with torch.no_grad():
        uncond = encode([""]).expand(args.batch, -1, -1)
    for i in range(args.warmup + args.steps):
        if i == 0:
            memory = PeakMemory(device)
            memory.start()
        start = time.perf_counter()
        prompts = [PROMPTS[(i * args.batch + j) % len(PROMPTS)] for j in range(args.batch)]
        seeds = [i * args.batch + j for j in range(args.batch)]
        shape = (4, unet.config.sample_size, unet.config.sample_size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
        with torch.no_grad():
            text = encode(prompts)
            unet.disable_adapters()
            base = sample(noise, text, uncond, 0)
            unet.enable_adapters()
            _, heatmap = reward(base)
            mask = F.max_pool2d((heatmap >= 0.5).float(), 3, stride=1, padding=1)
        tuned = sample(noise, text, uncond, args.k)
        score, _ = reward(tuned)
        penalty = torch.linalg.vector_norm(((1 - mask) * (tuned - base)).flatten(1), dim=1)
        loss = -score.mean() + args.lam * penalty.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[args.warmup:], memory.stop()


def run_fnf(args) -> tuple[list[float], int]:
    """fnf's FocusNFix through lightning.Trainer, timed per batch by a callback."""
    from functools import partial

    import lightning as L
    from torch.utils.data import DataLoader

    from fnf.data import collate
    from fnf.masks import MaskArgs
    from fnf.module import FocusNFix, RewardTerm
    from fnf.pipeline import LoraArgs
    from fnf.rewards import ColorRegion
    from fnf.sampling import SamplerArgs

    class Timer(L.Callback):
        def __init__(self):
            self.times, self.memory = [], PeakMemory(args.device)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:  # same state as the hand-written loop at its start: one text-encoder call
                with torch.no_grad():  # done (cuBLAS / oneDNN workspaces exist), no training step yet
                    module.model.encode_prompts([""])
                self.memory.start()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    module = FocusNFix(
        rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=args.model, lam=args.lam,
        sampler=SamplerArgs(num_steps=args.num_steps, k=args.k, guidance_scale=args.guidance),
        masks=MaskArgs(threshold=0.5, dilation=1), lora=LoraArgs(rank=args.rank),
        optimizer=partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.1),
    )
    n = args.warmup + args.steps
    items = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(n * args.batch)]
    timer = Timer()
    L.Trainer(max_steps=n, accelerator=args.device, logger=False, enable_checkpointing=False, callbacks=[timer],
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
        module, DataLoader(items, batch_size=args.batch, collate_fn=collate))
    return timer.times[args.warmup:], timer.memory.stop()


def child(args) -> None:
    torch.manual_seed(0)
    times, memory = (run_fnf if args.variant == "fnf" else run_manual)(args)
    print(json.dumps({"median_s": statistics.median(times), "peak_mb": memory / 2**20}))


def measure(args, variant: str, **overrides) -> dict:
    options = {**vars(args), **overrides, "variant": variant}
    command = [sys.executable, __file__, "--child"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k not in ("child", "quick", "ratio_only", "repeats") and v is not None]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="diffusers folder (default: a random SD-shaped model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--latent-side", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="alternating fnf / hand-written pairs")
    parser.add_argument("--ratio-only", action="store_true", help="skip the K and total-steps tables")
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
              f"latent={args.latent_side}² torch={torch.__version__} threads={torch.get_num_threads()}")
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
        if args.ratio_only:
            return
        print("\n| K | s/step | peak MB |\n|---|---|---|")
        for k in (1, 2, 4):
            result = measure(args, "fnf", k=k)
            print(f"| {k} | {result['median_s']:.3f} | {result['peak_mb']:.1f} |")
        print(f"\n| total steps (K={args.k}) | s/step | peak MB |\n|---|---|---|")
        for num_steps in (10, 20, 50):
            result = measure(args, "fnf", num_steps=num_steps)
            print(f"| {num_steps} | {result['median_s']:.3f} | {result['peak_mb']:.1f} |")


if __name__ == "__main__":
    main()
