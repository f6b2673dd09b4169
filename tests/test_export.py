"""LoRA exports: a plain diffusers pipeline with ``load_lora_weights`` draws fnf's images; ``fnf export`` writes the
diffusers file, a kohya-ss file (diffusers' kohya loader draws the same images) and a fused model folder
(``from_pretrained`` draws the same images) for every family, with one-line errors and atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from fnf.cli import main
from fnf.export import WEIGHT_NAME, load_lora, save_lora
from fnf.export_formats import KOHYA_WEIGHT_NAME, MARKER
from fnf.model_files import resolve_model_path
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.sampling import DDIMSampler, SamplerArgs, initial_noise
from fnf.worlds.random_sd import build_random_flux, build_random_sd, build_random_sd3, build_random_sdxl


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize("world,targets", [("tiny", ATTENTION), ("tiny", ATTENTION + ["conv1", "conv2"]),
                                           ("shapes", ATTENTION + ["conv1", "conv2"])],
                         ids=["attention", "attention+resnet-conv", "shapes-world"])
def test_exported_lora_reproduces_fnf_images_in_plain_diffusers(tiny_model_dir, tmp_path, world, targets):
    """The shapes configs also put LoRA on the ResNet convolutions (configs/artifacts.yaml: conv1, conv2). The
    shapes world's first down block has no attention: its file starts with a conv key (all of it must load)."""
    pretrained = resolve_model_path("embedded:shapes-t2i") if world == "shapes" else tiny_model_dir
    side = 32 if world == "shapes" else 16
    torch.manual_seed(0)
    model = Text2ImageModel.from_pretrained(pretrained)
    model.add_lora(LoraArgs(rank=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" LoRA that visibly changes images
    prompts, seeds = ["a red circle top left", "a blue square"], torch.tensor([11, 12])
    noise = initial_noise(seeds, model.latent_shape(side), "cpu")
    args = SamplerArgs(num_steps=4, guidance_scale=3.0, resolution=side)
    with torch.no_grad():
        ours = DDIMSampler(model, args)(noise, model.encode_prompts(prompts), model.encode_prompts([""] * 2), "none").images
        with model.adapter_disabled():
            base = DDIMSampler(model, args)(noise, model.encode_prompts(prompts), model.encode_prompts([""] * 2), "none").images
    assert (ours - base).abs().max() > 1e-2

    directory = save_lora(model, tmp_path / "lora")
    state = load_file(directory / "pytorch_lora_weights.safetensors")
    assert state and all("lora" in key for key in state)

    pipe = StableDiffusionPipeline.from_pretrained(pretrained, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(directory)
    theirs = pipe(prompts, latents=noise, num_inference_steps=4, guidance_scale=3.0, eta=0.0, output_type="pt").images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_export_replaces_a_previous_export_atomically(tiny_model_dir, tmp_path):
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    model.add_lora(LoraArgs(rank=4))
    save_lora(model, tmp_path / "lora")
    save_lora(model, tmp_path / "lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no staging folders left behind


def test_a_channels_last_conv_lora_exports(tiny_model_dir, tmp_path):
    """configs/sd15 and sdxl train in channels_last; a ResNet-conv LoRA then has NHWC strides."""
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    model.add_lora(LoraArgs(rank=4, target_modules=["to_q", "conv1"]))
    model.unet.to(memory_format=torch.channels_last)
    conv = {k: v for k, v in model.unet.state_dict().items() if "conv1.lora_A" in k}
    assert conv and not any(v.is_contiguous() for v in conv.values())
    state = load_file(save_lora(model, tmp_path / "lora") / WEIGHT_NAME)
    assert all(torch.equal(state["unet." + k.replace(".default", "")], v) for k, v in conv.items())


def test_load_lora_reads_whole_files_of_earlier_fnf_versions(tmp_path):
    """Earlier exports named attention keys as diffusers does and conv keys as peft does; diffusers' loader (by the
    first key, here a conv one) dropped the attention LoRA. load_lora restores every layer and the same output."""
    model = Text2ImageModel.from_pretrained("embedded:shapes-t2i")
    model.add_lora(LoraArgs(rank=4, alpha=8, target_modules=ATTENTION + ["conv1", "conv2"]))
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.1 * torch.randn_like(p))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))  # the earlier naming
    assert any(".lora.down." in k for k in layers) and next(iter(sorted(layers))).endswith(".lora_A.weight")
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, weight_name=WEIGHT_NAME,
                                              unet_lora_adapter_metadata=model.unet.peft_config["default"].to_dict())
    loaded = Text2ImageModel.from_pretrained("embedded:shapes-t2i")
    load_lora(loaded, tmp_path)
    assert len(loaded.lora_parameters()) == len(model.lora_parameters())
    latents, t, text = torch.randn(1, 4, 16, 16), torch.tensor(500), model.encode_prompts(["a red circle"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(latents, t, text), model.predict(latents, t, text))


# ---- fnf export: diffusers | kohya | fused, per family ---------------------------------------------------------
# A "trained" run here is a checkpoint laid out as fnf fit writes it (LoRA weights under model.<denoiser>.*,
# hyper_parameters pretrained + lora; test_export_of_a_finished_fit checks that layout on a real fit) whose LoRA
# was moved off its zero init so that it visibly changes images.

KOHYA_TOLERANCE = 1e-5  # kohya file vs diffusers file through diffusers' loaders: the same weights, alpha as float
FUSED_TOLERANCE = 1e-3  # W + s·B·A in float32 vs W·x + s·B·(A·x): rounding only (3.4e-4 on the shapes world)
TRANSFORMER = ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FAMILIES = {  # name: (model builder or embedded name, LoRA targets, image side, guidance scale)
    "shapes": ("embedded:shapes-t2i", ATTENTION + ["conv1", "conv2"], 32, 3.0),  # configs/artifacts.yaml's targets
    "sd": (build_random_sd, ATTENTION + ["conv1", "conv2"], 16, 3.0),
    "sdxl": (build_random_sdxl, ATTENTION + ["conv1", "conv2"], 16, 3.0),
    "sd3": (build_random_sd3, TRANSFORMER, 16, 3.0),
    "flux": (build_random_flux, TRANSFORMER, 16, 3.5),
}
UNET_FAMILIES = ["shapes", "sd", "sdxl"]


def _write_checkpoint(pretrained: str, args: LoraArgs, run: Path, scale: float = 0.2) -> Path:
    """``run/checkpoints/last.ckpt`` as fnf fit writes it, for a LoRA moved by ``scale``·N(0, 1) from its init."""
    torch.manual_seed(1)
    model = Text2ImageModel.from_pretrained(pretrained)
    model.add_lora(args)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(scale * torch.randn_like(p))
    path = run / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{name}": p.detach().clone() for name, p in model.named_parameters()
                               if "lora_" in name},
                "hyper_parameters": {"pretrained": pretrained, "lora": asdict(args)}, "global_step": 7}, path)
    return path


