"""Loading ``model.pretrained`` as users hold models: hub ids from the local cache, variant-only downloads, weights
in their files' dtype with a float32 LoRA, and folders that load but could not train (another kind of model)
refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from fnf.pipeline import Text2ImageModel
from fnf.worlds.random_sd import build_random_flux, build_random_sd3, build_random_sdxl


def _cache(hub: Path, repo: str, folder: Path) -> None:
    """``folder`` as huggingface_hub stores a download of ``repo``: models--org--name/snapshots/<commit>, refs/main."""
    entry = hub / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


def test_hub_ids_of_every_family_load_from_the_cache_offline(tiny_model_dir, tmp_path):
    """transformers' AutoTokenizer looks for a tokenizer/config.json that no diffusers repository has, so from the
    hub cache it failed for every family; the tokenizer class model_index.json names loads. A fresh process:
    huggingface_hub reads HF_HOME when imported."""
    hub = tmp_path / "hf" / "hub"
    families = {"sd15": Path(tiny_model_dir), "sdxl": build_random_sdxl(tmp_path / "sdxl"),
                "sd3": build_random_sd3(tmp_path / "sd3"), "flux": build_random_flux(tmp_path / "flux")}
    StableDiffusionPipeline.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    families["bf16"] = tmp_path / "bf16"  # loads in its files' dtype from the cache too (they are found there)
    for family, folder in families.items():
        _cache(hub, f"fnf-test/tiny-{family}", folder)
    script = ("from fnf.pipeline import Text2ImageModel\n"
              "for family in ('sd15', 'sdxl', 'sd3', 'flux', 'bf16'):\n"
              "    model = Text2ImageModel.from_pretrained(f'fnf-test/tiny-{family}')\n"
              "    print(family, type(model).__name__, model.denoiser.dtype)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["sd15 Text2ImageModel torch.float32", "sdxl SDXLModel torch.float32",
                                        "sd3 SD3Model torch.float32", "flux FluxModel torch.float32",
                                        "bf16 Text2ImageModel torch.bfloat16"]


def test_a_hub_ids_part_is_downloaded_before_its_dtype_is_read(tiny_model_dir, tmp_path, monkeypatch):
    """A first run from a hub id (nothing cached): the part's config and plain safetensors are downloaded first,
    so it loads in its files' dtype (bf16 here) instead of diffusers' float32; nothing else is fetched (no
    variant, no pickle). Offline, nothing is downloaded. The hub is a local folder behind huggingface_hub's own
    pattern filter."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from fnf.model_files import load_part

    repo = tmp_path / "repo"
    StableDiffusionPipeline.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(repo)
    UNet2DConditionModel.from_pretrained(repo / "unet").save_pretrained(repo / "unet", variant="fp16")
    (repo / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    fetched = []

    def snapshot_download(repo_id, allow_patterns, ignore_patterns):
        snapshot = tmp_path / "cache" / repo_id
        names = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            fetched.append(name)
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / name, snapshot / name)
        return str(snapshot)

    class HubUNet(UNet2DConditionModel):  # from_pretrained of the hub id: the downloaded files
        @classmethod
        def from_pretrained(cls, path, subfolder, **options):
            return UNet2DConditionModel.from_pretrained(tmp_path / "cache" / path, subfolder=subfolder, **options)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    unet = load_part("fnf-test/bf16", "unet", HubUNet)
    assert unet.dtype == torch.bfloat16
    assert sorted(fetched) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fetched.clear()
    assert load_part("fnf-test/bf16", "unet", HubUNet).dtype == torch.float32  # cache only: diffusers' default
    assert fetched == []


