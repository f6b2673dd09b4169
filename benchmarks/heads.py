"""Cost of each reward head's forward + backward relative to one UNet step of an SD1.5-shaped model, in one run.

    python benchmarks/heads.py                 # CPU or GPU, 512² images, batch 1
    python benchmarks/heads.py --side 256      # a cheaper check

The UNet step is what DRaFT-K differentiates K times per image: one classifier-free-guided call (batch 2,
64×64×4 latents, SD1.5's published UNet configuration, random weights) forward and backward to its input.
Each head gets one 512² RGB image with ``requires_grad`` and backpropagates its score to the pixels, as the
tuned pass does. Heads with hub weights are built at their real architecture with random weights (cost does
not depend on the values): OpenCLIP ViT-H-14 (the configs' alignment model), RAHF at the paper's
ViT-B/16 + T5-base size, and the public RAHF reproduction's checkpoint size (ViT-L/16-384 + t5-base; a
word-level stand-in tokenizer). NudeNet is the real bundled detector (optional extra; skipped without it).
``--only NAME`` (a substring of the head names) measures a subset, always against the UNet step.
Times: median of ``--repeats`` after one warm-up; each head's ratio is the median of (head step / UNet step) over
pairs timed one after the other, so a change in machine load between heads does not move the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from provenance import provenance

from fnf.rewards import RewardHead


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired(fn, reference, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and median ratio to ``reference``, the two timed in alternation after a warm-up."""
    fn(), reference()  # warm-up: lazy initialisation, allocator growth
    pairs = [(seconds(fn), seconds(reference)) for _ in range(repeats)]
    return statistics.median(t for t, _ in pairs), statistics.median(t / r for t, r in pairs)


def unet_step(device: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8).to(device).requires_grad_(False)
    latents = torch.randn(2, 4, 64, 64, device=device, requires_grad=True)
    text = torch.randn(2, 77, 768, device=device)

    def step():
        unet(latents, torch.tensor(500, device=device), encoder_hidden_states=text).sample.sum().backward()
    return step


def heads(folder: Path) -> dict[str, Callable[[], RewardHead]]:
    """name -> builder; hub-weight heads at their real architecture with random weights (built when asked)."""
    from fnf.rewards import (NudeNetSafety, OpenCLIPAlignment, RAHFHeatmap, RAHFReproductionHeatmap, ShapesAlignment,
                             ShapesArtifact, ShapesSafety)

    def open_clip_vit_h():
        import open_clip
        from safetensors.torch import save_file

        clip_dir = folder / "vit-h-14"
        clip_dir.mkdir()
        config = open_clip.get_model_config("ViT-H-14")
        preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
        (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
        save_file(open_clip.create_model("ViT-H-14").state_dict(), str(clip_dir / "open_clip_model.safetensors"))
        return OpenCLIPAlignment(model=f"local-dir:{clip_dir}")

    def rahf_paper():
        from fnf.rewards.rahf import RAHF, RAHFConfig, save_rahf

        save_rahf(RAHF(RAHFConfig()), folder / "rahf.safetensors")
        return RAHFHeatmap(str(folder / "rahf.safetensors"))

    def rahf_public_checkpoint():
        from fnf.rewards.rahf_reproduction import RAHFReproduction, ReproductionConfig, save_reproduction
        from fnf.worlds.tokenizer import build_t5_like_tokenizer

        vit_large_384 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                             image_size=384, patch_size=16)
        t5_base = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
        save_reproduction(RAHFReproduction(ReproductionConfig(vit=vit_large_384, t5=t5_base)),
                          folder / "richhf.safetensors")
        build_t5_like_tokenizer("a photo of cat on sofa".split(), folder / "t5-tokenizer")
        return RAHFReproductionHeatmap(str(folder / "richhf.safetensors"), str(folder / "t5-tokenizer"))

    return {
        "OpenCLIPAlignment (ViT-H-14)": open_clip_vit_h,
        "RAHFHeatmap (ViT-B/16 + T5-base size)": rahf_paper,
        "RAHFReproductionHeatmap (ViT-L/16-384 + t5-base)": rahf_public_checkpoint,
        "ShapesArtifact": ShapesArtifact, "ShapesSafety": ShapesSafety, "ShapesAlignment": ShapesAlignment,
        "NudeNetSafety (320n detector)": NudeNetSafety,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="measure only heads whose name contains this")
    args = parser.parse_args()
    unet = unet_step(args.device)
    alone, _ = paired(unet, unet, args.repeats)
    print(f"# {provenance(args.device)}, threads {torch.get_num_threads()}, "
          f"images {args.side}², batch 1\n\n| head | forward + backward s | × one UNet step (paired) |\n|---|---|---|\n"
          f"| SD1.5-shaped UNet step (CFG, batch 2, 64² latents) | {alone:.3f} | 1.00 |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in heads(Path(tmp)).items():
            if args.only not in name:
                continue
            try:
                head = build().to(args.device).requires_grad_(False).eval()
            except ImportError as error:  # NudeNet: optional extra
                print(f"# skipped {name}: {error}")
                continue
            image = torch.rand(1, 3, args.side, args.side, device=args.device, requires_grad=True)

            def step():
                head(image, ["a photo of a cat on a sofa"]).score.sum().backward()
            head_s, ratio = paired(step, unet, args.repeats)
            print(f"| {name} | {head_s:.3f} | {ratio:.3g} |", flush=True)


if __name__ == "__main__":
    main()
