"""Bad input: one clear error naming the file or key, no partial outputs. (More cases live beside the code
they guard: prompt files in test_data, reward contracts in test_reward_contract and test_module, sampler and
mask arguments in test_sampling and test_masks, checkpoints in test_resume, unknown keys in test_cli.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from torch.utils.data import DataLoader

from fnf.cli import main
from fnf.data import collate
from fnf.export import WEIGHT_NAME, load_lora, save_lora
from fnf.module import BaseReference, FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.rewards import ColorRegion
from fnf.sampling import Sample, SamplerArgs
from test_error_matrix import _base_config  # tests/test_error_matrix.py


ITEMS = [{"prompt": "a red circle", "seed": 0}, {"prompt": "a blue square", "seed": 1}]


def _exit_message(args: list[str]) -> str:
    """Run the CLI, expect a non-zero exit, return its one-line message (sys.exit's text)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code)
    assert exit_info.value.code != 0 and "\n" not in message, message
    return message


def _copy_model(tiny_model_dir: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_missing_config_file():
    assert "--config /no/such/config.yaml: No such file" in _exit_message(["fit", "--config", "/no/such/config.yaml"])


def test_malformed_yaml_names_file_and_line(config):
    config.write_text("model:\n  lam: [1, 2\n")
    message = _exit_message(["fit", "--config", str(config)])
    assert f"--config {config}: not valid YAML at line 3" in message


def test_unwritable_output_dir_is_one_line(config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root ignores permission bits, so use a path under a file
    message = _exit_message(["fit", "--config", str(config), "--trainer.default_root_dir", str(blocker / "run")])
    assert "a-file" in message


def _module(model_dir: str, **lora) -> FocusNFix:
    return FocusNFix(rewards=[RewardTerm(ColorRegion())], pretrained=model_dir, lam=0.1,
                     sampler=SamplerArgs(num_steps=2, k=1), lora=LoraArgs(**lora))


@pytest.fixture()
def rank4_checkpoint(tiny_model_dir, tmp_path) -> Path:
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_module(tiny_model_dir, rank=4), DataLoader(ITEMS, batch_size=2, collate_fn=collate))
    trainer.save_checkpoint(tmp_path / "rank4.ckpt")
    return tmp_path / "rank4.ckpt"


@pytest.mark.parametrize("lora, match", [
    (dict(rank=8), r"LoRA shape \(4, \d+\) in the checkpoint but \(8, \d+\) .*set model.lora.rank"),
    (dict(rank=4, target_modules=["to_q"]), r"does not match model.lora .*\d+ unexpected"),
])
def test_lora_mismatch_on_checkpoint_load(tiny_model_dir, rank4_checkpoint, lora, match):
    """(The CLI takes model settings from the checkpoint's hyperparameters; programs may not.)"""
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=match):
        trainer.predict(_module(tiny_model_dir, **lora), DataLoader(ITEMS, batch_size=2, collate_fn=collate),
                        ckpt_path=rank4_checkpoint)


def test_a_checkpoint_of_another_base_model_or_no_lora_is_named_as_such():
    """Same rank, other widths: another base model (SD1.5's LoRA on an SDXL config), not a rank to set; no LoRA
    weights at all: not an fnf fit checkpoint (a rahf-train one, say)."""
    from fnf.resume import check_lora_state

    a, b = "unet.to_k.lora_A.default.weight", "unet.to_k.lora_B.default.weight"
    own, wider = {a: torch.Size((4, 64)), b: torch.Size((32, 4))}, {a: torch.zeros(4, 32), b: torch.zeros(32, 4)}
    with pytest.raises(ValueError, match=r"\(4, 32\) in the checkpoint but \(4, 64\) .*trained on another base model"):
        check_lora_state(own, wider)
    with pytest.raises(ValueError, match="holds no LoRA weights: not a checkpoint written by fnf fit"):
        check_lora_state(own, {"model.backbone.weight": torch.zeros(2)})


def test_resolution_not_divisible_by_the_vae_factor_fails_at_construction(tiny_model_dir):
    with pytest.raises(ValueError, match=r"model.sampler.resolution=15 must be divisible by the VAE factor 2"):
        FocusNFix(rewards=[RewardTerm(ColorRegion())], pretrained=tiny_model_dir,
                  sampler=SamplerArgs(num_steps=2, k=1, resolution=15), lora=LoraArgs(rank=2))


def test_overlong_prompt_warns_and_truncates(tiny_model_dir):
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    limit = model.tokenizer.model_max_length
    with pytest.warns(UserWarning, match=f"prompt truncated to {limit} tokens"):
        embedding = model.encode_prompts(["a red circle " * 40])
    assert embedding.hidden.shape[1] == limit


def test_all_one_mask_frees_the_whole_image():
    from fnf.regularizers import PixelFrobenius

    base = Sample(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 4, 4))
    tuned = Sample(torch.zeros(1, 4, 2, 2), torch.rand(1, 3, 4, 4))
    everything_may_change = torch.zeros(1, 1, 4, 4)  # keep = 1 - M with M = 1 everywhere
    assert PixelFrobenius()(tuned, base, everything_may_change).item() == 0.0
    reference = BaseReference(base.latents, base.images, torch.ones(1, 1, 4, 4), torch.ones(1, 1), torch.zeros(1, 1))
    assert reference.masks.amax() == 1  # (the all-zero mask is the empty-mask policy: test_module)


def test_pickle_only_model_weights_are_refused(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    shutil.rmtree(model / "unet")
    unet.save_pretrained(model / "unet", safe_serialization=False)  # a .bin (pickle) file only
    with pytest.raises(ValueError, match=r"cannot load unet/ from .*model \(weights must be safetensors\)"):
        Text2ImageModel.from_pretrained(model)


def test_corrupt_model_safetensors_is_named(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path)
    weights = next((model / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(ValueError, match=r"cannot load vae/ from"):
        Text2ImageModel.from_pretrained(model)


def test_corrupt_lora_file_is_named(tiny_model_dir, tmp_path):
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    model.add_lora(LoraArgs(rank=2))
    save_lora(model, tmp_path / "lora")
    (tmp_path / "lora" / WEIGHT_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=f"{WEIGHT_NAME}: cannot load this LoRA"):
        load_lora(Text2ImageModel.from_pretrained(tiny_model_dir), tmp_path / "lora")


def test_config_with_a_negative_lambda_is_one_line(config):
    data = yaml.safe_load(config.read_text())
    data["model"]["lam"] = -0.5
    config.write_text(yaml.safe_dump(data))
    assert "model.lam" in _exit_message(["fit", "--config", str(config)])


def test_fnf_debug_shows_the_full_traceback(tiny_model_dir, tmp_path, monkeypatch):
    """FNF_DEBUG=1: the error itself propagates (Python prints its traceback) instead of the one line. (Without it the
    same input is one line: the "lam negative" case of the matrix.)"""
    config = _base_config(tiny_model_dir, tmp_path)
    config["model"]["lam"] = -1.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("FNF_DEBUG", "1")
    with pytest.raises(ValueError, match=r"model.lam must be a finite number >= 0") as error:
        main(["fit", "--config", str(tmp_path / "config.yaml")])
    assert error.traceback  # the frames where it was raised, not a SystemExit with a line
