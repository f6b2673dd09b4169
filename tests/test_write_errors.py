"""Writes that fail for want of room: a full disk, a file-size limit, a quota, and the room for checkpoints checked
before the first step. One line naming the file and what to do; no staging file left behind."""

from __future__ import annotations

import errno
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fnf.errors import one_line
from fnf.evaluation import Evaluation
from test_error_matrix import _base_config, _fail, _leftovers
from test_metrics import _red_then_half_green, _trainer_stub


def _mount_tiny_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    return shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0


def test_a_full_disk_is_named(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A checkpoint written to a file system with no room left: 'no space left on device: PATH', not torch's
    'unexpected pos'; the previous files stay intact and no staging file is left. (The disk filling up during the
    run, as other jobs do: the check for room before the first step is left out.)"""
    monkeypatch.setattr("fnf.cli.check_room_for_checkpoints", lambda *args: None)
    disk = tmp_path / "disk"
    if not _mount_tiny_tmpfs(disk, "256k"):
        pytest.skip("needs permission to mount a tmpfs")
    try:
        config = _base_config(tiny_model_dir, tmp_path)
        config["trainer"]["default_root_dir"] = str(disk)
        config["checkpoint"] = {"every_n_train_steps": 1}
        (disk / "filler").write_bytes(b"\0" * (256 * 1024 - 64 * 1024))  # 64 KiB left: logs fit, a checkpoint not
        message = _fail(config, tmp_path, [], capsys)
        assert message.startswith("fnf: error: no space left on device: ") and "last.ckpt" in message, message
        assert message.endswith("; checkpoints saved before stay as they were: make room, then --ckpt_path last "
                                "resumes from the newest"), message
        assert not list(disk.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)  # lazy: the failed run may hold files open


def test_too_little_room_for_checkpoints_is_found_before_the_first_step(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """Not after the run's steps, at its first save: a save needs room for two checkpoints."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("fnf.checkpoint_io.shutil.disk_usage", lambda path: usage._replace(free=4096))
    message = _fail(_base_config(tiny_model_dir, tmp_path), tmp_path, [], capsys)
    assert message.startswith(f"fnf: error: trainer.default_root_dir: {tmp_path / 'run'} has 0.0 MiB free; a "
                              "checkpoint of this run takes about "), message
    assert message.endswith("MiB and a save needs room for two: make room or choose another folder"), message
    assert _leftovers(tmp_path) == []
    elsewhere = tmp_path / "checkpoints"  # checkpoint.dirpath set: the room is checked where they go
    message = _fail(_base_config(tiny_model_dir, tmp_path), tmp_path, ["--checkpoint.dirpath", str(elsewhere)],
                    capsys)
    assert message.startswith(f"fnf: error: checkpoint.dirpath: {elsewhere} has 0.0 MiB free"), message


def test_a_file_size_limit_is_named(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """``ulimit -f``: torch's writer reports 'unexpected pos'; fnf names the limit and the file, and leaves no staging
    file (the soft limit of this test's process only, restored after). The check before the first step, which
    refuses this limit (below), is left out: a checkpoint may outgrow its estimate."""
    monkeypatch.setattr("fnf.cli.check_room_for_checkpoints", lambda *args: None)
    config = _base_config(tiny_model_dir, tmp_path)
    config["checkpoint"] = {"every_n_train_steps": 1}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, hard))  # logs fit, a checkpoint not
    try:
        message = _fail(config, tmp_path, [], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert message.startswith("fnf: error: file too large for this process's file-size limit (ulimit -f): "), message
    assert "last.ckpt" in message and not list(tmp_path.rglob("*.tmp")), message


def test_an_errno_in_a_librarys_message_is_read():
    """safetensors (Rust) puts the errno in its message: 'No space left on device (os error 28)'."""
    from safetensors import SafetensorError

    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert one_line(error) == "no space left on device: (the file being written)"
    assert one_line(OSError(errno.EDQUOT, "Disk quota exceeded", "/q/x.ckpt")) == "disk quota exceeded: /q/x.ckpt"


def test_a_staged_file_is_on_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """atomic_path: the staging file is fsync'ed, then renamed over the target (a crash in between keeps the old
    file, never a renamed file whose data is not written yet); the target holds the new bytes."""
    import os

    from fnf.files import atomic_path

    target, calls = tmp_path / "weights.safetensors", []
    target.write_bytes(b"old")
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (calls.append(("replace", str(src))), replace(src, dst)))
    with atomic_path(target) as staging:
        staging.write_bytes(b"new")
    assert [name for name, _ in calls] == ["fsync", "replace"] and calls[0][1] == calls[1][1] != str(target)
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


def test_a_staged_folder_is_on_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """atomic_folder (reports, previews, LoRA exports): every staged file and folder is fsync'ed before the rename
    publishes the folder, which then holds the new files only."""
    import os

    import fnf.output_folder
    from fnf.output_folder import write_text_folder

    for swap in (True, False):  # renameat2's exchange, and two renames where the file system cannot exchange
        out, calls = tmp_path / f"report{swap}", []
        out.mkdir()
        (out / "old.md").write_text("old")
        with monkeypatch.context() as patch:
            fsync, replace, exchange = os.fsync, os.replace, fnf.output_folder.exchange
            patch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                   fsync(fd)))
            patch.setattr(os, "replace", lambda src, dst: (calls.append(("replace", str(src))), replace(src, dst)))
            patch.setattr(fnf.output_folder, "exchange", lambda a, b: (calls.append(("exchange", str(a))),
                                                                       swap and exchange(a, b))[1])
            write_text_folder(out, {"index.html": "<p>new</p>", "metrics.md": "new"})
        published = next(i for i, (name, path) in enumerate(calls) if name in ("replace", "exchange")
                         and ".report" in path and not path.endswith(".old"))
        synced = {Path(path).name for name, path in calls[:published] if name == "fsync"}
        assert {"index.html", "metrics.md"} <= synced and any(name.startswith(".report") for name in synced), calls
        assert sorted(p.name for p in out.iterdir()) == ["index.html", "metrics.md"]
        moved_away = [path for name, path in calls if name == "replace" and path == str(out)]
        assert moved_away == ([] if swap else [str(out)])  # exchanged: the folder was never absent, not even briefly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reportFalse", "reportTrue"]  # no staging, no old folder


