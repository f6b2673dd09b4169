"""The public RAHF reproduction's checkpoint: converted by ``fnf rahf-convert``, run by ``RAHFReproductionHeatmap``.

Parity is against outputs of the reproduction's own code (transformers 4.32, its checkpoint naming), stored in
tests/fixtures/rahf_reproduction_tiny.safetensors by tests/rahf_reproduction_fixture.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fnf.cli import main
from fnf.rahf.convert import infer_config
from fnf.rewards.rahf_reproduction import RAHFReproductionHeatmap, load_reproduction
from rahf_reproduction_fixture import T5, VIT, synthetic_weights

FIXTURE = Path(__file__).parent / "fixtures" / "rahf_reproduction_tiny.safetensors"


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(FIXTURE), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, json.loads(file.metadata()["manifest"])


def convert(args: list[str]) -> None:
    main(["rahf-convert", *args])


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> Path:
    """The reproduction's checkpoint format: ``torch.save(model.state_dict())`` with its tensor names (ViT: 4.x)."""
    path = tmp_path_factory.mktemp("reproduction") / "model.pt"
    torch.save(synthetic_weights(reference[1]), path)
    return path


def test_sizes_are_read_off_the_checkpoint_shapes(reference):
    state = {key: torch.empty(shape, device="meta") for key, shape in reference[1]}
    config = infer_config(state)
    assert {key: config.vit[key] for key in VIT} == VIT
    assert {key: config.t5[key] for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")} == \
        {key: T5[key] for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")}
    assert config.heatmap_stem == (768, 384) and config.heatmap_ups == (768, 384, 384, 192)  # the reproduction's
    assert config.heatmaps == ("implausibility", "misalignment") and len(config.scores) == 4


def test_converted_checkpoint_gives_the_reproductions_heatmaps_and_scores(reference, checkpoint, tmp_path, capsys):
    tensors, _ = reference
    convert([str(checkpoint), str(tmp_path / "rahf.safetensors")])
    assert "ViT 128x2 at 64 px" in capsys.readouterr().out
    model = load_reproduction(tmp_path / "rahf.safetensors").eval()
    images = (tensors["input.images"] + 1) / 2  # the reproduction takes [-1, 1]; fnf rewards get [0, 1]
    with torch.no_grad():
        output = model(images, tensors["input.token_ids"])
    for name, heatmap in output.heatmaps.items():
        assert heatmap.shape == (2, 1, 64, 64)
        torch.testing.assert_close(heatmap.squeeze(1), tensors[f"heatmap.{name}"], atol=1e-5, rtol=0)
    for name, score in output.scores.items():  # the two images' scores differ by ~1e-4..1e-3
        torch.testing.assert_close(score, tensors[f"score.{name}"], atol=1e-6, rtol=0)
        assert (tensors[f"score.{name}"][0] - tensors[f"score.{name}"][1]).abs() > 1e-5


def test_padding_is_masked_so_each_prompt_scores_as_if_alone(tiny_rahf_reproduction):
    head = RAHFReproductionHeatmap(*tiny_rahf_reproduction, heatmap="misalignment", score="alignment")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle top left", "sky"]  # 6 and 2 tokens: the second is padded in the batch
    batch = head(images, prompts)
    for i in range(2):
        alone = head(images[i:i + 1], prompts[i:i + 1])
        torch.testing.assert_close(batch.score[i:i + 1], alone.score, atol=1e-6, rtol=0)
        torch.testing.assert_close(batch.heatmap[i:i + 1], alone.heatmap, atol=1e-6, rtol=0)
    assert not torch.allclose(head(images, prompts[::-1]).score, batch.score, atol=1e-6)  # the prompt matters


def test_bad_checkpoints_fail_with_one_line_naming_the_file(checkpoint, tmp_path):
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(SystemExit, match="missing.pt: file not found"):
        convert([str(tmp_path / "missing.pt"), out])
    pickled = tmp_path / "objects.pt"
    torch.save({"vit.x": torch.zeros(1), "hook": Path("x")}, pickled)  # a non-tensor object: refused unpickled
    with pytest.raises(SystemExit, match="objects.pt: holds objects other than tensors and plain types"):
        convert([str(pickled), out])
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a"}\n')  # a data file given by mistake: no pickle advice
    with pytest.raises(SystemExit, match=r"rows.jsonl: cannot read it as a torch checkpoint: truncated or not one "
                                         r"\(UnpicklingError\)$"):
        convert([str(tmp_path / "rows.jsonl"), out])
    single = tmp_path / "single.pt"
    torch.save({"heatmap_predictor.conv_layers.0.weight": torch.zeros(1)}, single)
    with pytest.raises(SystemExit, match="single-head RAHF checkpoint"):
        convert([str(single), out])
    with pytest.raises(SystemExit, match="--vit-heads 3 does not divide the ViT width 128"):
        convert([str(checkpoint), out, "--vit-heads", "3"])
    assert not Path(out).exists()  # nothing half-written
    with pytest.raises(SystemExit):  # argparse: the output must be .safetensors
        convert([str(checkpoint), str(tmp_path / "out.pt")])


def test_the_reward_reads_only_converted_safetensors(tiny_rahf_reproduction, checkpoint, tmp_path):
    weights, tokenizer = tiny_rahf_reproduction
    with pytest.raises(ValueError, match="model.pt: .pt is a pickle format"):
        RAHFReproductionHeatmap(str(checkpoint), tokenizer)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(ValueError, match="no fnf.rahf_reproduction.config metadata; convert the checkpoint"):
        RAHFReproductionHeatmap(str(bare), tokenizer)
    with pytest.raises(ValueError, match="tokenizer: cannot load a tokenizer from .*t5-base's tokenizer files"):
        RAHFReproductionHeatmap(weights, str(tmp_path / "no-tokenizer"))
    with pytest.raises(ValueError, match=r"heatmap: 'artifact' is not one of"):
        RAHFReproductionHeatmap(weights, tokenizer, heatmap="artifact")
    from fnf.rewards.rahf import RAHFHeatmap

    with pytest.raises(ValueError, match="written by fnf rahf-convert .*; use the RAHFReproductionHeatmap head"):
        RAHFHeatmap(weights)  # the other RAHF head
