"""Measure a shapes-world text-to-image model with the analytic judge (the numbers in its model card).

* alignment: fraction of held-out prompts (never trained on) whose sample contains exactly the asked
  objects (colour, shape, position) and nothing else;
* defect rate on artifact prompts and unsafe rate on tempting prompts: the base model's flaws that
  Focus-N-Fix should remove (wanted in [15%, 50%] for the embedded model);
* the time of one sample (batch 8) with the given sampler settings, as the fine-tuning job pays it;
* VAE reconstruction quality: judge verdicts on encode/decode round trips of generator images.

Samples use ``fnf.sampling.DDIMSampler`` (DDIM, eta 0, CFG against the empty prompt) and x_T from
``initial_noise`` with each prompt's fixed seed, exactly as the fine-tuning job samples. A
``StableDiffusion3Pipeline`` folder (shapes-flow) is sampled by diffusers' own pipeline instead (flow-matching
Euler, CFG against the empty prompt), from the same x_T passed as ``latents=``.

``python -m fnf.worlds.shapes.evaluate_t2i --model fnf/worlds/shapes/weights/shapes-t2i --grid grid.png``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fnf.model_files import resolve_model_path
from fnf.pipeline import Text2ImageModel
from fnf.sampling import DDIMSampler, SamplerArgs, initial_noise
from fnf.worlds.shapes.generator import artifact_prompts, heldout_prompts, make_batch, parse_prompt, tempting_prompts
from fnf.worlds.shapes.judge import judge
from fnf.worlds.shapes.train_t2i import haar_decode

DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 4.0


@torch.no_grad()
def sample(model: Text2ImageModel, sampler: DDIMSampler, pairs: list[tuple[str, int]], batch: int = 50,
           decoder: str = "vae") -> Tensor:
    """(N, 3, H, W) images in [0, 1] for (prompt, seed) pairs; ``decoder="haar"`` bypasses the VAE."""
    images = []
    shape = model.latent_shape(sampler.resolution)
    for i in range(0, len(pairs), batch):
        prompts, seeds = zip(*pairs[i:i + batch])
        text = model.encode_prompts(list(prompts))
        uncond = model.unconditional().expand(len(prompts))
        out = sampler(initial_noise(torch.tensor(seeds), shape, torch.device("cpu")), text, uncond, "none")
        images.append(haar_decode(out.latents / model.vae.config.scaling_factor) if decoder == "haar" else out.images)
    return torch.cat(images)


def is_flow_pipeline(folder: str) -> bool:
    """True for a StableDiffusion3Pipeline folder (sampled by diffusers' pipeline, not fnf's DDIM sampler)."""
    index = Path(resolve_model_path(folder)) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "StableDiffusion3Pipeline"


def load_flow(folder: str):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(resolve_model_path(folder), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_flow(pipe, pairs: list[tuple[str, int]], num_steps: int = DEFAULT_STEPS,
                guidance_scale: float = DEFAULT_GUIDANCE, batch: int = 50, decoder: str = "vae") -> Tensor:
    """``sample`` for a StableDiffusion3Pipeline: the same per-(prompt, seed) x_T, passed as ``latents=``, and
    as many T5 tokens as the tokenizer's ``model_max_length`` (what fnf uses too)."""
    config = pipe.transformer.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    images = []
    for i in range(0, len(pairs), batch):
        prompts, seeds = zip(*pairs[i:i + batch])
        out = pipe(list(prompts), latents=initial_noise(torch.tensor(seeds), shape, torch.device("cpu")),
                   num_inference_steps=num_steps, guidance_scale=guidance_scale,
                   max_sequence_length=pipe.tokenizer_3.model_max_length,
                   output_type="latent" if decoder == "haar" else "pt").images
        images.append(haar_decode(out / pipe.vae.config.scaling_factor) if decoder == "haar" else out)
    return torch.cat(images)


def alignment_stats(images: Tensor, prompts: list[str]) -> dict:
    """Exact-match accuracy plus diagnostics: object recall and accuracy by number of objects."""
    verdicts = judge(images, prompts)
    recall, by_count = [], {}
    for v, p in zip(verdicts, prompts):
        wanted = parse_prompt(p)
        recall.append(sum((Counter(v.found) & Counter(wanted)).values()) / len(wanted))
        by_count.setdefault(len(wanted), []).append(v.aligned)
    return {
        "alignment": float(np.mean([v.aligned for v in verdicts])),
        "object_recall": float(np.mean(recall)),
        "alignment_by_objects": {k: round(float(np.mean(a)), 3) for k, a in sorted(by_count.items())},
    }


def flaw_rate(images: Tensor, prompts: list[str], flaw: str) -> float:
    return float(np.mean([getattr(v, flaw) for v in judge(images, prompts)]))


@torch.no_grad()
def reconstruction_quality(vae, decode: Callable[[Tensor], Tensor], n: int = 400, seed: int = 0) -> dict:
    """How often the judge's verdict on VAE(x) equals its verdict on x (generator images); ``decode`` maps
    scaled latents to images in [0, 1]."""
    batch = make_batch(n, seed, defect_rate=0.3, unsafe_rate=0.35, split=None)
    x = batch["images"]
    shift = vae.config.get("shift_factor") or 0.0
    latents = (vae.encode(x * 2 - 1).latent_dist.mode() - shift) * vae.config.scaling_factor
    recon = decode(latents)
    truth, got = judge(x, batch["prompts"]), judge(recon, batch["prompts"])
    return {
        "recon_l1": float((recon - x).abs().mean()),
        "recon_aligned": float(np.mean([g.aligned for g in got])),
        "recon_defect_agreement": float(np.mean([t.defect == g.defect for t, g in zip(truth, got)])),
        "recon_unsafe_agreement": float(np.mean([t.unsafe == g.unsafe for t, g in zip(truth, got)])),
    }


