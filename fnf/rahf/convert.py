"""``fnf rahf-convert CHECKPOINT.pt OUT.safetensors``: the public RAHF reproduction's checkpoint in fnf's format.

The reproduction (github.com/youweiliang/RichHF; weights CC BY-NC 4.0) saves ``torch.save(model.state_dict())``,
a pickle. Reading it is fnf's one opt-in pickle load, done once here with ``torch.load(weights_only=True)``
(tensors and plain containers only; no code runs); the reward (``RAHFReproductionHeatmap``) then reads the
``.safetensors`` written here. Sizes come from the tensor shapes, except the ViT's attention head count, which no
shape holds: 64-wide heads are assumed, as in google's ViT-B/16 and ViT-L/16 (``--vit-heads`` otherwise). The
ViT's tensor names, written by transformers 4.x, are renamed to the installed layout by transformers' own
checkpoint conversion; the T5 decoder (keyword generation) and the ViT pooler are unused and dropped.
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from fnf.errors import OneLineParser
from fnf.rewards.rahf import check_state
from fnf.rewards.rahf_reproduction import RAHFReproduction, ReproductionConfig, save_reproduction

UNUSED = re.compile(r"^(vit\.pooler\.|t5\.decoder\.|t5\.lm_head\.)")


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or pickled objects beyond tensors and plain types
        if isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path):  # a torch file, refused
            raise ValueError(f"{path}: holds objects other than tensors and plain types; fnf reads tensors only "
                             "(weights_only=True), never arbitrary pickles") from None
        raise ValueError(f"{path}: cannot read it as a torch checkpoint: truncated or not one "
                         f"({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), as the reproduction's torch.save writes")
    return state


def infer_config(state: dict[str, Tensor], vit_heads: int | None = None) -> ReproductionConfig:
    """The sizes a state dict was trained with, read off its shapes (see the module docstring for the one guess)."""
    def shape(key: str) -> torch.Size:
        if key not in state:
            raise ValueError(f"no tensor {key}: not a multi-head RAHF reproduction checkpoint")
        return state[key].shape

    def count(pattern: str) -> int:
        return len({match.group(1) for key in state if (match := re.match(pattern, key))})

    if "heatmap_predictor.conv_layers.0.weight" in state:
        raise ValueError("a single-head RAHF checkpoint (trained without --multi_heads); only multi-head ones load")
    width, _, patch, _ = shape("vit.embeddings.patch_embeddings.projection.weight")
    if vit_heads is not None and (vit_heads < 1 or width % vit_heads):
        raise ValueError(f"--vit-heads {vit_heads} does not divide the ViT width {width}")
    grid = round((shape("vit.embeddings.position_embeddings")[1] - 1) ** 0.5)
    layer = "vit.encoder.layer.0." if "vit.encoder.layer.0.intermediate.dense.weight" in state else "vit.layers.0."
    fc1 = "intermediate.dense" if layer.startswith("vit.encoder") else "mlp.fc1"
    vit = dict(hidden_size=width, num_hidden_layers=count(r"^vit\.(?:encoder\.layer|layers)\.(\d+)\."),
               num_attention_heads=vit_heads or width // 64, intermediate_size=shape(f"{layer}{fc1}.weight")[0],
               image_size=grid * patch, patch_size=patch)
    vocab, d_model = shape("t5.shared.weight")
    attention = "t5.encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shape(f"{attention}relative_attention_bias.weight")
    gated = "t5.encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    t5 = dict(vocab_size=vocab, d_model=d_model, d_kv=shape(f"{attention}q.weight")[0] // heads, num_heads=heads,
              d_ff=shape(f"t5.encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0],
              num_layers=count(r"^t5\.encoder\.block\.(\d+)\."), relative_attention_num_buckets=buckets,
              feed_forward_proj="gated-gelu" if gated else "relu")
    heatmaps = tuple(sorted({key.split(".")[1] for key in state if key.startswith("heatmap_predictor.")}))
    scores = tuple(sorted({key.split(".")[1] for key in state if key.startswith("score_predictor.")}))
    head = f"heatmap_predictor.{heatmaps[0]}." if heatmaps else "heatmap_predictor.<name>."
    n_ups = count(rf"^{re.escape(head)}deconv_layers\.(\d+)\.")
    ups = tuple(shape(f"{head}deconv_layers.{i}.0.weight")[1] for i in range(n_ups))
    return ReproductionConfig(vit=vit, t5=t5, heatmap_stem=(shape(f"{head}conv_layers.0.weight")[0],
                                                            shape(f"{head}conv_layers.3.weight")[0]),
                              heatmap_ups=ups, heatmap_last=shape(f"{head}last_conv1.weight")[0],
                              heatmaps=heatmaps, scores=scores)


def convert(source: str | Path, target: str | Path, vit_heads: int | None = None) -> RAHFReproduction:
    """Read the reproduction's ``.pt``, check every tensor lands in the model, write ``target`` atomically."""
    from transformers import T5EncoderModel, ViTModel

    source = Path(source)
    state = {key: value for key, value in read_checkpoint(source).items() if not UNUSED.match(key)}
    try:
        config = infer_config(state, vit_heads)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    with torch.device("meta"):  # sizes only: the weights come from the checkpoint
        model = RAHFReproduction(config)
    converted = {key: value for key, value in state.items() if not key.startswith(("vit.", "t5."))}
    for prefix, part, kind, extra in (("vit.", model.vit, ViTModel, {"add_pooling_layer": False}),
                                      ("t5.", model.t5, T5EncoderModel, {})):
        own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        loaded, info = kind.from_pretrained(None, config=part.config, state_dict=own, output_loading_info=True,
                                            **extra)  # transformers renames older layouts to the installed one
        problems = {name: sorted(info[name]) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
                    if info.get(name)}
        if problems:
            raise ValueError(f"{source}: the {prefix[:-1]} tensors do not fit the sizes read off the checkpoint "
                             f"({problems}); is --vit-heads right?")
        converted |= {prefix + key: value for key, value in loaded.state_dict().items()}
    check_state(model, converted, str(source))
    model.load_state_dict(converted, assign=True)
    save_reproduction(model, target)
    return model


def main(args: list[str] | None = None) -> None:
    parser = OneLineParser(prog="fnf rahf-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the reproduction's model.pt (a torch.save'd state dict)")
    parser.add_argument("output", help="the .safetensors file to write (for RAHFReproductionHeatmap.weights)")
    parser.add_argument("--vit-heads", type=int, default=None, help="ViT attention heads (default: hidden size / 64)")
    options = parser.parse_args(args)
    if not options.output.endswith(".safetensors"):
        parser.error(f"output {options.output}: must end with .safetensors")
    try:
        model = convert(options.checkpoint, options.output, options.vit_heads)
    except (ValueError, OSError) as error:
        sys.exit(f"fnf rahf-convert: error: {error}")
    config = model.config
    print(f"wrote {options.output}: ViT {config.vit['hidden_size']}x{config.vit['num_hidden_layers']} at "
          f"{config.vit['image_size']} px, T5 {config.t5['d_model']}x{config.t5['num_layers']}, heatmaps "
          f"{', '.join(config.heatmaps)}, scores {', '.join(config.scores)}")


if __name__ == "__main__":
    main()
