"""Shared fixtures: a tiny, seeded, random SD1.x-shaped model in diffusers format (STYLE rule 9)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see the Makefile's test target

from pathlib import Path  # noqa: E402

import pytest
import torch
import yaml

from fnf.worlds.random_sd import build_random_sd


def pytest_addoption(parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """16×16 RGB images, VAE factor 2, 8×8×4 latents, 2-layer 32-wide CLIP text encoder (~1.5M params)."""
    return str(build_random_sd(tmp_path_factory.mktemp("tiny-sd") / "model"))


@pytest.fixture()
def config(tiny_model_dir, tmp_path) -> Path:
    """A 2-step ``fnf fit`` config on the tiny model (4 prompts, batch 2); tests edit it to break it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle top left\na blue square bottom right\na green circle\na red square\n")
    config = {
        "model": {"pretrained": tiny_model_dir, "lam": 0.1, "sampler": {"num_steps": 3, "k": 1},
                  "lora": {"rank": 4}, "rewards": [{"head": {"class_path": "ColorRegion"}, "mask": "heatmap"}]},
        "data": {"train_file": str(prompts), "val_file": str(prompts), "batch_size": 2},
        "trainer": {"max_steps": 2, "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False},
        "predict_writer": {"output_dir": str(tmp_path / "predictions")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random open_clip model saved as ``local-dir:`` (no download)."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-open-clip")
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                            "head_width": 16},
                            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
              "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


@pytest.fixture(scope="session")
def tiny_rahf(tmp_path_factory) -> str:
    """A tiny random RAHF model (16 px, 1 + 1 blocks) as .safetensors, its sizes in the metadata."""
    import torch

    from fnf.rewards.rahf import RAHF, RAHFConfig, save_rahf

    torch.manual_seed(0)
    config = RAHFConfig(image_size=16, patch_size=4, vision_width=16, vision_layers=1, vision_heads=2,
                        context_length=8, width=16, fusion_layers=1, fusion_heads=2, decoder_channels=(4,),
                        score_channels=4, score_hidden=8)
    path = tmp_path_factory.mktemp("tiny-rahf") / "rahf.safetensors"
    save_rahf(RAHF(config), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_rahf_reproduction(tmp_path_factory) -> tuple[str, str]:
    """A tiny random RAHF in the public reproduction's layout (.safetensors) and a word-level T5-style tokenizer."""
    import torch

    from fnf.rewards.rahf_reproduction import RAHFReproduction, ReproductionConfig, save_reproduction
    from fnf.worlds.tokenizer import build_t5_like_tokenizer

    folder = tmp_path_factory.mktemp("tiny-rahf-reproduction")
    words = "a an the red green blue circle square triangle two top left bottom right sky".split()
    vocab_size = len(build_t5_like_tokenizer(words, folder / "tokenizer"))
    torch.manual_seed(0)
    config = ReproductionConfig(vit=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=16),
                                t5=dict(vocab_size=vocab_size, d_model=128, d_kv=32, num_heads=4, d_ff=64, num_layers=1),
                                heatmap_stem=(8, 8), heatmap_ups=(8, 4), heatmap_last=4)
    save_reproduction(RAHFReproduction(config), folder / "rahf.safetensors")
    return str(folder / "rahf.safetensors"), str(folder / "tokenizer")


def two_box_config(config: Path, tmp_path: Path, **saliency) -> Path:
    """``config`` with two masked heads on disjoint quarters of the image: ColorRegion top left, and the gradient
    saliency of a ColorRegion bottom right (``saliency``: more Saliency arguments); no dilation, so no mask leaves
    its quarter."""
    settings = yaml.safe_load(config.read_text())
    settings["model"]["rewards"] = [
        {"head": {"class_path": "fnf.rewards.ColorRegion", "init_args": {"box": [0.0, 0.0, 0.5, 0.5]}},
         "mask": "heatmap"},
        {"head": {"class_path": "fnf.rewards.Saliency", "init_args": {
            "head": {"class_path": "fnf.rewards.ColorRegion", "init_args": {"box": [0.5, 0.5, 1.0, 1.0]}},
            "sigma": 0.0, **saliency}}, "mask": "heatmap"}]
    settings["model"]["masks"] = {"threshold": 0.05, "dilation": 0}
    path = tmp_path / "two_heads.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="session")
def _alexnet_hub(tmp_path_factory) -> Path:
    """torch's hub folder holding an AlexNet (random weights: the ImageNet ones cannot be downloaded here) under the
    file name torchvision's ImageNet weights have; 244 MB, written once per session."""
    from torchvision.models import AlexNet_Weights, alexnet

    torch_home = tmp_path_factory.mktemp("torch")
    cached = torch_home / "hub" / "checkpoints" / AlexNet_Weights.DEFAULT.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(alexnet(weights=None).state_dict(), cached)
    return cached


@pytest.fixture
def alexnet_cache(_alexnet_hub, monkeypatch) -> Path:
    """``$TORCH_HOME`` pointing at the session's AlexNet, where lpips_network reads it."""
    monkeypatch.setenv("TORCH_HOME", str(_alexnet_hub.parents[2]))
    return _alexnet_hub


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_model_dir, tmp_path_factory) -> Path:
    """The run the resume and preemption tests compare with: test_resume's ``_config``, 7 steps, never stopped (its
    checkpoint frequency and folder do not change what it trains); once per session (and pytest worker). In this
    process, as the resumed runs are: only the interrupted runs need one of their own."""
    from fnf.cli import main
    from test_resume import _config

    tmp = tmp_path_factory.mktemp("uninterrupted")
    main(["fit", "--config", str(_config(tmp, tiny_model_dir, "straight", None))])
    return tmp / "straight"


@pytest.fixture
def model_loading_fails(monkeypatch) -> None:
    """Any model load is a test failure: for what must be refused before loading (minutes for a large model)."""
    from fnf.pipeline import Text2ImageModel

    def load(cls, pretrained):
        raise AssertionError(f"loaded {pretrained}")

    monkeypatch.setattr(Text2ImageModel, "from_pretrained", classmethod(load))
