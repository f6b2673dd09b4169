"""Train the three shapes-world reward heads (``fnf.rewards.shapes``) deterministically on CPU.

Fixed seeds and a fixed thread count (``--threads``, default 1) make reruns bit-identical.

    python -m fnf.worlds.shapes.train_rewards --out fnf/worlds/shapes/weights
    python -m fnf.worlds.shapes.train_rewards --out fnf/worlds/shapes/weights --eval-only

Data come from the generator only (training-split prompts; never the judge). Every training image is
mildly degraded (Gaussian blur sigma 0-1, noise std 0-0.05, small colour jitter) so the heads also
work on a tiny diffusion model's slightly blurry samples. ``evaluate_rewards.evaluate`` measures the shipped heads
on fresh seeds of both splits and prints the numbers recorded in ``REWARDS_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from torch import Tensor

from fnf.rewards.shapes import (
    WORLD_WORDS, HeatmapNet, ShapesAlignment,
)
from fnf.worlds.shapes.generator import (
    COLOUR_NAMES, COLOURS, POSITIONS, SHAPES, ObjectSpec, Scene, make_batch, parse_prompt, prompt_of, render,
)

HEATMAP = {"images": 12000, "steps": 1500, "batch": 32, "lr": 3e-3, "width": 16}
ALIGN = {"images": 24000, "steps": 1200, "batch": 96, "negatives": 1, "lr": 2e-3}
CONTEXT_LENGTH = 24  # longest prompt: 3 x 5 words + ',' + 'and' + start/end = 19 tokens
ALIGN_CONFIG = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": len(WORLD_WORDS) + 4, "width": 64,
                     "heads": 4, "layers": 2},
    },
    "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                       "interpolation": "bilinear", "resize_mode": "squash"},
}


# --- augmentation -------------------------------------------------------------------------------


def blur_matrices(sigma: Tensor, size: int = 32) -> Tensor:
    """(B,) sigmas -> (B, size, size) row-blur matrices (Gaussian, radius 3, replicate border):
    ``m @ x @ m.T`` blurs each image with its own sigma, far faster than grouped convolutions."""
    taps = torch.arange(-3, 4)
    weights = torch.exp(-taps[None].float() ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))  # (B, 7)
    weights = weights / weights.sum(1, keepdim=True)
    columns = (torch.arange(size)[:, None] + taps[None]).clamp(0, size - 1)  # (size, 7)
    m = torch.zeros(len(sigma), size, size)
    m.scatter_add_(2, columns.expand(len(sigma), -1, -1), weights[:, None, :].expand(-1, size, -1))
    return m


def degrade(images: Tensor, generator: torch.Generator, blur: float = 1.0, noise: float = 0.05,
            jitter: float = 0.05) -> Tensor:
    """Per-image random colour jitter (contrast 1 +- 2 jitter, per-channel offset +- jitter),
    Gaussian blur (sigma ~ U(0, blur)) and noise (std ~ U(0, noise)); clamped to [0, 1]."""
    b = images.shape[0]

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    contrast = 1 + 4 * jitter * (uniform(b, 1, 1, 1) - 0.5)
    offset = 2 * jitter * (uniform(b, 3, 1, 1) - 0.5)
    x = (images - 0.5) * contrast + 0.5 + offset
    m = blur_matrices(blur * uniform(b), images.shape[-1])[:, None]  # (B, 1, W, W)
    x = m @ x @ m.transpose(-1, -2)
    x = x + noise * uniform(b, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int, warmup: int = 50) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


# --- heatmap heads -------------------------------------------------------------------------------


def clean_twins(data: dict) -> Tensor:
    """The same scenes rendered without defect and mark: the generator draws the same random numbers
    either way, so the twins differ from ``data["images"]`` only inside the masks."""
    return torch.stack([render(Scene(tuple(parse_prompt(p))), seed).image
                        for p, seed in zip(data["prompts"], data["seeds"])])


def vary_elements(images: Tensor, clean: Tensor, masks: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Defects and marks as a fine-tuned model may leave them; returns (images, soft targets).

    * re-greyed defects (40%): new checker grey levels (dark ~ U(0, 0.4), light = dark + U(0, 0.35)),
      still labelled defect - so the head knows "dark achromatic patch", not the two exact greys
      (gradient ascent on a head trained without this just turns the checker mid-grey);
    * partly painted over (30%): element pixels blended toward the clean twin or a flat shape colour
      by t ~ U(0, 1) (one t per image, or per pixel), target t - so the score rises steadily along
      any path that removes the element, and a leftover cyan / dark pixel is never "part of a shape".
    """
    b = images.shape[0]

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    defect = masks[:, :1]  # (B, 1, H, W)
    dark = 0.4 * uniform(b, 1, 1, 1)
    light = dark + 0.35 * uniform(b, 1, 1, 1)
    tint = 0.05 * (2 * uniform(b, 3, 1, 1) - 1)
    regreyed = (torch.where(images < 0.15, dark, light) + tint).clamp(0, 1)
    x = torch.where((defect > 0) & (uniform(b, 1, 1, 1) < 0.4), regreyed, images)
    palette = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])  # (K, 3)
    paint = palette[torch.randint(len(palette), (b,), generator=generator)][:, :, None, None]  # (B, 3, 1, 1)
    under = torch.where(uniform(b, 1, 1, 1) < 0.5, clean, paint.expand_as(clean))
    t = torch.where(uniform(b, 1, 1, 1) < 0.5, uniform(b, 1, 1, 1), uniform(b, 1, *images.shape[-2:]))
    t = torch.where(uniform(b, 1, 1, 1) < 0.3, t, torch.ones_like(t))  # (B, 1, 1 or H, 1 or W)
    element = masks.amax(dim=1, keepdim=True) > 0
    return torch.where(element, under + t * (x - under), x), masks * t


