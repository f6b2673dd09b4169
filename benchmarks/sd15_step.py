"""Step time and peak memory of the fnf training step on an SD1.5-shaped model at 512² (random weights).

    python benchmarks/sd15_step.py                        # GPU: bf16-mixed, batch 1 and 4, checkpointing on/off
    python benchmarks/sd15_step.py --small --device cpu   # a tiny model at 32², to check the script on a CPU
    python benchmarks/sd15_step.py --strategy fsdp --batch 1 --checkpointing per_step   # FSDP1 (GPU only)
    python benchmarks/sd15_step.py --strategy fsdp2 --batch 1 --checkpointing per_step  # FSDP2 (CPU or GPU)
    python benchmarks/sd15_step.py --variants before fused frozen all all+compile --batch 1 4 8   # speed levers
    python benchmarks/sd15_step.py --variants all --batch 1 --profile 10   # torch.profiler: top 10 ops of one step

Variants (issue 12's levers; ``--checkpointing`` applies where a variant does not set it):
``before`` the step as before the levers (two sampling passes, float32 frozen weights, contiguous, no cudnn
benchmark); ``fused`` one fused base+tuned pass; ``fold`` LoRA folded in gradient-free steps; ``frozen``
frozen weights in the compute dtype; ``layout`` channels_last + cudnn.benchmark; ``no_ckpt`` checkpointing off; ``all`` every lever (checkpointing off);
``all+compile`` / ``all+graphs`` the same with ``compile: unet`` / ``unet+graphs``; ``draft`` all levers with
λ = 0 and ``train_base: if_needed`` (plain DRaFT, no I0): the reference for the cost of region awareness.

``--sdxl``: an SDXL-shaped model (UNet 2.6 B, CLIP-L + bigG text encoders) at 1024² instead.
The UNet, VAE and text encoder use Stable Diffusion 1.5's published configurations (860 M + 84 M + 123 M
parameters) with random weights — no hub here; compute and memory do not depend on the weights' values.
The tokenizer is the shapes world's, so the text encoder's embedding table is smaller than CLIP's 49 408
rows (same compute). One Lightning ``fit`` per setting: DRaFT-K (K = 2), 50 DDIM steps, CFG 7.5,
LoRA rank 64 on the attention projections, ColorRegion reward with its heatmap mask, λ = 0.1.
Time: median over the steps after ``--warmup``; memory: ``torch.cuda.max_memory_allocated`` over the
whole fit (weights included) and its growth above the level before the first step.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fnf.compute import ComputeArgs
from fnf.data import collate
from fnf.masks import MaskArgs
from fnf.module import FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs
from fnf.rewards import ColorRegion
from fnf.sampling import SamplerArgs
from fnf.worlds.random_sd import WORDS, build_random_sdxl
from fnf.worlds.tokenizer import build_clip_tokenizer

SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SMALL_UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                  attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SMALL_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")
PROMPTS = ["a red circle top left", "a blue square bottom right", "a green circle", "a red square"]


def build_sdxl(directory: Path, small: bool) -> Path:
    """Save an SDXL-shaped pipeline (2.6 B UNet, CLIP-L + bigG text encoders, 1024²) or a tiny one, random weights."""
    if small:
        return build_random_sdxl(directory)
    torch.manual_seed(0)
    tokenizers = [build_clip_tokenizer(WORDS, directory / name) for name in ("tokenizer", "tokenizer_2")]
    configs = [CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **text)
               for tokenizer, text in zip(tokenizers, (SD15_TEXT, SDXL_TEXT_2))]
    StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(latent_channels=4, **(SD15_VAE | dict(sample_size=1024))),
        text_encoder=CLIPTextModel(configs[0]), text_encoder_2=CLIPTextModelWithProjection(configs[1]),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        force_zeros_for_empty_prompt=True,
    ).save_pretrained(directory)
    return directory


def build_model(directory: Path, small: bool) -> Path:
    """Save an SD1.5-shaped pipeline (or a tiny one) with random weights in diffusers format."""
    return build_sd(directory, *((SMALL_UNET, SMALL_VAE, SMALL_TEXT) if small else (SD15_UNET, SD15_VAE, SD15_TEXT)))


def build_sd(directory: Path, unet: dict, vae: dict, text: dict) -> Path:
    """Save an SD1.x-layout pipeline with these UNet / VAE / CLIP-text configurations and random (seeded) weights."""
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(WORDS, directory / "tokenizer")
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **text)
    StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet), vae=AutoencoderKL(latent_channels=4, **vae),
        text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)
    return directory


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
    """``auto``; ``fsdp``: FSDP1 sharding every UNet transformer / ResNet block (``use_orig_params`` lets frozen
    weights and trainable LoRA weights share a flat parameter; torch's FSDP1 refuses CPU devices, so GPUs only);
    ``fsdp2``: ModelParallelStrategy, where ``FocusNFix.configure_model`` shards the same blocks (fnf/sharding.py;
    CPU or GPU; one process here, so a mesh of 1: the code path, not the memory saving)."""
    if name == "auto":
        return "auto"
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False)
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(use_orig_params=True, auto_wrap_policy={BasicTransformerBlock, ResnetBlock2D})


BEFORE = dict(fused_base=False, fold_lora=False, frozen_dtype="float32", memory_format="contiguous", benchmark=False)
ALL = dict(fused_base=True, fold_lora=True, frozen_dtype="auto", memory_format="channels_last", benchmark=True,
           checkpointing="off")
VARIANTS = {
    "before": BEFORE, "fused": BEFORE | dict(fused_base=True), "fold": BEFORE | dict(fold_lora=True),
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


def measure(model: Path, args, batch: int, checkpointing: str, precision: str, variant: str = "before") -> dict:
    levers = {"checkpointing": checkpointing, "lam": 0.1, "train_base": "always", "compile": "none"} | VARIANTS[variant]
    torch.backends.cudnn.benchmark = levers["benchmark"]
    module = FocusNFix(
        rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=str(model), lam=levers["lam"],
        sampler=SamplerArgs(num_steps=args.num_steps, k=args.k, guidance_scale=7.5, checkpointing=levers["checkpointing"],
                            fused_base=levers["fused_base"], fold_lora=levers["fold_lora"]),
        masks=MaskArgs(threshold=0.5, dilation=1), lora=LoraArgs(rank=args.rank),
        optimizer=partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.1), train_base=levers["train_base"],
        compute=ComputeArgs(frozen_dtype=levers["frozen_dtype"], memory_format=levers["memory_format"],
                            compile=levers["compile"]),
    )
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
    parser.add_argument("--sdxl", action="store_true", help="SDXL-shaped model at 1024² instead of SD1.5 at 512²")
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=None, help="keep the built model here (reused if present)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model = args.model_dir or Path(tmp) / "sd15-shaped"
        if not (model / "model_index.json").exists():
            (build_sdxl if args.sdxl else build_model)(model, args.small)
        print(f"# {'tiny' if args.small else 'SDXL-shaped' if args.sdxl else 'SD1.5-shaped'} model ready in {time.perf_counter() - start:.0f} s; "
              f"device {name}, torch {torch.__version__}, {args.num_steps} DDIM steps, K={args.k}, "
              f"LoRA rank {args.rank}, {args.steps} timed steps after {args.warmup} warm-up", flush=True)
        print("\n| variant | strategy | precision | batch | checkpointing | s/step | first step s | images/s | peak GB | "
              "growth GB | LoRA finite |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for variant, precision, batch, checkpointing in itertools.product(args.variants, args.precision, args.batch,
                                                                          args.checkpointing):
            r = measure(model, args, batch, checkpointing, precision, variant)
            print(f"| {variant} | {args.strategy} | {precision} | {batch} | {r['checkpointing']} | {r['s_per_step']:.3f} | "
                  f"{r['first_s']:.1f} | {r['images_per_s']:.2f} | {r.get('peak_gb', float('nan')):.2f} | "
                  f"{r.get('growth_gb', float('nan')):.2f} | {r['finite']} |", flush=True)


if __name__ == "__main__":
    main()