def _export(ckpt: Path, kind: str, out: Path, *extra: str) -> None:
    main(["export", "--ckpt_path", str(ckpt), "--format", kind, "--out", str(out), *extra])


def _fail(capsys, *argv: str) -> str:
    """``fnf export`` must exit with one line naming the problem, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *argv])
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


def _pipeline(path: str) -> DiffusionPipeline:
    path = resolve_model_path(path)
    absent = {k: None for k, v in DiffusionPipeline.load_config(path).items() if isinstance(v, list) and v[0] is None}
    return DiffusionPipeline.from_pretrained(path, use_safetensors=True, **absent)


def _images(pipe: DiffusionPipeline, family: str) -> torch.Tensor:
    _, _, side, guidance = FAMILIES[family]
    extra = {"max_sequence_length": 16} if family in ("sd3", "flux") else {}  # the tiny T5 tokenizers' limit
    return pipe(["a red circle top left", "a blue square"], num_inference_steps=3, guidance_scale=guidance,
                height=side, width=side, output_type="pt", generator=torch.Generator().manual_seed(0), **extra).images


@pytest.fixture(scope="module")
def family_run(request, tmp_path_factory) -> dict:
    """One family's base model, checkpoint, and images: base, and with the diffusers export (via ``fnf export``)."""
    family = request.param
    build, targets, _, _ = FAMILIES[family]
    tmp = tmp_path_factory.mktemp(family)
    pretrained = build if isinstance(build, str) else str(build(tmp / "model"))
    ckpt = _write_checkpoint(pretrained, LoraArgs(rank=4, alpha=8, target_modules=targets), tmp / "run")
    _export(ckpt, "diffusers", tmp / "diffusers")
    pipe = _pipeline(pretrained)
    base = _images(pipe, family)
    pipe.load_lora_weights(tmp / "diffusers")
    tuned = _images(pipe, family)
    pipe.unload_lora_weights()
    assert (tuned - base).abs().max() > 0.05  # 50× FUSED_TOLERANCE: equal images below mean an equal LoRA
    return {"family": family, "tmp": tmp, "ckpt": ckpt, "pretrained": pretrained, "pipe": pipe, "tuned": tuned}