def test_a_folder_of_fp16_variant_files_only_loads_them_and_says_so(tiny_model_dir, tmp_path, caplog):
    """A download with variant="fp16" holds *.fp16.safetensors only: those weights load (diffusers would refuse)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert not list((tmp_path / "fp16" / "unet").glob("diffusion_pytorch_model.safetensors"))
    with caplog.at_level("INFO"):
        model = Text2ImageModel.from_pretrained(tmp_path / "fp16")
    assert "unet: only fp16 variant weights there; loading those" in caplog.text
    reference = Text2ImageModel.from_pretrained(tiny_model_dir)
    for name, value in reference.unet.state_dict().items():
        torch.testing.assert_close(model.unet.state_dict()[name].float(), value, rtol=0, atol=0, msg=name)


def test_a_model_of_another_kind_is_refused_in_one_line(tiny_model_dir, tmp_path):
    """An inpainting UNet (latents + mask + masked image: 9 input channels) loads, then would fail mid-sampling."""
    folder = tmp_path / "inpainting"
    shutil.copytree(tiny_model_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    config = {**unet.config, "in_channels": 9}
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    with pytest.raises(ValueError, match=r"the unet takes 9 latent channels but the VAE gives 4; not a text-to-image "
                                         r"model \(inpainting or image-conditioned\?\)"):
        Text2ImageModel.from_pretrained(folder)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_scheduler_config_without_the_latent_settings_is_corrected_as_diffusers_does(tiny_model_dir, tmp_path,
                                                                                        family, caplog):
    """A fine-tune saved with an Euler scheduler has no clip_sample: DDIM's default (true) would clip the predicted
    latents to [-1, 1]. StableDiffusionPipeline sets clip_sample false and steps_offset 1 on load; fnf too, and
    says so (SDXL: clip_sample, which its pipeline leaves, but no latent model wants)."""
    from diffusers import EulerDiscreteScheduler

    folder = shutil.copytree(tiny_model_dir if family == "sd15" else build_random_sdxl(tmp_path / "x"),
                             tmp_path / family)
    EulerDiscreteScheduler(steps_offset=0).save_pretrained(folder / "scheduler")
    with caplog.at_level("INFO"):
        model = Text2ImageModel.from_pretrained(folder)
    assert model.scheduler.config.clip_sample is False
    assert model.scheduler.config.steps_offset == (1 if family == "sd15" else 0)
    assert "clip_sample True -> False" in caplog.text


@pytest.mark.parametrize("change, message", [
    ("edm", r"scheduler has no DDPM noise schedule \(beta_schedule; an EDM or flow-matching scheduler\?\)"),
    ("flow", r"scheduler has no DDPM noise schedule"),
    ("lcm", r"the unet takes a guidance embedding \(time_cond_proj_dim: an LCM-distilled model\); not supported"),
    ("latents_mean", r"the VAE normalises latents per channel \(latents_mean, latents_std\); not supported")])
def test_parts_fnf_would_run_wrongly_are_refused_in_one_line(tiny_model_dir, tmp_path, change, message):
    """Loaded as they are, each would sample other images than its pipeline without a word (DDIM's default betas
    for EDM sigmas, no guidance embedding, unnormalised latents decoded)."""
    from diffusers import AutoencoderKL, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    folder = shutil.copytree(tiny_model_dir, tmp_path / change)
    if change in ("edm", "flow"):
        (EDMEulerScheduler() if change == "edm" else FlowMatchEulerDiscreteScheduler()).save_pretrained(
            folder / "scheduler")
    elif change == "lcm":
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": 32}).save_pretrained(folder / "unet")
    else:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        channels = vae.config.latent_channels
        vae.register_to_config(latents_mean=[0.0] * channels, latents_std=[1.0] * channels)
        vae.save_pretrained(folder / "vae")
    with pytest.raises(ValueError, match=f"^model.pretrained: {folder}.*{message}"):
        Text2ImageModel.from_pretrained(folder)


def test_a_home_relative_folder_loads(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """``model.pretrained: ~/models/sd`` in a YAML file: no shell expands the ``~`` there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "sd")
    with caplog.at_level("INFO"):
        Text2ImageModel.from_pretrained("~/models/sd")
    assert "fnf: ~/models/sd: Text2ImageModel (StableDiffusionPipeline)" in caplog.text  # loaded


