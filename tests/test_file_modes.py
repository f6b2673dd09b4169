"""Files a team can share: everything a run writes follows the umask (tempfile alone would make files 0600)."""

from __future__ import annotations

import os
import stat

from fnf.cli import main


def test_run_outputs_follow_the_umask(config, tmp_path):
    previous = os.umask(0o027)
    try:
        main(["fit", "--config", str(config)])
    finally:
        os.umask(previous)
    run = tmp_path / "run"
    written = list(run.rglob("*"))
    names = {p.name for p in written}
    assert any(n.endswith(".ckpt") for n in names) and "pytorch_lora_weights.safetensors" in names, names
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), f"{path.relative_to(run)}: {oct(mode)}"
