"""``fnf export --ckpt_path RUN/checkpoints/last.ckpt --format diffusers|kohya|fused --out DIR``: a run's LoRA in
the form other tools load.

- diffusers: ``pytorch_lora_weights.safetensors``, as fit's LoraExporter writes it (``load_lora_weights``).
- kohya: ``lora_kohya.safetensors`` with kohya-ss key names (``lora_unet_<module>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``) as diffusers' ``convert_state_dict_to_kohya`` spells them: what ComfyUI and
  AUTOMATIC1111 load. UNet families only: diffusers has no kohya reader for SD3, and its FLUX one assumes FLUX.1's
  own widths, so no round trip could check such a file. Every module must come back through diffusers' kohya
  reader (checked before writing), else the export is refused naming the modules.
- fused: a whole diffusers model folder with the LoRA merged into the denoiser (``DiffusionPipeline.from_pretrained``),
  written as diffusers documents it: ``load_lora_weights``, ``fuse_lora``, ``unload_lora_weights``, ``save_pretrained``.

The base model and LoRA settings are the checkpoint's; a config (``--config``, default: the run's config.yaml beside
its checkpoints/ folder) may point ``model.pretrained`` elsewhere, and its ``model.lora`` must equal the checkpoint's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import yaml
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from fnf.checkpoint_io import AtomicCheckpointIO
from fnf.errors import OneLineParser, check_config_files
from fnf.export import WEIGHT_NAME, lora_state_dict, write_lora
from fnf.output_folder import atomic_folder, check_output_folder
from fnf.model_files import only_variant, resolve_model_path
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.recipe import check_settings
from fnf.resume import check_lora_state

FORMATS = ("diffusers", "kohya", "fused")
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
MARKER = "fnf_export.json"
"""Written into every export: what it was made from; a non-empty ``--out`` without it is never replaced."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_config(ckpt_path: Path) -> Path | None:
    """The config.yaml LightningCLI saved in the run folder (``<log dir>/checkpoints/last.ckpt``), if any."""
    found = ckpt_path.parent.parent / "config.yaml"
    return found if found.is_file() else None


def model_settings(ckpt_path: Path, checkpoint: dict, config: Path | None) -> dict:
    """``pretrained`` and ``lora`` of the run: the checkpoint's, with the config's ``model.pretrained``."""
    saved = checkpoint.get("hyper_parameters") or {}
    if not isinstance(saved.get("lora"), dict) or "pretrained" not in saved:
        raise ValueError(f"--ckpt_path {ckpt_path}: no model settings (hyper_parameters pretrained, lora) in it; "
                         "expected a checkpoint written by fnf fit")
    settings = {"pretrained": saved["pretrained"], "lora": saved["lora"]}
    if config is None:
        return settings
    check_config_files(["--config", str(config)])  # missing / not YAML: one line naming the file
    model = yaml.safe_load(config.read_text(encoding="utf-8")).get("model") or {}
    if not isinstance(model, dict):
        raise ValueError(f"--config {config}: model: expected a mapping of model settings")
    ours = {key: model[key] for key in ("pretrained", "lora") if key in model}
    for changed in check_settings({"model": ours}, {"model": saved}, str(ckpt_path), resuming=False):  # LoRA: raise
        print(f"fnf export: {changed}, from {config}")
    return {**settings, **({"pretrained": ours["pretrained"]} if "pretrained" in ours else {})}


def load_trained_model(ckpt_path: Path, config: Path | None) -> tuple[Text2ImageModel, dict, dict]:
    """The base model with the checkpoint's LoRA on its denoiser: (model, settings, checkpoint)."""
    checkpoint = AtomicCheckpointIO().load_checkpoint(ckpt_path)  # missing / corrupt / not Lightning: one line
    settings = model_settings(ckpt_path, checkpoint, config)
    model = Text2ImageModel.from_pretrained(settings["pretrained"])
    model.add_lora(LoraArgs(**settings["lora"]))
    weights = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()
               if key.startswith("model.") and "lora_" in key}
    try:
        check_lora_state({name: p.shape for name, p in model.named_parameters() if "lora_" in name}, weights)
    except ValueError as error:  # another base model (its LoRA names or widths differ) or another LoRA setting
        raise ValueError(f"--ckpt_path {ckpt_path}: its LoRA does not fit the model {settings['pretrained']}: "
                         f"{str(error).split(': ', 1)[-1]}") from None
    model.load_state_dict(weights, strict=False)  # the LoRA; the frozen weights are the base model's
    return model, settings, checkpoint


