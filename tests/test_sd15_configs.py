"""Real-model configs (configs/sd15/*.yaml): offline they fail with one clear line; their structure runs on a
tiny SD1.5-shaped model and a tiny open_clip model built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from fnf.cli import main

SD15 = sorted((Path(__file__).parents[1] / "configs" / "sd15").glob("*.yaml"))


def _exit_message(args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    return str(exit_info.value.code)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    import open_clip

    folder = tmp_path_factory.mktemp("tiny-open-clip")
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                            "head_width": 16},
                            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
              "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    save_file(open_clip.create_model(f"local-dir:{folder}", load_weights=False).state_dict(),
              str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def _swap_models(node, model_dir: str, clip: str):
    """Every hub id in a config -> the tiny local stand-ins (same structure, same code path)."""
    if isinstance(node, dict):
        if node.get("class_path") == "OpenCLIPAlignment":
            node["init_args"] |= {"model": clip, "pretrained": None}
        return {k: model_dir if k == "pretrained" and isinstance(v, str) and "/" in v and k != "init_args"
                else _swap_models(v, model_dir, clip) for k, v in node.items()}
    if isinstance(node, list):
        return [_swap_models(v, model_dir, clip) for v in node]
    return node


@pytest.mark.parametrize("config", SD15, ids=lambda p: p.stem)
def test_offline_the_config_fails_with_one_line(config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _exit_message(["fit", "--config", str(config)])
    assert "\n" not in message and ("not found locally" in message or "cannot load open_clip model" in message)


@pytest.mark.parametrize("config", SD15, ids=lambda p: p.stem)
def test_config_structure_runs_on_tiny_stand_ins(config, tiny_model_dir, tiny_clip, tmp_path):
    data = _swap_models(yaml.safe_load(config.read_text()), tiny_model_dir, tiny_clip)
    data["model"]["sampler"] |= {"resolution": 16, "num_steps": 3}
    data["trainer"] |= {"precision": "32-true", "default_root_dir": str(tmp_path), "enable_progress_bar": False}
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(path), "--trainer.fast_dev_run=true"])
    assert data["model"]["lora"]["rank"] == 64 and data["model"]["sampler"]["k"] == 2  # the paper's settings stay