def test_the_family_loaded_is_named(tiny_model_dir, tmp_path, caplog):
    """An SDXL folder given to an SD1.5 config trains as SDXL: the log says which family loaded."""
    folder = build_random_sdxl(tmp_path / "sdxl")
    with caplog.at_level("INFO"):
        Text2ImageModel.from_pretrained(folder)
    assert f"fnf: {folder}: SDXLModel (StableDiffusionXLPipeline), native 16x16" in caplog.text
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_an_sd3_folder_without_the_t5_its_index_lists_says_how_to_drop_it(tmp_path):
    folder = build_random_sd3(tmp_path / "sd3")
    shutil.rmtree(folder / "text_encoder_3")
    with pytest.raises(ValueError, match="lists text_encoder_3 \\(T5\\) but the folder has none; T5 is optional: set "
                                         "text_encoder_3 and tokenizer_3 to \\[null, null\\]"):
        Text2ImageModel.from_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                         "tokenizer_3": [None, None]}))
    assert Text2ImageModel.from_pretrained(folder).text_encoder_3 is None  # as the message says


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_weights_load_in_the_dtype_their_files_hold_and_the_lora_is_float32(tiny_model_dir, config, tmp_path):
    """bf16 files stay bf16 until model.compute decides (diffusers would upcast them to float32 first: twice the
    host memory per process for a FLUX-size transformer); peft gives a new LoRA its layer's dtype: made float32."""
    from fnf.pipeline import LoraArgs

    StableDiffusionPipeline.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = Text2ImageModel.from_pretrained(tmp_path / "bf16")
    assert {model.unet.dtype, model.vae.dtype, model.text_encoder.dtype} == {torch.bfloat16}
    reference = Text2ImageModel.from_pretrained(tiny_model_dir)
    for name, value in reference.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[name], value.to(torch.bfloat16)), name
    assert _bytes(model) * 2 == _bytes(reference)
    model.add_lora(LoraArgs(rank=4))
    assert {p.dtype for p in model.lora_parameters()} == {torch.float32}
    from fnf.cli import main  # and it trains: at 32-true, model.compute stores the frozen weights in float32

    main(["fit", "--config", str(config), f"--model.pretrained={tmp_path / 'bf16'}", "--trainer.max_steps=1"])


def test_float16_files_load_as_float16(tiny_model_dir, tmp_path):
    """safetensors calls float16 'F16': such files stay float16 until model.compute decides, as bf16 files do."""
    StableDiffusionPipeline.from_pretrained(tiny_model_dir, dtype=torch.float16).save_pretrained(tmp_path / "fp16")
    model = Text2ImageModel.from_pretrained(tmp_path / "fp16")
    assert model.unet.dtype == model.vae.dtype == torch.float16
    reference = Text2ImageModel.from_pretrained(tiny_model_dir)
    assert _bytes(model.unet) * 2 == _bytes(reference.unet)


def test_sharded_fp16_variant_files_only_load_them(tiny_model_dir, tmp_path, caplog):
    """A large part is saved in shards, *.fp16-00001-of-0000N.safetensors: one variant still, not N."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.unet.save_pretrained(tmp_path / "sharded", variant="fp16", max_shard_size="300KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and all(".fp16-000" in name for name in shards), shards
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "unet")
    shutil.copytree(tmp_path / "sharded", tmp_path / "model" / "unet")
    with caplog.at_level("INFO"):
        model = Text2ImageModel.from_pretrained(tmp_path / "model")
    assert "unet: only fp16 variant weights there; loading those" in caplog.text
    for name, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(model.unet.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_two_variants_and_no_plain_weights_lists_both(tiny_model_dir, tmp_path):
    """Which variant to load is the user's choice: the error names every one there."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder / "unet", variant="fp16")
    unet.save_pretrained(folder / "unet", variant="bf16")
    with pytest.raises(ValueError) as error:
        Text2ImageModel.from_pretrained(folder)
    message = str(error.value)
    assert message.startswith(f"model.pretrained: cannot load unet/ from {folder} (weights must be safetensors): ")
    assert message.endswith("; variant weights there: bf16, fp16"), message