@pytest.mark.parametrize("family_run", list(FAMILIES), indirect=True)
def test_diffusers_export_is_the_lora_fit_writes(family_run):
    """``--format diffusers`` writes what LoraExporter writes at the end of fit (same keys, same tensors)."""
    family = family_run["family"]
    model = Text2ImageModel.from_pretrained(family_run["pretrained"])
    model.add_lora(LoraArgs(rank=4, alpha=8, target_modules=FAMILIES[family][1]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in
                           torch.load(family_run["ckpt"], weights_only=True)["state_dict"].items()}, strict=False)
    expected = load_file(save_lora(model, family_run["tmp"] / "expected") / WEIGHT_NAME)
    exported = load_file(family_run["tmp"] / "diffusers" / WEIGHT_NAME)
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
    marker = json.loads((family_run["tmp"] / "diffusers" / MARKER).read_text())
    assert marker["format"] == "diffusers" and marker["global_step"] == 7 and marker["lora"]["alpha"] == 8


@pytest.mark.parametrize("family_run", UNET_FAMILIES, indirect=True)
def test_kohya_export_draws_the_images_of_the_diffusers_lora(family_run):
    """One .safetensors with kohya-ss keys; diffusers' kohya loader gives the diffusers LoRA's images (alpha 8 at
    rank 4: a file with diffusers' default alpha = rank would draw other images)."""
    out = family_run["tmp"] / "kohya"
    _export(family_run["ckpt"], "kohya", out)
    state = load_file(out / KOHYA_WEIGHT_NAME)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in state)
    assert any("_resnets_" in k and k.endswith("_conv1.lora_down.weight") for k in state)  # the ResNet-conv LoRA
    pipe = family_run["pipe"]
    pipe.load_lora_weights(out / KOHYA_WEIGHT_NAME)
    try:
        images = _images(pipe, family_run["family"])
    finally:
        pipe.unload_lora_weights()
    torch.testing.assert_close(images, family_run["tuned"], rtol=0, atol=KOHYA_TOLERANCE)


@pytest.mark.parametrize("family_run", list(FAMILIES), indirect=True)
def test_fused_export_loads_with_from_pretrained_and_draws_the_lora_images(family_run):
    out = family_run["tmp"] / "fused"
    _export(family_run["ckpt"], "fused", out)
    fused = _pipeline(str(out))
    assert not any("lora" in name for name in fused.components[
        "unet" if family_run["family"] in UNET_FAMILIES else "transformer"].state_dict())
    torch.testing.assert_close(_images(fused, family_run["family"]), family_run["tuned"], rtol=0,
                               atol=FUSED_TOLERANCE)


@pytest.mark.parametrize("family_run", ["sd3", "flux"], indirect=True)
def test_kohya_export_of_a_transformer_lora_is_refused_naming_the_formats(family_run, capsys):
    out = family_run["tmp"] / "kohya-refused"
    message = _fail(capsys, "--ckpt_path", str(family_run["ckpt"]), "--format", "kohya", "--out", str(out))
    assert "--format kohya" in message and "diffusers or fused" in message, message
    assert not out.exists()


