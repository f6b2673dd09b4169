"""The trained LoRA on disk, in diffusers' format: the family's plain pipeline (StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline) loads it with ``load_lora_weights``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from torch import Tensor
from torch.distributed.tensor import DTensor

from fnf.checkpoint_io import disk_full, umask_mode
from fnf.pipeline import Text2ImageModel

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_state_dict(model: Text2ImageModel) -> dict[str, Tensor]:
    """The denoiser's LoRA weights as whole tensors. Under FSDP2 they are ``DTensor`` shards and this gathers them:
    a collective, so every rank must call it."""
    return {name: value.full_tensor() if isinstance(value, DTensor) else value
            for name, value in model.denoiser.state_dict().items() if "lora_" in name}


def save_lora(model: Text2ImageModel, directory: str | os.PathLike, weights: dict[str, Tensor] | None = None) -> Path:
    """Write ``WEIGHT_NAME`` (diffusers format) atomically into ``directory``.

    ``weights``: ``lora_state_dict(model)``, gathered on every rank when the UNet is sharded; None: read them here.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    weights = lora_state_dict(model) if weights is None else weights
    layers = get_peft_model_state_dict(model.denoiser, state_dict=weights)
    name = model.denoiser_name  # unet_lora_layers / transformer_lora_layers, as the family's pipeline expects
    if name == "unet":  # UNet LoRA files use diffusers' key names; transformer ones keep peft's (as diffusers' scripts)
        layers = convert_state_dict_to_diffusers(layers)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.lora_pipeline.save_lora_weights(
            staging, safe_serialization=True, weight_name=WEIGHT_NAME, **{
                f"{name}_lora_layers": layers,
                f"{name}_lora_adapter_metadata": model.denoiser.peft_config["default"].to_dict()})
        os.chmod(staging, umask_mode(0o777))  # mkdtemp's 0700; safetensors writes its file 0600
        for written in staging.iterdir():
            os.chmod(written, umask_mode(0o666))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)  # readers see the old export or the new one, never half of one
    except Exception as error:
        full = disk_full(directory / WEIGHT_NAME)
        if full is None:
            raise
        raise full from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_lora(model: Text2ImageModel, directory: str | os.PathLike) -> None:
    """Attach a LoRA written by ``save_lora`` (or any diffusers LoRA of the model's family) to its denoiser."""
    if not (Path(directory) / WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no {WEIGHT_NAME} (expected a folder written by fnf fit)")
    try:
        model.denoiser.load_lora_adapter(str(directory), prefix=model.denoiser_name, adapter_name="default",
                                         weight_name=WEIGHT_NAME, use_safetensors=True)
    except Exception as error:  # corrupt file, another model's LoRA (shapes), adapter clash: one line
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ValueError(f"{Path(directory) / WEIGHT_NAME}: cannot load this LoRA: {reason}") from None
