"""Step time and peak memory of the fnf training step on SD1.5-, SDXL-, SD3.5- or FLUX.1-shaped models (random weights).

    python benchmarks/sd15_step.py                        # GPU: bf16-mixed, batch 1 and 4, checkpointing on/off
    python benchmarks/sd15_step.py --small --device cpu   # a tiny model at 32², to check the script on a CPU
    python benchmarks/sd15_step.py --strategy fsdp --batch 1 --checkpointing per_step   # FSDP1 (GPU only)
    python benchmarks/sd15_step.py --strategy fsdp2 --batch 1 --checkpointing per_step  # FSDP2 (CPU or GPU)
    python benchmarks/sd15_step.py --variants before fused frozen all all+compile --batch 1 4 8   # speed levers
    python benchmarks/sd15_step.py --variants all --batch 1 --profile 10   # torch.profiler: top 10 ops of one step
    python benchmarks/sd15_step.py --family sd3 --batch 1 --variants before all   # SD3.5-Medium-shaped, 1024²
    python benchmarks/sd15_step.py --family flux --flux-blocks 4 8 --batch 1 --variants all   # FLUX.1-dev widths

Variants (issue 12's levers; ``--checkpointing`` applies where a variant does not set it):
``before`` the step as before the levers (two sampling passes, float32 frozen weights, contiguous, no cudnn
benchmark); ``fused`` one fused base+tuned pass; ``fold`` LoRA folded in gradient-free steps; ``fold_grad`` in
the differentiable steps; ``inference`` gradient-free steps in inference mode (not an fnf setting: always on;
``before`` emulates no_grad); ``frozen`` frozen weights in the compute dtype; ``layout`` channels_last +
cudnn.benchmark; ``no_ckpt`` checkpointing off; ``all`` every lever (checkpointing off);
``all+compile`` / ``all+graphs`` the same with ``compile: unet`` / ``unet+graphs``; ``draft`` all levers with
λ = 0 and ``train_base: if_needed`` (plain DRaFT, no I0): the reference for the cost of region awareness.

``--family`` (the model; ``--sdxl`` = ``--family sdxl``), each at its native size with its published configuration
and random weights — no hub here; compute and memory do not depend on the weights' values:
``sd15`` Stable Diffusion 1.5 (UNet 860 M + VAE 84 M + CLIP-L 123 M parameters), 512², 50 DDIM steps, CFG 7.5;
``sdxl`` SDXL (UNet 2.6 B, CLIP-L + bigG), 1024², 50 DDIM steps, CFG 7.5;
``sd3`` Stable Diffusion 3.5 Medium (MMDiT-X 2.2 B, 16-channel VAE, CLIP-L + bigG with projections) **without
T5**: fnf, like diffusers, then feeds 256 zero tokens of width 4096, so the transformer's compute is the same
as with T5; a random 4.7 B T5-XXL would cost minutes to build and 19 GB (float32); 1024², 40 flow-matching
steps, CFG 4.5;
``flux`` FLUX.1 [dev]'s transformer widths with ``--flux-blocks`` double- and single-stream blocks instead of
19 + 38 (a random 12 B model is 24 GB in bf16 and minutes to build and save), CLIP-L and a 2-layer T5 with
T5-XXL's widths (the same 512 × 4096 tokens); 1024², 28 steps, embedded guidance 3.5. Each FLUX setting also
runs with the first half of each block stack (same weights, truncated in memory); the difference is the cost
of one double- plus two single-stream blocks, from which the 19 + 38-block step and peak are extrapolated
(an estimate, printed as its own row). SD3 / FLUX: LoRA also on the text stream's projections (add_q/k/v_proj,
to_add_out), as in configs/sd3 and configs/flux. Builders: SD1.5 / SDXL in ``benchmarks/unet_shaped.py``, SD3 / FLUX in
``benchmarks/flow_shaped.py``; SDXL, SD3 and FLUX weights are initialised on the run's device and saved in bf16.
The tokenizers are the shapes world's, so the text encoders' embedding tables are smaller than CLIP's 49 408
rows (same compute). One Lightning ``fit`` per setting: DRaFT-K (K = 2), LoRA rank 64 on the attention
projections, ColorRegion reward with its heatmap mask, λ = 0.1.
Time: median over the steps after ``--warmup``; memory: ``torch.cuda.max_memory_allocated`` over the
whole fit (weights included) and its growth above the level before the first step.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from fnf.compute import ComputeArgs
from fnf.data import collate
from fnf.masks import MaskArgs
from fnf.module import FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs
from fnf.rewards import ColorRegion
from fnf.sampling import SamplerArgs
from fnf.sharding import SHARDED_BLOCKS
from flow_shaped import FLUX_DEV_BLOCKS, build_flux_dev, build_sd35_medium
from provenance import provenance
from unet_shaped import build_model, build_sdxl

PROMPTS = ["a red circle top left", "a blue square bottom right", "a green circle", "a red square"]
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class Family:
    """What ``--family`` sets: the model's shape (``label``), its pipeline class and its sampling settings."""

    label: str
    pipeline: str
    """model_index.json's ``_class_name`` (a reused ``--model-dir`` must hold this)."""
    sampler: str
    num_steps: int
    guidance: str
    guidance_scale: float
    target_modules: tuple[str, ...]


FAMILIES = {
    "sd15": Family("SD1.5-shaped 512²", "StableDiffusionPipeline", "DDIM", 50, "CFG", 7.5, ATTENTION),
    "sdxl": Family("SDXL-shaped 1024²", "StableDiffusionXLPipeline", "DDIM", 50, "CFG", 7.5, ATTENTION),
    "sd3": Family("SD3.5-Medium-shaped 1024² (no T5)", "StableDiffusion3Pipeline", "flow-matching", 40, "CFG", 4.5,
                  ATTENTION + TEXT_STREAM),
    "flux": Family("FLUX.1-dev-shaped 1024²", "FluxPipeline", "flow-matching", 28, "embedded guidance", 3.5,
                   ATTENTION + TEXT_STREAM),
}


def build(directory: Path, args) -> Path:
    """Save the ``--family`` model (``--small``: a tiny one) with random weights in diffusers format."""
    device = args.build_device or args.device
    if args.family == "sdxl":
        return build_sdxl(directory, args.small, device)
    if args.family == "sd3":
        return build_sd35_medium(directory, args.small, device)
    if args.family == "flux":
        return build_flux_dev(directory, args.small, tuple(args.flux_blocks), device)
    return build_model(directory, args.small)


class StepProbe(L.Callback):
    """Per-step wall time and CUDA peak memory (the allocator's view: tensors, not the cache)."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self.start_allocated = device, [], 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            if batch_idx == 0:
                self.start_allocated = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def strategy(name: str):
    """``auto``; ``fsdp``: FSDP1 sharding every UNet transformer / ResNet block or MMDiT / FLUX block
    (``fnf.sharding.SHARDED_BLOCKS``; ``use_orig_params`` lets frozen weights and trainable LoRA weights share a
    flat parameter; torch's FSDP1 refuses CPU devices, so GPUs only);
    ``fsdp2``: ModelParallelStrategy, where ``FocusNFix.configure_model`` shards the same blocks (fnf/sharding.py;
    CPU or GPU; one process here, so a mesh of 1: the code path, not the memory saving)."""
    if name == "auto":
        return "auto"
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False)
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(use_orig_params=True, auto_wrap_policy=set(SHARDED_BLOCKS))


BEFORE = dict(fused_base=False, fold_lora=False, fold_lora_grad=False, inference_mode=False, frozen_dtype="float32",
              memory_format="contiguous", benchmark=False)
ALL = dict(fused_base=True, fold_lora=True, fold_lora_grad=True, inference_mode=True, frozen_dtype="auto",
           memory_format="channels_last", benchmark=True, checkpointing="off")
VARIANTS = {
    "before": BEFORE, "fused": BEFORE | dict(fused_base=True), "fold": BEFORE | dict(fold_lora=True),
    "fold_grad": BEFORE | dict(fold_lora_grad=True), "inference": BEFORE | dict(inference_mode=True),
    "frozen": BEFORE | dict(frozen_dtype="auto"),
    "layout": BEFORE | dict(memory_format="channels_last", benchmark=True), "no_ckpt": BEFORE | dict(checkpointing="off"),
    "all": ALL, "all+compile": ALL | dict(compile="unet"), "all+graphs": ALL | dict(compile="unet+graphs"),
    "draft": ALL | dict(lam=0.0, train_base="if_needed"),
}


class Profile(L.Callback):
    """torch.profiler over one training step (the last one): the ops with the most CPU and device time."""

    def __init__(self, step: int, rows: int) -> None:
        self.step, self.rows = step, rows

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.step:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            for key in ("cpu_time_total", "device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"):
                print(f"\n```\n{averages.table(sort_by=key, row_limit=self.rows)}\n```", flush=True)


def measure(model: Path, args, batch: int, checkpointing: str, precision: str, variant: str = "before",
            blocks: tuple[int, int] | None = None) -> dict:
    """One ``fit`` of ``--warmup`` + ``--steps`` steps; ``blocks`` (FLUX): keep only the first (double, single)
    transformer blocks of the loaded model (the same weights), for the per-block cost."""
    levers = {"checkpointing": checkpointing, "lam": 0.1, "train_base": "always", "compile": "none"} | VARIANTS[variant]
    family = FAMILIES[args.family]
    torch.backends.cudnn.benchmark = levers["benchmark"]
    module = FocusNFix(
        rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=str(model), lam=levers["lam"],
        sampler=SamplerArgs(num_steps=args.num_steps, k=args.k, guidance_scale=family.guidance_scale,
                            checkpointing=levers["checkpointing"], fused_base=levers["fused_base"],
                            fold_lora=levers["fold_lora"], fold_lora_grad=levers["fold_lora_grad"],
                            resolution=args.resolution),
        masks=MaskArgs(threshold=0.5, dilation=1),
        lora=LoraArgs(rank=args.rank, target_modules=list(family.target_modules)),
        optimizer=partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.1), train_base=levers["train_base"],
        compute=ComputeArgs(frozen_dtype=levers["frozen_dtype"], memory_format=levers["memory_format"],
                            compile=levers["compile"]),
    )
    if not levers["inference_mode"]:  # gradient-free steps under no_grad, as before issue 12 (not an fnf setting)
        module.model.gradient_free_mode = torch.no_grad
    if blocks is not None:  # before fit: the optimizer and the LoRA passes only see the blocks kept
        transformer = module.model.denoiser
        transformer.transformer_blocks = transformer.transformer_blocks[:blocks[0]]
        transformer.single_transformer_blocks = transformer.single_transformer_blocks[:blocks[1]]
    n = args.warmup + args.steps
    items = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(n * batch)]
    probe = StepProbe(args.device)
    callbacks = [probe] + ([Profile(n - 1, args.profile)] if args.profile else [])
    trainer = L.Trainer(max_steps=n, accelerator=args.device, devices=1, precision=precision, logger=False,
                        strategy=strategy(args.strategy), benchmark=levers["benchmark"],
                        enable_checkpointing=False, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(items, batch_size=batch, collate_fn=collate))
    finite = all(torch.isfinite(p.full_tensor() if isinstance(p, DTensor) else p).all()
                 for p in module.model.lora_parameters())
    result = {"batch": batch, "checkpointing": levers["checkpointing"], "precision": precision, "finite": finite,
              "strategy": args.strategy, "first_s": probe.times[0],
              "s_per_step": statistics.median(probe.times[args.warmup:]),
              "images_per_s": batch / statistics.median(probe.times[args.warmup:])}
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result |= {"peak_gb": peak / 2**30, "growth_gb": (peak - probe.start_allocated) / 2**30}
    del trainer, module
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def flux_estimate(measured: dict, half: dict, blocks: tuple[int, int]) -> tuple[dict, dict]:
    """(cost of one double- + two single-stream blocks, estimated 19 + 38-block step) from the step with ``blocks``
    and with half of them: linear in the block count (an estimate: it assumes the blocks' cost adds up)."""
    units = blocks[0] // 2  # the half run has units fewer (1 double + 2 single) units
    keys = [key for key in ("s_per_step", "peak_gb", "growth_gb") if key in measured]
    per_unit = {key: (measured[key] - half[key]) / units for key in keys}
    full = {key: measured[key] + (FLUX_DEV_BLOCKS[0] - blocks[0]) * per_unit[key] for key in keys}
    full["images_per_s"] = measured["batch"] / full["s_per_step"]
    return per_unit, measured | full | {"first_s": float("nan"), "finite": "(estimate)"}


def row(label: str, args, r: dict) -> str:
    return (f"| {label} | {args.strategy} | {r['precision']} | {r['batch']} | {r['checkpointing']} | "
            f"{r['s_per_step']:.3f} | {r['first_s']:.1f} | {r['images_per_s']:.2f} | "
            f"{r.get('peak_gb', float('nan')):.2f} | {r.get('growth_gb', float('nan')):.2f} | {r['finite']} |")


GOALS = "issue 12's goals (SD1.5-shaped, one GPU): batch 1 <= 1.5 s/step, batch 4 <= 0.75 s/image, FNF <= 1.3x DRaFT"


def goal_lines(results: dict[tuple[str, int], dict]) -> list[str]:
    """Each of issue 12's goals this run measured, with the measured value and met / not met; ``results`` by
    (variant, batch)."""
    lines = []
    for batch, limit, unit in ((1, 1.5, "s/step"), (4, 0.75, "s/image")):
        if ("all", batch) in results:
            value = results["all", batch]["s_per_step"] / (batch if unit == "s/image" else 1)
            lines.append(f"all levers, batch {batch}: {value:.3f} {unit} (goal <= {limit}: "
                         f"{'met' if value <= limit else f'not met, {value / limit:.2f}x the goal'})")
    for (variant, batch), r in results.items():
        if variant == "draft" and ("all", batch) in results:
            ratio = results["all", batch]["s_per_step"] / r["s_per_step"]
            lines.append(f"FNF / plain DRaFT, batch {batch}: {ratio:.2f}x (goal <= 1.3: "
                         f"{'met' if ratio <= 1.3 else 'not met'})")
    return lines


def model_dir_problem(model: Path, args) -> str | None:
    """Why a reused ``--model-dir`` cannot serve this run (another family, other FLUX blocks), or None."""
    kind, wanted = json.loads((model / "model_index.json").read_text()).get("_class_name"), FAMILIES[args.family]
    if kind != wanted.pipeline:
        return (f"--model-dir {model} holds a {kind}; --family {args.family} needs a {wanted.pipeline} "
                "(use another folder)")
    if args.family == "flux":
        config = json.loads((model / "transformer" / "config.json").read_text())
        built = (config["num_layers"], config["num_single_layers"])
        if built != tuple(args.flux_blocks):
            return (f"--model-dir {model} holds {built[0]} + {built[1]} FLUX blocks; --flux-blocks asks for "
                    f"{args.flux_blocks[0]} + {args.flux_blocks[1]} (use another folder)")
    return None


def flux_blocks_problem(blocks: list[int]) -> str | None:
    double, single = blocks
    if (double, single) == FLUX_DEV_BLOCKS or (2 <= double < FLUX_DEV_BLOCKS[0] and double % 2 == 0
                                              and single == 2 * double):
        return None
    return (f"--flux-blocks DOUBLE SINGLE: an even DOUBLE from 2 to {FLUX_DEV_BLOCKS[0] - 1} and SINGLE = 2 × DOUBLE "
            f"(FLUX.1's ratio, {FLUX_DEV_BLOCKS[0]} + {FLUX_DEV_BLOCKS[1]}: the estimate halves both), or the full "
            f"{FLUX_DEV_BLOCKS[0]} {FLUX_DEV_BLOCKS[1]}; got {double} {single}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny model at 32² (checks the script on a CPU)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--checkpointing", nargs="+", default=["per_step", "off"])
    parser.add_argument("--precision", nargs="+", default=["bf16-mixed"])
    parser.add_argument("--strategy", default="auto", choices=["auto", "fsdp", "fsdp2"])
    parser.add_argument("--variants", nargs="+", default=["before"], choices=list(VARIANTS))
    parser.add_argument("--profile", type=int, default=0, help="print the top N ops of the last step (torch.profiler)")
    parser.add_argument("--family", default="sd15", choices=list(FAMILIES), help="the model's shape (docstring)")
    parser.add_argument("--sdxl", action="store_const", dest="family", const="sdxl", help="alias of --family sdxl")
    parser.add_argument("--flux-blocks", type=int, nargs=2, default=[4, 8], metavar=("DOUBLE", "SINGLE"),
                        help="--family flux: double- and single-stream blocks built (FLUX.1 has 19 and 38)")
    parser.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: the family's)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side (default: the model's native one; --small FLUX: 32, as FLUX's native "
                             "128-latent side would be 4096 tokens with the tiny VAE)")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=None, help="keep the built model here (reused if present)")
    parser.add_argument("--build-device", default=None, help="where SDXL / SD3 / FLUX weights are initialised "
                                                              "(default: --device)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    family = FAMILIES[args.family]
    args.num_steps = args.num_steps or family.num_steps
    if args.small and args.family == "flux" and args.resolution is None:
        args.resolution = 32
    if args.family == "flux" and (problem := flux_blocks_problem(args.flux_blocks)):
        parser.error(problem)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = args.model_dir or Path(tmp) / f"{args.family}-shaped"
        if not (model / "model_index.json").exists():
            build(model, args)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the weights built on the GPU
        elif problem := model_dir_problem(model, args):
            parser.error(problem)
        blocks = (f"; {args.flux_blocks[0]} + {args.flux_blocks[1]} of FLUX.1's {FLUX_DEV_BLOCKS[0]} + "
                  f"{FLUX_DEV_BLOCKS[1]} blocks" if args.family == "flux" else "")
        print(f"# {'tiny ' + args.family if args.small else family.label} model ready in "
              f"{time.perf_counter() - start:.0f} s{blocks}; {provenance(args.device)}, "
              f"{args.num_steps} {family.sampler} steps, {family.guidance} {family.guidance_scale}, K={args.k}, "
              f"LoRA rank {args.rank}, {args.steps} timed steps after {args.warmup} warm-up", flush=True)
        print("\n| variant | strategy | precision | batch | checkpointing | s/step | first step s | images/s | peak GB | "
              "growth GB | LoRA finite |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        notes, results = [], {}
        for variant, precision, batch, checkpointing in itertools.product(args.variants, args.precision, args.batch,
                                                                          args.checkpointing):
            r = measure(model, args, batch, checkpointing, precision, variant)
            if args.family != "flux" or tuple(args.flux_blocks) == FLUX_DEV_BLOCKS:
                print(row(variant, args, r), flush=True)
                results.setdefault((variant, batch), r)
                continue
            double, single = args.flux_blocks
            print(row(f"{variant} [{double} + {single} blocks]", args, r), flush=True)
            half = measure(model, args, batch, checkpointing, precision, variant, blocks=(double // 2, single // 2))
            print(row(f"{variant} [{double // 2} + {single // 2} blocks]", args, half), flush=True)
            per_unit, full = flux_estimate(r, half, (double, single))
            note = (f"# {variant}, batch {batch}, {r['checkpointing']}: one double- + two single-stream blocks cost "
                    f"{per_unit['s_per_step']:.3f} s/step" + (
                        f", {per_unit['peak_gb']:.2f} GB of peak" if "peak_gb" in per_unit else ""))
            if per_unit["s_per_step"] <= 0:  # timing noise larger than the blocks' cost: nothing to extrapolate
                notes.append(note + " (not positive: timing noise; no estimate, run more --steps)")
                continue
            label = f"{variant} [{FLUX_DEV_BLOCKS[0]} + {FLUX_DEV_BLOCKS[1]} blocks, estimate]"
            print(row(label, args, full), flush=True)
            notes.append(note)
        if args.family == "sd15" and (lines := goal_lines(results)):
            scope = " (a tiny model: these lines only check the script)" if args.small else ""
            print(f"\n{GOALS}{scope}:\n" + "\n".join(f"- {line}" for line in lines), flush=True)
        if notes:
            print("\nFLUX per-block cost (the difference between the two block counts, per 1 + 2 blocks); the "
                  f"{FLUX_DEV_BLOCKS[0]} + {FLUX_DEV_BLOCKS[1]}-block rows extrapolate it linearly (estimates, not "
                  "measurements):\n" + "\n".join(notes), flush=True)


if __name__ == "__main__":
    main()