@torch.no_grad()
def time_sampling(draw: Callable[..., Tensor], batch: int = 8, repeats: int = 3) -> float:
    """Median seconds for one batch of ``batch`` images (all steps, CFG, decode); ``draw(pairs, batch=)``."""
    pairs = heldout_prompts(batch, seed=123)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        draw(pairs, batch=batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save_grid(rows: list[Tensor], path: Path, scale: int = 4, pad: int = 2) -> None:
    """Rows of (N, 3, H, W) images -> one PNG, upscaled ``scale``x (nearest) with white gutters."""
    n, (_, h, w) = max(len(r) for r in rows), rows[0].shape[1:]
    H, W = h * scale + pad, w * scale + pad
    canvas = np.ones((len(rows) * H + pad, n * W + pad, 3), dtype=np.uint8) * 255
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            tile = tile.repeat(scale, 0).repeat(scale, 1)
            canvas[pad + i * H: pad + i * H + h * scale, pad + j * W: pad + j * W + w * scale] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def ddim_sampling(folder: str, num_steps: int, guidance_scale: float, decoder: str) -> tuple:
    """(draw(pairs, batch=), vae, decode(latents), result fields) for fnf's own model and DDIM sampler."""
    model = Text2ImageModel.from_pretrained(folder)
    sampler = DDIMSampler(model, SamplerArgs(num_steps=num_steps, guidance_scale=guidance_scale, grad_mode="none",
                                             checkpointing="off"))

    def draw(pairs, batch=50):
        return sample(model, sampler, pairs, batch=batch, decoder=decoder)

    return draw, model.vae, model.decode, {"resolution": sampler.resolution}


def flow_sampling(folder: str, num_steps: int, guidance_scale: float, decoder: str) -> tuple:
    """The same for a StableDiffusion3Pipeline folder, sampled by the diffusers pipeline."""
    pipe = load_flow(folder)

    def draw(pairs, batch=50):
        return sample_flow(pipe, pairs, num_steps, guidance_scale, batch, decoder)

    def decode(latents):
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)

    return draw, pipe.vae, decode, {
        "resolution": pipe.default_sample_size * pipe.vae_scale_factor, "pipeline": "StableDiffusion3Pipeline",
        "scheduler_shift": pipe.scheduler.config.shift, "max_sequence_length": pipe.tokenizer_3.model_max_length}


def evaluate(folder: str, n: int = 200, seed: int = 0, num_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, decoder: str = "vae", grid: Path | None = None,
             grid_columns: int = 10, with_recon: bool = True, with_timing: bool = True) -> dict:
    torch.set_num_threads(2)
    draw, vae, decode, about = (flow_sampling if is_flow_pipeline(folder) else ddim_sampling)(
        folder, num_steps, guidance_scale, decoder)
    sets = {"heldout": heldout_prompts(n, seed), "artifact": artifact_prompts(n, seed),
            "tempting": tempting_prompts(n, seed)}
    images = {name: draw(pairs) for name, pairs in sets.items()}
    prompts = {name: [p for p, _ in pairs] for name, pairs in sets.items()}
    result = {
        "model": str(folder), "n": n, "seed": seed, "num_steps": num_steps, "guidance_scale": guidance_scale,
        **about, "decoder": decoder,
        **alignment_stats(images["heldout"], prompts["heldout"]),
        "defect_rate": flaw_rate(images["artifact"], prompts["artifact"], "defect"),
        "unsafe_rate": flaw_rate(images["tempting"], prompts["tempting"], "unsafe"),
        # Context for the two flaw rates: how often the judge sees them on other prompt sets.
        "defect_rate_heldout": flaw_rate(images["heldout"], prompts["heldout"], "defect"),
        "unsafe_rate_artifact": flaw_rate(images["artifact"], prompts["artifact"], "unsafe"),
        "alignment_artifact": alignment_stats(images["artifact"], prompts["artifact"])["alignment"],
    }
    if with_timing:
        result["seconds_per_sample_batch8"] = round(time_sampling(draw), 3)
    if with_recon:
        result.update(reconstruction_quality(vae, decode, seed=seed))
    if grid is not None:
        rows = [images[name][:grid_columns] for name in sets]
        save_grid(rows, grid)
        lines = [f"row {i + 1} ({name}): " + " | ".join(prompts[name][:grid_columns]) for i, name in enumerate(sets)]
        grid.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        result["grid"] = str(grid)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help="StableDiffusionPipeline or StableDiffusion3Pipeline folder (or embedded:<name>)")
    parser.add_argument("--n", type=int, default=200, help="prompts per set")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (Euler steps for a flow model)")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale")
    parser.add_argument("--decoder", choices=("vae", "haar"), default="vae", help="haar: bypass the VAE")
    parser.add_argument("--grid", type=Path, default=None, help="PNG of samples (rows: heldout, artifact, tempting)")
    parser.add_argument("--no-recon", action="store_true", help="skip the VAE reconstruction check")
    parser.add_argument("--no-timing", action="store_true", help="skip the batch-8 timing")
    ns = parser.parse_args(argv)
    result = evaluate(ns.model, ns.n, ns.seed, ns.steps, ns.guidance, ns.decoder, ns.grid,
                      with_recon=not ns.no_recon, with_timing=not ns.no_timing)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
