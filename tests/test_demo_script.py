"""scripts/demo.sh (`make demo`) replaces its own last output, and nothing else: with DEMO_DIR mistyped it removed
whatever folder it named, whole."""
from __future__ import annotations

import os
import subprocess

from conftest import ROOT


def demo(out, tmp_path) -> subprocess.CompletedProcess:
    """The script with `echo` as its Python: its folder handling, without the training."""
    env = {**os.environ, "DEMO_DIR": str(out), "PY": "echo"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_a_folder_holding_anything_else_is_refused_and_kept(tmp_path):
    out = tmp_path / "thesis"
    (out / "swav_digits").mkdir(parents=True)
    (out / "chapter1.tex").write_text("keep me")
    result = demo(out, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"demo.sh: DEMO_DIR '{out}' holds 'chapter1.tex', which no demo wrote: give a new or "
                             f"empty folder\n")
    assert (out / "chapter1.tex").read_text() == "keep me" and (out / "swav_digits").is_dir()


def test_the_last_demos_folders_are_replaced(tmp_path):
    out = tmp_path / "demo"
    for name in ("swav_digits", "pixels_digits", "results"):
        (out / name).mkdir(parents=True)
        (out / name / "old").write_text("")
    result = demo(out, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == [] and "main_pretrain.py --config" in result.stdout