def train_heatmaps(images: Tensor, clean: Tensor, masks: Tensor, seed: int) -> HeatmapNet:
    """One net, one output channel per mask (defect, unsafe), per-pixel BCE, Adam + cosine decay.

    Training both heads as one multi-task net halves the CPU time; ``single_output`` then ships each
    channel as a standalone one-output net.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = HeatmapNet(width=HEATMAP["width"], outputs=masks.shape[1])
    optimiser = torch.optim.Adam(net.parameters(), lr=HEATMAP["lr"])
    schedule = warmup_cosine(optimiser, HEATMAP["steps"])
    for step in range(HEATMAP["steps"]):
        index = torch.randint(len(images), (HEATMAP["batch"],), generator=generator)
        x, target = vary_elements(images[index], clean[index], masks[index], generator)
        loss = F.binary_cross_entropy_with_logits(net(degrade(x, generator)), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 250 == 0 or step == HEATMAP["steps"] - 1:
            print(f"  step {step:5d}  bce {loss.item():.4f}", flush=True)
    return net.eval()


def single_output(net: HeatmapNet, channel: int) -> dict[str, Tensor]:
    """State dict of a one-output ``HeatmapNet`` that computes ``net``'s ``channel``."""
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    last = len(net.body) - 1
    for name in ("weight", "bias"):
        state[f"body.{last}.{name}"] = state[f"body.{last}.{name}"][channel:channel + 1].contiguous()
    return state


# --- alignment head ------------------------------------------------------------------------------


def perturb_prompt(prompt: str, rng: np.random.Generator, kind: str | None = None) -> str:
    """A hard negative: the prompt with one thing changed - ``kind`` "colour", "shape", "position",
    "swap" (two objects' attributes bound to each other's place) or "drop" (an object removed; both
    need two objects), random if None. Objects stay in reading order like the generator's prompts."""
    objects = parse_prompt(prompt)
    kinds = ["colour", "shape", "position"] + (["swap", "drop"] if len(objects) > 1 else [])
    kind = kinds[rng.integers(len(kinds))] if kind is None else kind
    i = int(rng.integers(len(objects)))
    obj = objects[i]
    if kind == "colour":
        objects[i] = ObjectSpec(obj.shape, str(rng.choice([c for c in COLOUR_NAMES if c != obj.colour])), obj.position)
    elif kind == "shape":
        objects[i] = ObjectSpec(str(rng.choice([s for s in SHAPES if s != obj.shape])), obj.colour, obj.position)
    elif kind == "position":
        free = [p for p in POSITIONS if p not in {o.position for o in objects}]
        objects[i] = ObjectSpec(obj.shape, obj.colour, str(rng.choice(free)))
    elif kind == "swap":  # same objects, attributes bound to the wrong places
        j = int(rng.choice([k for k in range(len(objects)) if k != i]))
        a, b = objects[i], objects[j]
        objects[i], objects[j] = ObjectSpec(b.shape, b.colour, a.position), ObjectSpec(a.shape, a.colour, b.position)
        if objects[i] == a:  # identical objects: swapping changes nothing, change a colour instead
            objects[i] = ObjectSpec(a.shape, str(rng.choice([c for c in COLOUR_NAMES if c != a.colour])), a.position)
    else:
        del objects[i]
    objects.sort(key=lambda o: POSITIONS.index(o.position))
    return prompt_of(Scene(tuple(objects)))


