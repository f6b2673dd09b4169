"""Load a diffusers text-to-image model, freeze it and put a peft LoRA on its denoiser (UNet or transformer).

One denoiser serves both passes of the FNF step: the base image I0 is sampled with the adapter
disabled (``adapter_disabled()``), so no second copy of the model is kept in memory. Families (SD1.x/2.x here;
SDXL, SD3 and FLUX.1 in their own files) differ only in how they load, condition and call the denoiser.
"""

from __future__ import annotations

import inspect
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from peft import LoraConfig
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from transformers import CLIPTextModel

from fnf.device_copies import to_device
from fnf.lora_passes import BaseRowsOff, FoldedLora, LoraLayers, gradient_free_lora
from fnf.model_files import load_part, load_tokenizer, read_model_index, resolve_model_path
from fnf.sharding import shard_unet

@dataclass
class LoraArgs:
    """LoRA on the denoiser (peft); the paper uses rank 64 on the attention projections."""

    rank: int = 64
    """LoRA rank r."""
    alpha: float | None = None
    """LoRA alpha (scale = alpha / rank); None means alpha = rank."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Denoiser module names that get a LoRA (attention projections by default; SD3 / FLUX also have the text
    stream's add_q_proj, add_k_proj, add_v_proj, to_add_out)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:  # scale alpha / rank: 0 trains nothing, < 0 flips the update
            raise ValueError(f"model.lora.alpha must be > 0 (or null: the rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")

    def to_peft(self) -> LoraConfig:
        # B starts at zero, so the tuned model equals the base model before the first step.
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
        )


@dataclass
class TextEmbedding:
    """What the denoiser is conditioned on: per-token hidden states and, for SDXL / SD3 / FLUX, a pooled embedding."""

    hidden: Tensor
    """(B, L, D) text-encoder hidden states (SDXL: both encoders' penultimate layers, concatenated; SD3: CLIP and
    T5 tokens; FLUX: T5 tokens)."""
    pooled: Tensor | None = None
    """(B, P) pooled prompt embedding (SDXL, SD3, FLUX); None for SD1.x/2.x."""

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def expand(self, batch: int) -> TextEmbedding:
        """A batch-1 embedding (the unconditional one) as ``batch`` rows, without copying."""
        return TextEmbedding(self.hidden.expand(batch, -1, -1),
                             None if self.pooled is None else self.pooled.expand(batch, -1))

    def repeat(self, n: int) -> TextEmbedding:
        """(n·B) rows, copy i of row b at i·B + b (DRaFT-LV's stacking)."""
        return TextEmbedding(self.hidden.repeat(n, 1, 1), None if self.pooled is None else self.pooled.repeat(n, 1))

    @staticmethod
    def cat(parts: list[TextEmbedding]) -> TextEmbedding:
        pooled = [p.pooled for p in parts]
        return TextEmbedding(torch.cat([p.hidden for p in parts]), None if pooled[0] is None else torch.cat(pooled))


class Text2ImageModel(nn.Module):
    """The frozen parts of a latent (or pixel-space, ``vae=None``) text-to-image diffusion model."""

    denoiser_name: ClassVar[str] = "unet"
    """The denoiser's attribute: diffusers' component name, so checkpoint keys (``model.unet.*``) and LoRA exports
    (``unet.*`` / ``transformer.*``) use the names diffusers uses."""
    lora_pipeline: ClassVar[type] = StableDiffusionPipeline
    """The diffusers pipeline whose ``save_lora_weights`` / ``load_lora_weights`` read this family's LoRA files."""
    guidance: Literal["cfg", "embedded", "none"] = "cfg"
    """How ``sampler.guidance_scale`` acts: classifier-free guidance, a guidance input of the denoiser (FLUX.1-dev),
    or not at all (FLUX.1-schnell)."""

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module, tokenizer, scheduler,
                 vae: AutoencoderKL | None = None) -> None:
        super().__init__()
        setattr(self, self.denoiser_name, denoiser)
        self.text_encoder, self.vae = text_encoder, vae
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self._base_rows_off = BaseRowsOff()
        remember_processor_signatures(denoiser)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike) -> Text2ImageModel:
        """Load SD1.x/2.x-layout folders (unet/, text_encoder/, tokenizer/, scheduler/, vae/) or hub ids.

        Weights are read from safetensors only; the scheduler is converted to DDIM (eta = 0 later).
        SDXL-layout folders (``text_encoder_2/``) load as ``fnf.sdxl.SDXLModel``; folders with a ``transformer/``
        as ``fnf.sd3.SD3Model`` (SD3Transformer2DModel) or ``fnf.flux.FluxModel`` (FluxTransformer2DModel); folders
        of another pipeline class with an installed ``fnf.backbones`` plugin as that plugin's family.
        """
        path = resolve_model_path(pretrained)
        index = read_model_index(str(pretrained), path)
        model = family_of(index, str(pretrained)).load(path, index)
        model.check_parts(str(pretrained))
        rank_zero_info(f"fnf: {pretrained}: {type(model).__name__} ({index.get('_class_name')}), native "
                       f"{model.resolution}x{model.resolution}")
        return model

    @classmethod
    def load(cls, path: str, index: dict) -> Text2ImageModel:
        """The parts of a local SD1.x/2.x-layout folder (``index``: its model_index.json). Every family has one
        (``fnf.sdxl``, ``fnf.sd3``, ``fnf.flux``, ``fnf.backbones`` plugins)."""
        vae = load_part(path, "vae", AutoencoderKL) if index.get("vae") else None
        expected = dict(clip_sample=False, steps_offset=1) if vae is not None else {}  # as StableDiffusionPipeline
        scheduler = ddim_scheduler(load_part(path, "scheduler", DDIMScheduler, weights=False), path, **expected)
        return cls(load_part(path, "unet", UNet2DConditionModel), load_part(path, "text_encoder", CLIPTextModel),
                   load_tokenizer(path, "tokenizer", index), scheduler, vae)

    def check_parts(self, pretrained: str) -> None:
        """Parts that load but cannot work together: a denoiser that takes other latents than the VAE gives (an
        inpainting or image-conditioned model: extra input channels), or that fnf would run wrongly without a word:
        a guidance-embedding (LCM-distilled) UNet, a VAE with per-channel latent statistics."""
        if self.vae is not None and self.latent_shape(self.resolution)[0] != self.vae.config.latent_channels:
            raise ValueError(f"model.pretrained: {pretrained}: the {self.denoiser_name} takes "
                             f"{self.latent_shape(self.resolution)[0]} latent channels but the VAE gives "
                             f"{self.vae.config.latent_channels}; not a text-to-image model (inpainting or "
                             "image-conditioned?)")
        if self.denoiser.config.get("time_cond_proj_dim"):
            raise ValueError(f"model.pretrained: {pretrained}: the {self.denoiser_name} takes a guidance embedding "
                             "(time_cond_proj_dim: an LCM-distilled model); not supported")
        if self.vae is not None and self.vae.config.get("latents_mean") is not None:
            raise ValueError(f"model.pretrained: {pretrained}: the VAE normalises latents per channel (latents_mean, "
                             "latents_std); not supported")

    @property
    def denoiser(self) -> nn.Module:
        """The network the sampler calls every step (UNet or transformer); the LoRA lives on it."""
        return getattr(self, self.denoiser_name)

    # ---- LoRA -------------------------------------------------------------------------------
    def add_lora(self, args: LoraArgs) -> None:
        names = [name for name, _ in self.denoiser.named_modules()]
        unknown = [t for t in args.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:  # peft drops a name that matches nothing as long as another one matches something
            linear = sorted({_short_name(n) for n, m in self.denoiser.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"model.lora.target_modules: {', '.join(unknown)} match no module of the "
                             f"{type(self.denoiser).__name__}; its Linear layers include {', '.join(linear[:16])}")
        self.denoiser.add_adapter(args.to_peft())
        for name, parameter in self.denoiser.named_parameters():  # peft gives them the layer's dtype
            if "lora_" in name and parameter.dtype in (torch.float16, torch.bfloat16):
                parameter.data = parameter.data.float()  # the LoRA, its gradients and optimizer state: float32
        self.lora_args, self._lora_parameters, self._lora_layers = args, None, None

    def lora_parameters(self) -> list[nn.Parameter]:
        if getattr(self, "_lora_parameters", None) is None:  # fixed once the adapter exists; asked every step
            self._lora_parameters = [p for n, p in self.denoiser.named_parameters() if "lora_" in n]
        return self._lora_parameters

    def lora_layers(self) -> LoraLayers:
        """The denoiser's LoRA layers (``fnf.lora_passes.LoraLayers``), found once the adapter exists."""
        if getattr(self, "_lora_layers", None) is None:
            self._lora_layers = LoraLayers(self.denoiser)
        return self._lora_layers

    def shard(self, mesh: DeviceMesh) -> None:
        """FSDP2: shard the denoiser over ``mesh`` (``fnf.sharding``); its parameters become new ``DTensor`` objects."""
        shard_unet(self.denoiser, mesh)
        self._lora_parameters = self._lora_layers = None  # found again on the sharded modules

    @contextmanager
    def adapter_disabled(self):
        """The base model θ0: the same denoiser with its LoRA switched off."""
        self.lora_layers().enable(False)
        try:
            yield
        finally:
            self.lora_layers().enable(True)

    def gradient_free_lora(self, pair: bool, fold: bool):
        """Context for denoiser calls without gradients (``fnf.lora_passes``): ``fold`` runs each LoRA Linear as one
        matmul with W + s·B·A; ``pair`` makes the first half of every batch the base model θ0, the second θ."""
        return gradient_free_lora(self.lora_layers(), self._base_rows_off, pair, fold)

    def gradient_free_mode(self):
        """Context for denoiser calls whose tensors never enter autograd: inference mode, which skips autograd's
        per-op bookkeeping (version counters, view tracking; ~5% of a dispatch-bound UNet call); plain no_grad
        under FSDP2, whose unsharding writes parameters in place and would leave them inference tensors."""
        return torch.no_grad() if isinstance(self.denoiser, FSDPModule) else torch.inference_mode()

    def folded_lora(self, fold: bool = True) -> FoldedLora:
        """The denoiser's LoRA Linears as one matmul each with W + s·B·A (``fold``; else none), built now under the
        current grad mode: with gradients enabled they flow to the LoRA; ``installed()`` puts them to use."""
        return FoldedLora(self.lora_layers()) if fold else FoldedLora.none()

    # ---- text and image space ----------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> TextEmbedding:
        """(B,) prompts -> the denoiser's conditioning; over-long prompts are truncated (with a warning)."""
        ids = to_device(token_ids(self.tokenizer, prompts), self.text_encoder.device)
        return TextEmbedding(self.text_encoder(ids)[0])

    def unconditional(self) -> TextEmbedding:
        """The batch-1 conditioning of classifier-free guidance's unconditional branch: the empty prompt."""
        return self.encode_prompts([""])

    def predict(self, latents: Tensor, t: Tensor, text: TextEmbedding, guidance: float | None = None) -> Tensor:
        """The denoiser's output at (x_t, t, c) with whatever adapter state it has: ε or v (the scheduler's
        ``prediction_type``) for UNets, the velocity for flow transformers. ``guidance``: only for
        ``guidance == "embedded"`` models; ``t``: the scheduler's timestep, a tensor on the denoiser's device."""
        return self.unet(latents, t, encoder_hidden_states=text.hidden).sample

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def resolution(self) -> int:
        """Native image side in pixels."""
        return self.denoiser.config.sample_size * self.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this: a transformer's patch size (UNets have none: 1)."""
        return self.denoiser.config.get("patch_size", 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % (self.vae_scale_factor * self.latent_multiple):
            patch = f" × the patch size {self.latent_multiple}" if self.latent_multiple > 1 else ""
            raise ValueError(f"model.sampler.resolution={resolution} must be divisible by the VAE factor "
                             f"{self.vae_scale_factor}{patch}")
        side = resolution // self.vae_scale_factor
        return (self.denoiser.config.in_channels, side, side)

    def float32_parts(self, compute: torch.dtype) -> tuple[nn.Module, ...]:
        """Frozen parts that stay float32 when the others are stored in ``compute`` (``model.compute``): none here;
        SDXL's VAE under float16."""
        return ()

    def flow_schedule(self, num_steps: int, latent_shape: tuple[int, int, int]) -> dict:
        """Extra ``set_timesteps`` arguments of a flow-matching scheduler (SD3 / FLUX override it as their pipelines
        pass them): none, the scheduler's fixed shift. A resolution-dependent shift needs the family's own μ."""
        if self.scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(f"{type(self).__name__}: its scheduler shifts by resolution (use_dynamic_shifting), "
                             "which needs the family's mu: define flow_schedule(num_steps, latent_shape) as "
                             "fnf/flux.py does")
        return {}

    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) RGB in [0, 1] (what reward heads see)."""
        if self.vae is not None:
            shift = self.vae.config.get("shift_factor") or 0.0  # SD3 / FLUX VAEs centre their latents
            latents = self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample
        return (latents / 2 + 0.5).clamp(0, 1)


def ddim_scheduler(scheduler: DDIMScheduler, path: str, **expected) -> DDIMScheduler:
    """A UNet family's scheduler as DDIM (loaded from whatever scheduler the folder has): refused when the folder's
    has no DDPM noise schedule (EDM, flow matching: its sigmas would be silently replaced by DDIM's default betas).
    A config saved without the ``expected`` settings (an old or a non-DDIM one: Euler, DPM-Solver) takes DDIM's
    defaults, e.g. ``clip_sample: true``, which clips the predicted latents to [-1, 1]: wrong for latent models.
    StableDiffusionPipeline corrects them on load; so does fnf, and says so."""
    defaulted = scheduler.config.get("_use_default_values") or []
    if "beta_schedule" in defaulted and "trained_betas" in defaulted:
        raise ValueError(f"model.pretrained: {path}/scheduler has no DDPM noise schedule (beta_schedule; an EDM or "
                         "flow-matching scheduler?); fnf samples UNet models with DDIM, which needs one")
    wrong = {key: value for key, value in expected.items() if scheduler.config.get(key) != value}
    if not wrong:
        return scheduler
    changes = ", ".join(f"{key} {scheduler.config.get(key)} -> {value}" for key, value in wrong.items())
    rank_zero_info(f"fnf: {path}: scheduler config without the latent model's settings; {changes} (as "
                   "StableDiffusionPipeline loads it)")
    kept = {key: value for key, value in scheduler.config.items() if key != "_use_default_values"}  # else re-defaulted
    return DDIMScheduler.from_config(kept | wrong)


BACKBONES = "fnf.backbones"
"""Entry point group of other model families: a diffusers pipeline class name (``_class_name`` in a folder's
model_index.json) -> the Text2ImageModel subclass whose ``load(path, index)`` loads such folders."""
BUILT_IN_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def remember_processor_signatures(denoiser: nn.Module) -> None:
    """diffusers' attention modules read their processor's call signature with ``inspect.signature`` on every call
    (~20 µs; SD1.5 makes ~2 000 attention calls a training step): kept as the function's ``__signature__``, the
    same signature comes back at once."""
    for module in denoiser.modules():
        call = getattr(type(getattr(module, "processor", None)), "__call__", None)
        if inspect.isfunction(call) and "__signature__" not in vars(call):
            call.__signature__ = inspect.signature(call)


def _short_name(module: str) -> str:
    """A module's name as LoRA targets name it: its last part, or the last two for a list item (``to_out.0``)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def family_of(index: dict, pretrained: str) -> type[Text2ImageModel]:
    """The Text2ImageModel subclass that loads a folder with this model_index.json."""
    family = plugin_family(index, pretrained)
    if family is not None:
        return family
    pipeline = index.get("_class_name")
    if pipeline and pipeline not in BUILT_IN_PIPELINES:  # e.g. a plugin's folder, its plugin not installed here
        rank_zero_warn(f"fnf: {pretrained} is a {pipeline} folder and no installed {BACKBONES} entry point names "
                       f"{pipeline}: loaded by its layout, as one of {', '.join(BUILT_IN_PIPELINES)}; install its "
                       "plugin if it has one (docs/plugins.md)")
    if "transformer" in index:  # rectified-flow transformers: their conditioning lives in their own files
        from fnf.flux import FluxModel
        from fnf.sd3 import SD3Model

        families = {"SD3Transformer2DModel": SD3Model, "FluxTransformer2DModel": FluxModel}
        kind = (index["transformer"] or [None, None])[-1]
        if kind not in families:
            raise ValueError(f"model.pretrained: {pretrained}: transformer {kind!r} is not supported; "
                             f"supported: {sorted(families)}")
        return families[kind]
    if "text_encoder_2" in index:
        from fnf.sdxl import SDXLModel  # SDXL's extra conditioning lives in its own file

        return SDXLModel
    return Text2ImageModel


def plugin_family(index: dict, pretrained: str) -> type[Text2ImageModel] | None:
    """The family an installed ``fnf.backbones`` entry point gives the folder's pipeline class, if any. Imported only
    when such a folder is loaded, so a broken plugin stops only the runs that need it."""
    from importlib.metadata import entry_points

    pipeline = index.get("_class_name")
    point = next((p for p in entry_points(group=BACKBONES) if p.name == pipeline), None) if pipeline else None
    if point is None:
        return None
    where = f"{BACKBONES} entry point {point.name} = {point.value} ({point.dist.name if point.dist else 'unknown'})"
    if pipeline in BUILT_IN_PIPELINES:
        raise ValueError(f"model.pretrained: {pretrained}: {where}: fnf loads {pipeline} folders itself; a plugin "
                         "family needs a pipeline class of its own")
    try:
        family = point.load()
    except Exception as error:
        raise ValueError(f"model.pretrained: {pretrained} is a {pipeline} folder, but its {where} cannot be imported "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not (isinstance(family, type) and issubclass(family, Text2ImageModel)):
        raise ValueError(f"model.pretrained: {where}: expected a Text2ImageModel subclass, got {family!r}")
    return family


def token_ids(tokenizer, prompts: list[str], max_length: int | None = None) -> Tensor:
    """Padded token ids (B, max_length); prompts over the limit (default: the tokenizer's) are truncated with a
    warning."""
    max_length = max_length or tokenizer.model_max_length
    for prompt, ids in zip(prompts, tokenizer(prompts).input_ids):
        if len(ids) > max_length:
            warnings.warn(f"prompt truncated to {max_length} tokens: {prompt[:60]!r}...", stacklevel=3)
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids
