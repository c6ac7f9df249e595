"""The README's commands and tour stay true."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in _blocks("bash")]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_tour_runs(tmp_path):
    tour = _blocks("python")[0]
    result = subprocess.run([sys.executable, "-c", tour], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # (DeepSpeed, where installed, logs an accelerator line to stdout when transformers imports it)
    assert [line for line in result.stdout.splitlines() if not line.startswith("[")][0] == "64"
    assert (tmp_path / "data" / "synthetic" / "sft.json").is_file()


def test_quickstart_example_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "tour.py")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logits: (4," in result.stdout
