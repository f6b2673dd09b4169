"""The trained LoRA on disk, in diffusers' format: the family's plain pipeline (StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline) loads it with ``load_lora_weights``. Folders are
written whole or not at all (fnf/output_folder.py); other formats (kohya, fused): fnf/export_formats.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.distributed.tensor import DTensor

from fnf.output_folder import atomic_folder
from fnf.pipeline import Text2ImageModel

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_state_dict(model: Text2ImageModel) -> dict[str, Tensor]:
    """The denoiser's LoRA weights as whole, contiguous tensors (safetensors refuses the strides a channels_last
    conv LoRA has). Under FSDP2 they are ``DTensor`` shards and this gathers them: a collective, so every rank must
    call it."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).contiguous()
            for name, value in model.denoiser.state_dict().items() if "lora_" in name}


def diffusers_lora_layers(model: Text2ImageModel, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The denoiser's LoRA under peft's key names (``<module>.lora_A.weight``), no component prefix.

    Not diffusers' ``convert_state_dict_to_diffusers``: it renames only attention projections, and diffusers'
    loader converts a file by its first key alone, so a file whose first key is a ResNet conv (SDXL, the shapes
    world: their first down block has no attention) loaded without its attention LoRA. One naming loads whole."""
    weights = lora_state_dict(model) if weights is None else weights
    return get_peft_model_state_dict(model.denoiser, state_dict=weights)


def write_lora(model: Text2ImageModel, folder: Path, weights: dict[str, Tensor] | None = None) -> None:
    """Write ``WEIGHT_NAME`` (diffusers format) into the existing ``folder``, not atomically: see ``save_lora``."""
    name = model.denoiser_name  # unet_lora_layers / transformer_lora_layers, as the family's pipeline expects
    model.lora_pipeline.save_lora_weights(
        folder, safe_serialization=True, weight_name=WEIGHT_NAME, **{
            f"{name}_lora_layers": diffusers_lora_layers(model, weights),
            f"{name}_lora_adapter_metadata": model.denoiser.peft_config["default"].to_dict()})


def save_lora(model: Text2ImageModel, directory: str | os.PathLike, weights: dict[str, Tensor] | None = None) -> Path:
    """Write ``WEIGHT_NAME`` (diffusers format) atomically into ``directory``.

    ``weights``: ``lora_state_dict(model)``, gathered on every rank when the UNet is sharded; None: read them here.
    """
    with atomic_folder(directory, WEIGHT_NAME) as staging:
        write_lora(model, staging, weights)
    return Path(directory)


def load_lora(model: Text2ImageModel, directory: str | os.PathLike) -> None:
    """Attach a LoRA written by ``save_lora`` (or any diffusers LoRA of the model's family) to its denoiser.

    Keys are put in peft's names first: files fnf wrote before ``diffusers_lora_layers`` used one naming mix
    diffusers' attention names with peft's conv names, and diffusers would drop one kind of them."""
    file = Path(directory) / WEIGHT_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{directory}: no {WEIGHT_NAME} (expected a folder written by fnf fit)")
    try:
        with safe_open(str(file), framework="pt") as opened:
            metadata = (opened.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
        model.denoiser.load_lora_adapter(convert_unet_state_dict_to_peft(load_file(file)), prefix=model.denoiser_name,
                                         adapter_name="default", metadata=metadata and json.loads(metadata))
    except Exception as error:  # corrupt file, another model's LoRA (shapes), adapter clash: one line
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ValueError(f"{file}: cannot load this LoRA: {reason}") from None
