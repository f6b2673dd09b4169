"""A diffusers model folder, hub id or ``embedded:<name>`` -> its model_index.json and its parts, loaded from
safetensors only; every failure is one line naming ``model.pretrained`` and the part."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
import transformers
from diffusers import ModelMixin
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoTokenizer

EMBEDDED_MODELS = Path(__file__).parent / "worlds" / "shapes" / "weights"
"""Folder of the models the repository ships; ``embedded:<name>`` resolves to a folder in it."""


def resolve_model_path(pretrained: str | os.PathLike) -> str:
    """``embedded:<name>`` -> the shipped folder; anything else is a local folder (``~`` expanded, as a shell would
    on the command line but not in a YAML file) or a hub id."""
    pretrained = os.path.expanduser(str(pretrained))
    if pretrained.startswith("embedded:"):
        folder = EMBEDDED_MODELS / pretrained.removeprefix("embedded:")
        if not folder.is_dir():
            known = sorted(p.name for p in EMBEDDED_MODELS.iterdir()) if EMBEDDED_MODELS.is_dir() else []
            raise FileNotFoundError(f"model.pretrained: no embedded model {pretrained!r}; shipped: {known}")
        return str(folder)
    if Path(pretrained).is_file():  # a single-file checkpoint (.safetensors / .ckpt), not a hub id to look up
        raise ValueError(f"model.pretrained: {pretrained} is a file; expected a diffusers model folder "
                         "(model_index.json and one folder per component), an embedded:<name> or a hub id")
    return pretrained


def variants_and_plain(files: list[Path]) -> tuple[set[str], list[Path]]:
    """The variants (``*.fp16.safetensors``, sharded ``*.fp16-00001-of-00002.safetensors``: fp16) and the plain
    weight files among ``files``."""
    variants = {file.name.split(".")[-2].split("-")[0] for file in files if file.name.count(".") > 1}
    return variants, [file for file in files if file.name.count(".") == 1]


def only_variant(path: str) -> str | None:
    """The variant a local model folder holds all its weights in (a download with ``variant="fp16"``), else None."""
    if not Path(path).is_dir():
        return None
    variants, plain = variants_and_plain(sorted(Path(path).glob("*/*.safetensors")))
    return next(iter(variants)) if len(variants) == 1 and not plain else None


def load_part(path: str, part: str, kind, weights: bool = True):
    """One component folder of a diffusers model (safetensors only); failures become one line naming the part.

    diffusers models load in the dtype their files hold (a hub id's part is downloaded first), not upcast to
    float32 first (FLUX.1's bf16 transformer would take 48 GB of host memory per process before ``model.compute``
    casts it back); a part whose only weights are one variant (``*.fp16.safetensors``: a download with
    ``variant="fp16"``) loads that variant, and says so."""
    options, variants, plain = {}, set(), []
    try:
        folder = _local_part(path, part, download=weights and issubclass(kind, ModelMixin))
        files = sorted(folder.glob("*.safetensors")) if weights and folder is not None else []
        variants, plain = variants_and_plain(files)
        if weights:
            options["use_safetensors"] = True
            if not plain and len(variants) == 1:
                options["variant"] = next(iter(variants))
                plain = files
                rank_zero_info(f"fnf: {folder}: only {options['variant']} variant weights there; loading those")
            if plain and issubclass(kind, ModelMixin):
                options["dtype"] = stored_dtype(plain[0])
        return kind.from_pretrained(path, subfolder=part, **options)
    except Exception as error:  # missing / pickle-only / corrupt files
        reason = " ".join(str(error).split())[:300] or type(error).__name__  # some messages end in a list
        rule = " (weights must be safetensors)" if weights else ""
        also = f"; variant weights there: {', '.join(sorted(variants))}" if variants and not plain else ""
        raise ValueError(f"model.pretrained: cannot load {part}/ from {path}{rule}: {reason}{also}") from None


def _local_part(path: str, part: str, download: bool = False) -> Path | None:
    """The folder holding a part's files: in the model folder, or for a hub id in the hub cache (None: not there).
    ``download``: a hub id's part not cached yet is downloaded first (its config and plain safetensors, what
    ``from_pretrained`` would fetch), so that a first run also loads it in the dtype its files hold."""
    if Path(path).is_dir():
        return Path(path) / part if (Path(path) / part).is_dir() else None
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cached = try_to_load_from_cache(path, f"{part}/config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    if not download or hub_offline():
        return None
    snapshot = snapshot_download(path, allow_patterns=[f"{part}/*.json", f"{part}/*.safetensors"],
                                 ignore_patterns=[f"{part}/*.*.safetensors"])  # variants (*.fp16.safetensors)
    return Path(snapshot) / part if (Path(snapshot) / part).is_dir() else None


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set: the hub cache only, never the network."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")


SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(file: Path) -> torch.dtype | None:
    """The floating dtype most tensors of a .safetensors file hold (its header only is read)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as weights:
        dtypes = [SAFETENSORS_FLOATS.get(weights.get_slice(key).get_dtype()) for key in weights.keys()]
    counts = Counter(dtype for dtype in dtypes if dtype is not None)
    return counts.most_common(1)[0][0] if counts else None


def load_tokenizer(path: str, part: str, index: dict):
    """The tokenizer class the folder's model_index.json names (AutoTokenizer looks for a ``config.json`` that no
    diffusers repository has in its tokenizer folders, so from the hub cache it fails)."""
    name = (index.get(part) or [None, None])[-1]
    kind = getattr(transformers, name, None) if name else None
    return load_part(path, part, kind or AutoTokenizer, weights=False)


def read_model_index(pretrained: str, path: str) -> dict:
    """A local folder's model_index.json, or a hub id's (from the hub cache first; the network only when
    ``HF_HUB_OFFLINE`` allows it)."""
    local = Path(path)
    if local.is_dir():
        index_file = local / "model_index.json"
        if not index_file.is_file():  # which family, and which parts exist, would be guesses
            raise FileNotFoundError(f"model.pretrained: {pretrained} has no model_index.json; expected a diffusers "
                                    "model folder (save_pretrained writes model_index.json and one folder per part)")
        return json.loads(index_file.read_text())
    if local.is_absolute() or pretrained.startswith((".", "~")) or pretrained.count("/") > 1:  # a path, not an id
        raise FileNotFoundError(f"model.pretrained: {pretrained}: no such folder")
    from huggingface_hub import hf_hub_download

    try:  # the local hub cache first; the network only when it is allowed
        return json.loads(Path(hf_hub_download(path, "model_index.json", local_files_only=True)).read_text())
    except Exception as error:
        if hub_offline():
            raise _not_found(pretrained, error) from None
    try:
        return json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())
    except Exception as error:  # unknown id, no network, no access
        raise _not_found(pretrained, error) from None


def _not_found(pretrained: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(f"model.pretrained: model {pretrained!r} not found locally; download it or pass a "
                             f"path ({type(error).__name__})")