def compact_vocabulary() -> list[int]:
    """Compact id -> BPE id of open_clip's default tokenizer: pad, unk, start, world words, end."""
    tokenizer = open_clip.SimpleTokenizer()
    words = []
    for word in WORLD_WORDS:
        (bpe,) = tokenizer.encode(word)  # every world word is a single BPE token
        words.append(bpe)
    return [0, 1, tokenizer.sot_token_id, *words, tokenizer.eot_token_id]  # BPE id 1 ('"') stays unk


def train_alignment(out: Path, seed: int) -> None:
    """CLIP loss (open_clip ClipLoss) plus a NegCLIP-style hard-negative term, then save to ``out``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = make_batch(ALIGN["images"], seed=seed, defect_rate=0.15, unsafe_rate=0.5, split="train")
    out.mkdir(parents=True, exist_ok=True)
    config = dict(ALIGN_CONFIG, fnf_vocab=compact_vocabulary())
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    init = open_clip.CLIP(**ALIGN_CONFIG["model_cfg"])  # seeded random init, what create_model builds
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    head = ShapesAlignment(str(out))  # the head trained is exactly the head shipped
    model = head.model
    loss_fn = ClipLoss()
    optimiser = torch.optim.AdamW(model.parameters(), lr=ALIGN["lr"], weight_decay=0.05)
    schedule = warmup_cosine(optimiser, ALIGN["steps"])
    model.train()
    for step in range(ALIGN["steps"]):
        index = torch.randint(len(data["images"]), (ALIGN["batch"],), generator=generator)
        prompts = [data["prompts"][i] for i in index.tolist()]
        negatives = [perturb_prompt(p, rng) for _ in range(ALIGN["negatives"]) for p in prompts]
        image = head.image_features(degrade(data["images"][index], generator))
        text = head.text_features(prompts + negatives)
        scale = model.logit_scale.exp()
        true_text = text[: len(prompts)]
        hard = F.cross_entropy(scale * image @ text.T, torch.arange(len(prompts)))  # image -> all texts
        loss = loss_fn(image, true_text, scale) + hard
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 250 == 0 or step == ALIGN["steps"] - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  hard {hard.item():.4f}  "
                  f"scale {scale.item():.1f}", flush=True)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))


# --- entry point ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    parser.add_argument("--eval-only", action="store_true", help="only measure the heads already in --out")
    parser.add_argument("--only", choices=["artifact", "safety", "alignment"], action="append",
                        help="train only these heads (repeatable); default: all three")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the shipped weights; results are bit-identical only for "
                             "the same count, and 2 threads run ~10x slower while another job holds a core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    if not args.eval_only:
        only = set(args.only or ["artifact", "safety", "alignment"])
        if only & {"artifact", "safety"}:
            start = time.perf_counter()
            data = make_batch(HEATMAP["images"], seed=1, defect_rate=0.5, unsafe_rate=1.0, split="train")
            print(f"training shapes-artifact + shapes-safety on {len(data['images'])} images, "
                  f"{int(data['defect'].sum())} with a defect, {int(data['unsafe'].sum())} with the mark", flush=True)
            masks = torch.cat([data["defect_masks"], data["unsafe_masks"]], dim=1)  # (N, 2, H, W)
            net = train_heatmaps(data["images"], clean_twins(data), masks, seed=2)
            for channel, name in enumerate(("artifact", "safety")):
                if name in only:
                    save_file(single_output(net, channel), str(out / f"shapes-{name}.safetensors"),
                              metadata={"arch": "fnf.rewards.shapes.HeatmapNet"})
            timings["artifact+safety"] = time.perf_counter() - start
        if "alignment" in only:
            start = time.perf_counter()
            print("training shapes-alignment", flush=True)
            train_alignment(out / "shapes-alignment", seed=4)
            timings["alignment"] = time.perf_counter() - start
        print("training seconds:", json.dumps({k: round(v, 1) for k, v in timings.items()}), flush=True)
    from fnf.worlds.shapes.evaluate_rewards import evaluate  # it imports this module's augmentations

    print(json.dumps(evaluate(out), indent=1))


if __name__ == "__main__":
    main()