def test_kohya_refuses_modules_its_names_cannot_express(tmp_path, capsys):
    """SDXL's add_embedding.linear_1 comes back from diffusers' kohya reader as add.embedding.linear: refused."""
    pretrained = str(build_random_sdxl(tmp_path / "model"))
    ckpt = _write_checkpoint(pretrained, LoraArgs(rank=4, target_modules=["to_q", "linear_1"]), tmp_path / "run")
    message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "kohya", "--out", str(tmp_path / "out"))
    assert "add_embedding.linear_1" in message and "time_embedding" not in message, message
    assert not (tmp_path / "out").exists()


def test_export_of_a_finished_fit_needs_only_its_checkpoint(config, capsys):
    """A real fit's last.ckpt: the export's LoRA is the run's own lora/ export, written to <run>/export-diffusers;
    the run's config.yaml is read (a LoRA setting edited there is refused)."""
    main(["fit", "--config", str(config)])
    ckpt = next((config.parent / "run").rglob("last.ckpt"))
    run = ckpt.parent.parent
    main(["export", "--ckpt_path", str(ckpt), "--format", "diffusers"])
    exported, fitted = load_file(run / "export-diffusers" / WEIGHT_NAME), load_file(run / "lora" / WEIGHT_NAME)
    assert exported.keys() == fitted.keys() and all(torch.equal(exported[k], fitted[k]) for k in fitted)

    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["lora"]["rank"] = 8
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "kohya")
    assert "model.lora.rank: 8 in the config but 4 in" in message, message


def test_fused_export_writes_the_dtype_asked_for(tmp_path, tiny_model_dir):
    ckpt = _write_checkpoint(tiny_model_dir, LoraArgs(rank=4, target_modules=ATTENTION), tmp_path / "run")
    _export(ckpt, "fused", tmp_path / "out", "--dtype", "float16")
    weights = load_file(next((tmp_path / "out" / "unet").glob("*.safetensors")))
    assert {value.dtype for value in weights.values()} == {torch.float16}


def test_fused_export_of_a_model_held_in_fp16_variant_files_only(tmp_path, tiny_model_dir):
    """A download with variant="fp16" (*.fp16.safetensors only) trains (fnf.model_files); its fused export reads
    those files too (diffusers' from_pretrained found no model.safetensors without the variant named)."""
    StableDiffusionPipeline.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "fp16", variant="fp16")
    ckpt = _write_checkpoint(str(tmp_path / "fp16"), LoraArgs(rank=4, target_modules=ATTENTION), tmp_path / "run")
    _export(ckpt, "fused", tmp_path / "out")
    fused = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    plain = _write_checkpoint(tiny_model_dir, LoraArgs(rank=4, target_modules=ATTENTION), tmp_path / "plain")
    _export(plain, "fused", tmp_path / "plain-out")  # the same weights from plain files: the same fused UNet
    reference = StableDiffusionPipeline.from_pretrained(tmp_path / "plain-out")
    for (name, ours), (_, theirs) in zip(fused.unet.state_dict().items(), reference.unet.state_dict().items()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)