def kohya_lora(model: Text2ImageModel) -> dict[str, torch.Tensor]:
    """The UNet's LoRA with kohya-ss keys; each ``.alpha`` is the module's own (diffusers' converter writes the rank,
    which would rescale any LoRA whose alpha is not its rank)."""
    if model.denoiser_name != "unet":
        raise ValueError(f"--format kohya: {type(model).__name__} LoRAs export as diffusers or fused only (kohya "
                         "files are checked for SD1.x/2.x and SDXL UNets; ComfyUI loads the diffusers file of SD3 "
                         "and FLUX)")
    layers = get_peft_model_state_dict(model.denoiser, state_dict=lora_state_dict(model))
    kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in layers.items()})
    for name, module in model.denoiser.named_modules():
        if isinstance(module, LoraLayer):
            alpha = module.scaling["default"] * module.r["default"]  # scale = alpha / rank, as kohya reads it
            kohya[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    _check_kohya_reads_back(model, kohya, layers)
    return {key: value.contiguous() for key, value in kohya.items()}


def _check_kohya_reads_back(model: Text2ImageModel, kohya: dict, layers: dict) -> None:
    """Refuse modules that diffusers' kohya reader maps to other names (kohya keys flatten '.' and '_')."""
    try:
        read, _ = model.lora_pipeline.lora_state_dict(dict(kohya))
        back = convert_unet_state_dict_to_peft({key.removeprefix("unet."): v for key, v in read.items()})
    except Exception as error:  # diffusers refuses keys it cannot rename
        raise ValueError(f"--format kohya: diffusers cannot read the kohya file back: {error}") from None
    lost = sorted({key.rsplit(".lora_", 1)[0] for key in set(layers) - set(back)})
    if lost:
        raise ValueError(f"--format kohya: kohya names cannot express LoRA modules {', '.join(lost)} (diffusers "
                         "reads them back as other modules); use --format diffusers or fused")


def save_fused(pipeline_class, denoiser: str, pretrained: str, lora: Path, staging: Path, dtype: torch.dtype) -> None:
    """The base pipeline with the diffusers LoRA in ``lora`` merged into its denoiser, saved into ``staging``."""
    path = resolve_model_path(pretrained)
    absent = {name: None for name, value in pipeline_class.load_config(path).items()
              if isinstance(value, list) and value[0] is None}  # e.g. SD3 without T5: diffusers wants them named
    pipe = pipeline_class.from_pretrained(path, dtype=dtype, use_safetensors=True, variant=only_variant(path), **absent)
    pipe.load_lora_weights(lora, weight_name=WEIGHT_NAME)
    pipe.fuse_lora(components=[denoiser])  # unet / transformer
    pipe.unload_lora_weights()  # the adapter layers go; the merged weights stay
    pipe.save_pretrained(staging, safe_serialization=True)


def export(ckpt_path: Path, kind: str, out: Path, config: Path | None = None, dtype: str = "float32") -> Path:
    """Write the checkpoint's LoRA to ``out`` in format ``kind`` (atomically); returns the file or folder to load."""
    check_output_folder(out, "--out", "fnf export", MARKER)
    model, settings, checkpoint = load_trained_model(ckpt_path, config)
    kohya = kohya_lora(model) if kind == "kohya" else None  # refusals before anything is written
    provenance = {"format": kind, "ckpt_path": str(ckpt_path), "global_step": checkpoint.get("global_step"),
                  **settings, **({"dtype": dtype} if kind == "fused" else {})}
    probe = {"diffusers": WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME, "fused": "model_index.json"}[kind]
    with atomic_folder(out, probe) as staging:
        if kind == "diffusers":
            write_lora(model, staging)
        elif kind == "kohya":
            save_file(kohya, staging / KOHYA_WEIGHT_NAME)
        else:
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.lora.", dir=out.parent) as lora:
                write_lora(model, Path(lora))
                family, denoiser = model.lora_pipeline, model.denoiser_name
                del model  # one copy of the base model in memory: the pipeline's
                save_fused(family, denoiser, settings["pretrained"], Path(lora), staging, DTYPES[dtype])
        (staging / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    return out if kind == "fused" else out / probe


def main(argv: list[str]) -> None:
    parser = OneLineParser(prog="fnf export", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--ckpt_path", type=Path, required=True, help="a checkpoint of fnf fit (e.g. last.ckpt)")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="diffusers: load_lora_weights; kohya: ComfyUI / A1111 (SD1.x/2.x, SDXL); fused: "
                             "a whole model folder for DiffusionPipeline.from_pretrained")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/export-<format>)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a config whose model.pretrained to use (default: the run's config.yaml, if any)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="fused: the weights' dtype (float32)")
    args = parser.parse_args(argv)
    if args.dtype is not None and args.format != "fused":  # the LoRA files keep the trained float32 weights
        raise ValueError(f"--dtype applies to --format fused only; --format {args.format} writes float32 LoRA weights")
    if str(args.ckpt_path) in ("last", "auto") and not args.ckpt_path.exists():
        raise ValueError(f"--ckpt_path {args.ckpt_path}: fnf export takes a checkpoint's path (last and auto are fit's "
                         "and evaluation's, which search trainer.default_root_dir), e.g. "
                         "runs/artifacts/lightning_logs/version_0/checkpoints/last.ckpt")
    out = args.out or args.ckpt_path.parent.parent / f"export-{args.format}"
    config = args.config or run_config(args.ckpt_path)
    print(export(args.ckpt_path, args.format, out, config, args.dtype or "float32"))
