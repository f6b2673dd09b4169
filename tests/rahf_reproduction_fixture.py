"""Reference outputs of the public RAHF reproduction (github.com/youweiliang/RichHF) for tests/test_rahf_reproduction.py.

The fixture (tests/fixtures/rahf_reproduction_tiny.safetensors) holds, for a tiny ViT + T5 with the
reproduction's full-width heads: the checkpoint's tensor names and shapes in the order its ``state_dict()``
lists them (metadata ``manifest``), two input images in [-1, 1], prompt token ids, and the reproduction's
heatmaps and scores for them. The weights are not stored (the heads alone are 200 MB): ``synthetic_weights``
regenerates them from the manifest with a seeded generator, here and in the test.

Made once by running the reproduction's own ``model.py`` (not shipped: PolyForm Noncommercial) under the
transformers version it was written for; nothing of that code is in this repository::

    python -m venv /tmp/venv432 && /tmp/venv432/bin/pip install torch==2.14.1 transformers==4.32.0 \\
        tokenizers==0.13.3 "huggingface_hub<0.20" "numpy<2" torchvision==0.29.1 pillow
    /tmp/venv432/bin/python tests/rahf_reproduction_fixture.py /path/to/RichHF \\
        tests/fixtures/rahf_reproduction_tiny.safetensors
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

VIT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=64,
           patch_size=16)  # 64-wide heads, like google's ViTs (the converter's default guess)
T5 = dict(vocab_size=120, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=1, num_heads=4,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # t5-base's special ids
TIED = ("t5.encoder.embed_tokens.weight", "t5.decoder.embed_tokens.weight", "t5.lm_head.weight")  # = t5.shared
TOKEN_IDS = [[5, 17, 42, 99, 8, 1], [7, 7, 61, 3, 110, 1]]  # two prompts of equal length (1 = T5's </s>)


def synthetic_weights(manifest: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Seeded weights for every manifest entry: norms near 1, everything else N(0, 0.02²); tied T5 embeddings equal."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in manifest:
        noise = torch.randn(shape, generator=generator)
        state[key] = 1 + 0.1 * noise if key.endswith(("norm.weight", "scale", "layer_norm.weight")) else 0.02 * noise
    for key in TIED:
        if key in state:
            state[key] = state["t5.shared.weight"]
    return state


def synthetic_images() -> torch.Tensor:
    """Two 64² images in [-1, 1], the reproduction's pixel range (google ViT processor: mean = std = 0.5)."""
    return torch.rand(2, 3, VIT["image_size"], VIT["image_size"], generator=torch.Generator().manual_seed(1)) * 2 - 1


def main(richhf: str, out: str) -> None:
    from safetensors.torch import save_file
    from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

    sys.path.insert(0, richhf)
    import model as reproduction  # the reproduction's model.py

    class FixedTokens:  # the reproduction's tokenizer, minus the t5-base vocabulary (not available offline)
        @classmethod
        def from_pretrained(cls, _):
            return cls()

        def __call__(self, texts, **_):
            ids = torch.tensor(TOKEN_IDS[: len(texts)])
            return type("Encoding", (), {"input_ids": ids, "to": lambda self, device: self})()

        def batch_decode(self, ids, **_):
            return [" ".join(map(str, row.tolist())) for row in ids]

    reproduction.T5Tokenizer = FixedTokens
    with tempfile.TemporaryDirectory() as folder:
        ViTModel(ViTConfig(**VIT)).save_pretrained(f"{folder}/vit")
        T5ForConditionalGeneration(T5Config(**T5)).save_pretrained(f"{folder}/t5")
        model = reproduction.RAHF(vit_model=f"{folder}/vit", t5_model=f"{folder}/t5", patch_size=VIT["patch_size"],
                                  image_size=VIT["image_size"]).eval()
    manifest = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    weights = synthetic_weights(manifest)
    model.load_state_dict(weights)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items()), "untied weights"
    images = synthetic_images()
    with torch.no_grad():
        output = model(images, ["caption"] * len(images), max_new_tokens=2)
    tensors = {"input.images": images, "input.token_ids": torch.tensor(TOKEN_IDS)}
    tensors |= {f"heatmap.{name}": value.contiguous() for name, value in output["heatmaps"].items()}
    tensors |= {f"score.{name}": value.contiguous() for name, value in output["scores"].items()}
    import transformers

    made_with = f"transformers {transformers.__version__}, torch {torch.__version__}"
    save_file(tensors, out, metadata={"manifest": json.dumps(manifest), "vit": json.dumps(VIT), "t5": json.dumps(T5),
                                      "made_with": made_with})
    print(f"wrote {out}: {len(manifest)} checkpoint tensors; " +
          ", ".join(f"{key} {tuple(value.shape)}" for key, value in tensors.items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
