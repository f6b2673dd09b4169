"""benchmarks/flow_shaped.py: the full-size SD3.5-Medium- and FLUX.1-dev-shaped components fit together the way fnf
conditions them (CLIP widths vs the transformer's pooled / joint widths, T5 width, latent channels), checked on the
``meta`` device (shapes only: no 3 B-parameter weights are allocated)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fnf.flux import FluxModel
from fnf.sd3 import SD3Model

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from flow_shaped import flux_dev, sd35_medium  # noqa: E402


def _model(family: str, directory: Path):
    with torch.device("meta"):
        if family == "sd3":
            p = sd35_medium(directory)
            return SD3Model(p.transformer, p.text_encoder, p.tokenizer, p.scheduler, p.vae, p.text_encoder_2,
                            p.tokenizer_2)
        p = flux_dev(directory, (2, 4))
        return FluxModel(p.transformer, p.text_encoder, p.tokenizer, p.scheduler, p.vae, p.text_encoder_2,
                         p.tokenizer_2)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_size_components_fit_fnf_conditioning(family, tmp_path):
    model = _model(family, tmp_path)
    assert model.resolution == 1024
    shape = model.latent_shape(model.resolution)  # (C, 128, 128): 16 channels for both
    text = model.encode_prompts(["a red circle", "a blue square"])
    latents = torch.zeros(2, *shape, device="meta")
    velocity = model.predict(latents, torch.zeros((), device="meta"), text, guidance=3.5 if family == "flux" else None)
    assert velocity.shape == latents.shape
    tokens = {"sd3": 77 + 256, "flux": 512}[family]  # CLIP + zero T5 tokens (SD3), T5 tokens (FLUX)
    assert text.hidden.shape == (2, tokens, 4096)
