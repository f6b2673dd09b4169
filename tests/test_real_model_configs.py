"""Real-model configs (configs/{sd15,sdxl,sd3,flux}/*.yaml): offline they fail with one clear line; their structure
runs on tiny random SD1.5- / SDXL- / SD3- / FLUX.1-dev-shaped models and a tiny open_clip model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fnf.cli import main
from fnf.worlds.random_sd import build_random_flux, build_random_sd3, build_random_sdxl

CONFIGS = Path(__file__).parents[1] / "configs"
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
REAL = [config for family in FAMILIES for config in sorted(CONFIGS.glob(f"{family}/*.yaml"))]


@pytest.fixture(scope="module")
def tiny_family_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    builders = {"sdxl": build_random_sdxl, "sd3": build_random_sd3, "flux": build_random_flux}
    return {"sd15": tiny_model_dir} | {family: str(build(tmp_path_factory.mktemp(f"tiny-{family}") / "model"))
                                       for family, build in builders.items()}


def _skip_without_extras(config: Path) -> None:
    if "NudeNetSafety" in config.read_text():
        pytest.importorskip("onnx2torch", reason="optional extra: pip install fnf[nudenet]")


def _exit_message(args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    return str(exit_info.value.code)


def _swap_models(node, model_dir: str, clip: str, rahf: str, richhf: tuple[str, str]):
    """Every hub id or user weight file in a config -> the tiny local stand-ins (same structure, same code path)."""
    if isinstance(node, dict):
        if node.get("class_path") == "OpenCLIPAlignment":
            node["init_args"] |= {"model": clip, "pretrained": None}
        if node.get("class_path") == "RAHFHeatmap":
            node["init_args"] |= {"weights": rahf}
        if node.get("class_path") == "RAHFReproductionHeatmap":
            node["init_args"] |= {"weights": richhf[0], "tokenizer": richhf[1]}
        return {k: model_dir if k == "pretrained" and isinstance(v, str) and "/" in v and k != "init_args"
                else _swap_models(v, model_dir, clip, rahf, richhf) for k, v in node.items()}
    if isinstance(node, list):
        return [_swap_models(v, model_dir, clip, rahf, richhf) for v in node]
    return node


@pytest.mark.parametrize("config", REAL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_offline_the_config_fails_with_one_line(config, monkeypatch):
    _skip_without_extras(config)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fnf reads it at call time
    # huggingface_hub reads it at import, long done here; a user sets it before starting (else ~50 s of retries)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    message = _exit_message(["fit", "--config", str(config)])
    assert "\n" not in message
    assert any(what in message for what in ("not found locally", "cannot load open_clip model", "RAHF weights",
                                            "RAHF reproduction weights")), message


@pytest.mark.parametrize("config", REAL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_structure_runs_on_tiny_stand_ins(config, tiny_family_dirs, tiny_clip, tiny_rahf, tiny_rahf_reproduction,
                                                 tmp_path, alexnet_cache):
    _skip_without_extras(config)
    model_dir = tiny_family_dirs[config.parent.name]
    data = _swap_models(yaml.safe_load(config.read_text()), model_dir, tiny_clip, tiny_rahf,
                        tiny_rahf_reproduction)
    data["model"]["sampler"] |= {"resolution": 16, "num_steps": 3}
    data["trainer"] |= {"precision": "32-true", "default_root_dir": str(tmp_path), "enable_progress_bar": False}
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(path), "--trainer.fast_dev_run=true"])
    assert data["model"]["lora"]["rank"] == 64 and data["model"]["sampler"]["k"] == 2  # the paper's settings stay