def test_bad_arguments_and_checkpoints_are_one_line(tmp_path, tiny_model_dir, capsys):
    ckpt = _write_checkpoint(tiny_model_dir, LoraArgs(rank=4, target_modules=ATTENTION), tmp_path / "run")
    out = str(tmp_path / "out")
    message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "onnx", "--out", out)
    assert "--format" in message and "invalid choice: 'onnx'" in message and "kohya" in message, message
    message = _fail(capsys, "--ckpt_path", str(tmp_path / "nowhere.ckpt"), "--format", "kohya", "--out", out)
    assert "nowhere.ckpt not found" in message, message
    message = _fail(capsys, "--format", "kohya", "--out", out)
    assert "--ckpt_path" in message and "required" in message and "--config" not in message, message
    message = _fail(capsys, "--ckpt_path", "last", "--format", "kohya", "--out", out)  # fit's shortcut
    assert "--ckpt_path last: fnf export takes a checkpoint's path (last and auto are fit's" in message, message
    message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "diffusers", "--dtype", "float16", "--out", out)
    assert "--dtype applies to --format fused only" in message, message

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, foreign)
    message = _fail(capsys, "--ckpt_path", str(foreign), "--format", "kohya", "--out", out)
    assert "no model settings" in message and "fnf fit" in message, message

    other = build_random_sdxl(tmp_path / "sdxl")  # the same LoRA targets exist there, with other widths / blocks
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(other)}}))
    message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "diffusers", "--out", out,
                    "--config", str(tmp_path / "other.yaml"))
    assert f"its LoRA does not fit the model {other}" in message, message
    message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "diffusers", "--out", out,
                    "--config", str(tmp_path / "absent.yaml"))
    assert "--config" in message and "absent.yaml" in message, message
    assert not (tmp_path / "out").exists()


def test_out_is_replaced_whole_and_only_when_an_export_wrote_it(tmp_path, tiny_model_dir, capsys):
    ckpt = _write_checkpoint(tiny_model_dir, LoraArgs(rank=4, target_modules=ATTENTION), tmp_path / "run")
    out = tmp_path / "out"
    _export(ckpt, "fused", out)
    _export(ckpt, "kohya", out)  # an earlier export: replaced, nothing of the fused folder stays
    assert sorted(p.name for p in out.iterdir()) == sorted([KOHYA_WEIGHT_NAME, MARKER])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging folders left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "kohya", "--out", str(mine))
    assert f"--out: {mine} exists and was not written by fnf export" in message, message
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "a_file").write_text("")
    message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "kohya", "--out", str(tmp_path / "a_file" / "x"))
    assert message.startswith(f"fnf: error: --out: cannot write to {tmp_path / 'a_file' / 'x'}"), message


def test_sigterm_mid_export_exits_143_and_leaves_no_staging_folder(tmp_path, tiny_model_dir, monkeypatch):
    """A job killed with SIGTERM (a scheduler's timeout) unwinds like Ctrl-C: the staging folders go with it."""
    import signal

    from fnf import export_formats

    ckpt = _write_checkpoint(tiny_model_dir, LoraArgs(rank=4, target_modules=ATTENTION), tmp_path / "run")
    save_fused = export_formats.save_fused

    def terminated_while_saving(*args, **kwargs):
        save_fused(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the fused model written in staging, not yet moved to --out

    monkeypatch.setattr(export_formats, "save_fused", terminated_while_saving)
    with pytest.raises(SystemExit) as exit_info:
        _export(ckpt, "fused", tmp_path / "out")
    assert exit_info.value.code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_full_disk_is_named_and_the_previous_export_stays(tmp_path, tiny_model_dir, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                                       capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        ckpt = _write_checkpoint(tiny_model_dir, LoraArgs(rank=4, target_modules=ATTENTION), tmp_path / "run")
        _export(ckpt, "kohya", disk / "out")
        before = (disk / "out" / KOHYA_WEIGHT_NAME).read_bytes()
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # 64 KiB left: a fused model does not fit
        message = _fail(capsys, "--ckpt_path", str(ckpt), "--format", "fused", "--out", str(disk / "out"))
        assert message.startswith("fnf: error: no space left on device: ") and str(disk / "out") in message, message
        assert (disk / "out" / KOHYA_WEIGHT_NAME).read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "out"]
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_an_export_folder_filled_during_training_is_not_replaced(config, tmp_path, monkeypatch):
    """The folder was fine at setup; a file someone put there while the run trained makes it another's at the end."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--lora_export.dirpath", str(out),
              "--trainer.callbacks+=kill_switch.WriteFileAtStart", f"--trainer.callbacks.path={out / 'notes.txt'}"])
    assert "holds notes.txt and was not written by fnf's LoRA export" in str(exit_info.value.code)
    assert (out / "notes.txt").read_text() == "precious\n" and not (out / WEIGHT_NAME).exists()
