"""The README's quick start, run as it stands (paths moved under a temporary directory)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quick-start -->\n```bash\n(.*?)```\n<!-- /quick-start -->", readme, re.S)
    assert block, "README.md: no quick-start block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_commands_run_as_the_readme_gives_them(tmp_path):
    commands = quick_start_commands()
    assert [shlex.split(c)[1] for c in commands] == ["data", "prune", "data", "fit"]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outputs = []
    for command in commands:
        argv = [a.replace("runs/quick", str(tmp_path)) for a in shlex.split(command)]
        argv[0] = str(bin_dir / Path(argv[0]).name)
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout + done.stderr)
    prune_out = outputs[1]
    assert re.search(r"semdedup: 20,000 -> 16,000 samples in [\d.]+ s", prune_out)
    assert "kept 8,000 of 20,000 (faiss on cpu)" in prune_out  # which backend ran where
    assert "INFO" not in prune_out and "Loading faiss" not in prune_out  # quiet by default
    assert (tmp_path / "prune" / "report.json").is_file()
    fit_out = outputs[3]
    assert re.search(r"DBPDataModule: kept [\d,]+ of [\d,]+ samples .* -> \S+; report \S+report.html", fit_out)
    assert "Tip:" not in fit_out and "GPU available" not in fit_out
    assert list((tmp_path / "fit").rglob("last.ckpt"))
    assert list((tmp_path / "cache").rglob("report.html"))
