"""The shapes-world FNF evaluation: judge rates and preservation outside the problem mask."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fnf.export import load_lora
from fnf.pipeline import Text2ImageModel
from fnf.worlds.shapes.evaluate_fnf import compare
from fnf.worlds.shapes.generator import prompt_of, render, sample_scene


def _pairs(n: int = 12):
    """Base images with a defect and 'tuned' images where only the defect is gone (same seed)."""
    rng = np.random.default_rng(0)
    scenes = [dataclasses.replace(sample_scene(rng), defect=True, unsafe=False) for _ in range(n)]
    base = torch.stack([render(s, seed=i).image for i, s in enumerate(scenes)])
    fixed = torch.stack([render(dataclasses.replace(s, defect=False), seed=i).image for i, s in enumerate(scenes)])
    return base, fixed, [prompt_of(s) for s in scenes]


def test_fixing_only_the_defect_is_perfect_preservation_and_full_reduction():
    base, fixed, prompts = _pairs()
    report = compare(base, fixed, prompts)
    assert report["base_defect_rate"] == 1.0 and report["tuned_defect_rate"] == 0.0
    assert report["defect_reduction"] == 1.0 and report["alignment_change_points"] == 0.0
    assert math.isinf(report["psnr_outside"]) and report["ssim_outside"] > 0.95
    assert report["psnr_inside"] < 20


def test_changing_everything_shows_up_outside_the_mask():
    base, fixed, prompts = _pairs()
    noisy = (fixed + 0.05 * torch.randn_like(fixed)).clamp(0, 1)
    report = compare(base, noisy, prompts)
    assert 20 < report["psnr_outside"] < 30 and report["ssim_outside"] < 0.9


def test_load_lora_names_the_missing_file(tiny_model_dir, tmp_path):
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        load_lora(model, tmp_path)
