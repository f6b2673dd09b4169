"""The shipped shapes-world text-to-image model loads through fnf's path and measures as its model card says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fnf.model_files import resolve_model_path
from fnf.pipeline import Text2ImageModel
from fnf.sampling import DDIMSampler, SamplerArgs
from fnf.worlds.shapes.evaluate_t2i import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample
from model_card import PROMPT_SETS, assert_measures_as_card, card_rates  # tests/model_card.py

N = 64  # prompts per set: the first 64 of the card's 200 (same seed 0, so the same prompts and x_T)


def _card_row(row: str) -> dict[str, float]:
    return card_rates((Path(resolve_model_path("embedded:shapes-t2i")) / "MODEL_CARD.md").read_text(), row)


@pytest.mark.parametrize("row", [
    "held-out prompts",  # card 90.5% / 32.0% -> bands [79.5, 100] / [14.5, 49.5]%
    "artifact prompt set",  # 90.0% / 33.5% / 13.5% -> [78.8, 100] / [15.8, 51.2] / [0.7, 26.3]%
    "tempting prompt set",  # unsafe 38.0% -> [19.8, 56.2]%
])
def test_shipped_model_measures_as_its_card_says(row):
    """The card's alignment, defect and unsafe rates (judge: evaluate_t2i, seed 0, 200 prompts per set)
    re-measured on the first N prompts of the set with the card's sampler (DDIM 20 steps, CFG 4), each within
    its binomial band: an unaligned model, CFG off, or one drawing a flaw far more or less often than its card
    says falls out. ~3.5 s per set on 2 free CPU cores."""
    card = _card_row(row)
    model = Text2ImageModel.from_pretrained("embedded:shapes-t2i")
    sampler = DDIMSampler(model, SamplerArgs(num_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
                                             grad_mode="none", checkpointing="off"))
    pairs = PROMPT_SETS[row](N, 0)
    prompts = [p for p, _ in pairs]
    images = sample(model, sampler, pairs, batch=N)
    assert images.shape == (N, 3, 32, 32)
    assert_measures_as_card(images, prompts, card)


def test_training_script_is_deterministic(tmp_path):
    """Two short runs of the committed recipe give bit-identical weights (the card's reproducibility claim)."""
    from safetensors.torch import load_file

    from fnf.worlds.shapes.train_t2i import main as train

    short = ["--seed", "0", "--vae-steps", "2", "--vae-batch", "4", "--text-pretrain-steps", "1",
             "--unet-steps", "2", "--batch", "4"]
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:  # the script sets both process-wide
        for run in ("a", "b"):
            train(["--out", str(tmp_path / run), "--work-dir", str(tmp_path / f"{run}-work"), *short])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    for part in ("unet", "vae", "text_encoder"):
        weights = [load_file(next((tmp_path / run / part).glob("*.safetensors"))) for run in ("a", "b")]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), part


def test_shipped_folder_is_a_plain_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path("embedded:shapes-t2i"), use_safetensors=True)
    images = pipe("a red circle top left", num_inference_steps=5, guidance_scale=4.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
