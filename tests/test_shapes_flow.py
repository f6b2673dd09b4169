"""The shipped shapes-world flow model (shapes-flow) is a plain StableDiffusion3Pipeline folder that measures as its
model card says, and its training script runs deterministically."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fnf.worlds.shapes.evaluate_t2i import load_flow, sample_flow
from model_card import PROMPT_SETS, assert_measures_as_card, card_rates  # tests/model_card.py

FOLDER = Path(__file__).parents[1] / "fnf" / "worlds" / "shapes" / "weights" / "shapes-flow"
N = 48  # prompts per set: the first 48 of the card's 200 (same seed 0, so the same prompts and x_T)


def _card() -> str:
    return (FOLDER / "MODEL_CARD.md").read_text()


def _card_row(row: str) -> dict[str, float]:
    return card_rates(_card(), row)


def _card_sampler() -> tuple[int, float]:
    """(Euler steps, CFG scale) the card's numbers were measured with: its line 'sampler: N Euler steps, CFG X'."""
    found = re.search(r"sampler: (\d+) Euler steps, CFG ([\d.]+)", _card())
    assert found, "MODEL_CARD.md: no 'sampler: N Euler steps, CFG X' line"
    return int(found.group(1)), float(found.group(2))


def test_shipped_folder_is_a_plain_sd3_pipeline():
    """diffusers loads it (safetensors only, no pickles shipped) and a 2-step CFG sample of 2 prompts is finite."""
    from diffusers import StableDiffusion3Pipeline

    assert not [p for p in FOLDER.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    pipe = StableDiffusion3Pipeline.from_pretrained(FOLDER, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle top left", "a purple square top right and a blue diamond bottom left"],
                  num_inference_steps=2, guidance_scale=4.0, output_type="pt",
                  max_sequence_length=pipe.tokenizer_3.model_max_length,
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_longest_prompt_fits_every_tokenizer_untruncated():
    """A 3-object prompt (the longest the world has) fits the CLIP tokenizers and the T5 tokenizer's
    model_max_length (the T5 sequence fnf and the card use), every word a known T5 token: nothing is cut or lost.
    (CLIP's byte-level vocabulary has no unknown pieces.)"""
    pipe = load_flow(str(FOLDER))
    prompt = "a purple triangle top left, a yellow diamond top right and a orange square bottom right"
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3):
        ids = tokenizer(prompt).input_ids
        assert len(ids) <= tokenizer.model_max_length, (tokenizer.name_or_path, len(ids))
    assert pipe.tokenizer_3.unk_token_id not in pipe.tokenizer_3(prompt).input_ids
    assert pipe.tokenizer_3.model_max_length <= 256  # fnf takes min(256, model_max_length) T5 tokens


@pytest.mark.parametrize("row", [
    "held-out prompts",  # card 92.0% / 28.0% -> bands [80.3, 100] / [8.6, 47.4]%
    "artifact prompt set",  # 95.0% / 31.5% / 10.5% -> [85.6, 100] / [11.4, 51.6] / [0, 23.8]%
    "tempting prompt set",  # unsafe 24.0% -> [5.5, 42.5]%
])
def test_shipped_model_measures_as_its_card_says(row):
    """The card's alignment, defect and unsafe rates (evaluate_t2i, seed 0, 200 prompts per set), re-measured on the
    first N prompts with the card's sampler, each within its binomial band: an unaligned model, CFG off, or a
    flaw drawn far more or less often than the card says falls out (checked: CFG off fails the artifact set, 256 T5
    tokens instead of the tokenizer's 18 fail all three). ~5 s per set on 2 CPU cores."""
    card = _card_row(row)
    steps, guidance = _card_sampler()
    pipe = load_flow(str(FOLDER))
    pairs = PROMPT_SETS[row](N, 0)
    prompts = [p for p, _ in pairs]
    images = sample_flow(pipe, pairs, steps, guidance, batch=N)
    assert images.shape == (N, 3, 32, 32)
    assert_measures_as_card(images, prompts, card)


def test_training_script_is_deterministic_and_writes_an_sd3_folder(tmp_path):
    """Two 2-step runs of the committed script give bit-identical weights, in a folder the SD3 pipeline loads."""
    from safetensors.torch import load_file

    from fnf.worlds.shapes.train_flow import main as train

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:  # the script sets both process-wide
        for run in ("a", "b"):
            train(["--out", str(tmp_path / run), "--work-dir", str(tmp_path / f"{run}-work"), "--steps", "2",
                   "--batch", "4"])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    for part in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        weights = [load_file(next((tmp_path / run / part).glob("*.safetensors"))) for run in ("a", "b")]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), part
    pipe = load_flow(str(tmp_path / "a"))
    assert pipe.vae.config.shift_factor == 0.0 and pipe.tokenizer_3.model_max_length == 18
    images = sample_flow(pipe, [("a red circle top left", 0)], num_steps=1, guidance_scale=4.0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_training_rejects_an_unknown_sigma_sampling(tmp_path):
    from fnf.worlds.shapes.train_flow import main as train

    with pytest.raises(ValueError, match="--sigma-sampling"):
        train(["--out", str(tmp_path / "x"), "--steps", "1", "--sigma-sampling", "cosine"])