def test_exchange_swaps_two_folders_or_says_it_cannot(tmp_path):
    from fnf.output_folder import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "from_a").write_text("a"), (b / "from_b").write_text("b")
    assert exchange(a, b)  # Linux and a local file system: the CI's
    assert [p.name for p in a.iterdir()] == ["from_b"] and [p.name for p in b.iterdir()] == ["from_a"]
    with pytest.raises(FileNotFoundError, match="missing"):
        exchange(a, tmp_path / "missing")


@pytest.mark.parametrize("failing", ["test_samples/001.png", "test_items.jsonl", "test_metrics.json"])
def test_a_test_runs_files_are_whole_or_absent_when_the_disk_fills(tiny_model_dir, tmp_path, monkeypatch, failing):
    """The disk fills while one of ``fnf test``'s files is written: that file is absent (no half file, no staging
    file), the ones before it are whole, and test_metrics.json, written last, is absent: fnf report takes a folder
    with it for a completely tested run."""
    import torchvision.utils

    module, outputs = _red_then_half_green(tiny_model_dir)
    evaluation = Evaluation(output_dir=str(tmp_path))
    evaluation.on_test_epoch_start(_trainer_stub(tmp_path), module)
    evaluation.on_test_batch_end(_trainer_stub(tmp_path), module, outputs, {"seed": [3, 4]}, 0)
    target = tmp_path / failing
    write_text, save_image = Path.write_text, torchvision.utils.save_image

    def full(path: Path) -> OSError:
        path.write_bytes(b"half")
        return OSError(errno.ENOSPC, "No space left on device", str(path))

    def filling_text(path, text, *args, **kwargs):
        if path.parent == target.parent and path.name.startswith(f".{target.name}."):
            raise full(path)
        return write_text(path, text, *args, **kwargs)

    def filling_image(tensor, path, *args, **kwargs):
        if Path(path).parent == target.parent and Path(path).name.startswith(f".{target.name}."):
            raise full(Path(path))
        return save_image(tensor, path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", filling_text)
    monkeypatch.setattr("fnf.evaluation.save_image", filling_image)
    with pytest.raises(OSError) as error:
        evaluation._finish("test", _trainer_stub(tmp_path), module)
    assert error.value.errno == errno.ENOSPC
    order = ["test_samples/000.png", "test_samples/001.png", "test_samples/samples.json", "test_items.jsonl",
             "test_metrics.md", "test_metrics.json"]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(order[:order.index(failing)]), written
    if failing != "test_samples/001.png":
        assert len(json.loads((tmp_path / "test_samples" / "samples.json").read_text())) == 2


def test_the_room_check_asks_for_two_checkpoints(tmp_path, monkeypatch):
    """A save writes the new checkpoint beside the previous one: 1.5 checkpoints of free space is refused, 2 pass
    (a LoRA of 1000 weights: ~12 kB with AdamW's two moments, float32)."""
    from types import SimpleNamespace

    import torch

    from fnf.checkpoint_io import check_room_for_checkpoints

    lora, size = [torch.nn.Parameter(torch.zeros(1000))], 3 * 4 * 1000
    for free, refused in ((int(1.5 * size), True), (2 * size, False)):
        monkeypatch.setattr(shutil, "disk_usage", lambda path, free=free: SimpleNamespace(free=free))
        if refused:
            with pytest.raises(OSError, match=r"^trainer.default_root_dir: .* has 0.0 MiB free; a checkpoint of this "
                                              r"run takes about 0.0 MiB and a save needs room for two"):
                check_room_for_checkpoints(str(tmp_path), lora, "trainer.default_root_dir")
        else:
            check_room_for_checkpoints(str(tmp_path), lora, "trainer.default_root_dir")


def test_the_room_check_asks_for_a_file_size_limit_that_fits_a_checkpoint(tmp_path):
    """``ulimit -f`` below a checkpoint's size: refused before the first step (the first save failed after it, and
    the advice to resume found no checkpoint). A process of its own, its soft limit lowered."""
    code = ("import resource, torch\n"
            "from fnf.checkpoint_io import check_room_for_checkpoints\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            f"check_room_for_checkpoints({str(tmp_path)!r}, [torch.nn.Parameter(torch.zeros(1000))], 'checkpoint')\n")
    fits = subprocess.run([sys.executable, "-c", code.replace("6000", "18000")], capture_output=True, text=True)
    assert fits.returncode == 0, fits.stderr[-500:]  # 12 kB of LoRA and moments: one checkpoint, not two, per file
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().endswith(
        "OSError: checkpoint: this process may write files of at most 0.0 MiB (ulimit -f); a checkpoint of this run "
        "takes about 0.0 MiB: raise the limit"), run.stderr[-500:]
