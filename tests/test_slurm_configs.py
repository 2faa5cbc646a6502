"""The SLURM examples in configs/slurm run commands our CLI accepts.

Each script runs with stand-ins for ``srun`` (runs its command) and ``dbp-lightning`` (records
its arguments); every recorded command must then parse: ``fit`` through LightningCLI's
``--print_config``, the others through our parser.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dbp_lightning.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "configs" / "slurm").glob("*.sbatch"))

SRUN = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift; done  # drop srun's options
exec "$@"
"""
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_slurm_script_commands_parse(script, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "dbp-lightning").write_text(RECORDER.format(python=sys.executable))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    record = tmp_path / "commands.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
           "SLURM_NNODES": "4"}
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    commands = [json.loads(line) for line in record.read_text().splitlines()]
    assert commands, f"{script.name} runs no dbp-lightning command"
    encoders = {}
    for argv in commands:
        if argv[0] == "fit":
            out = subprocess.run([sys.executable, "-m", "dbp_lightning.cli", *argv, "--print_config"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0 and "num_nodes: 4" in out.stdout, out.stderr[-2000:]
            encoders["fit"] = yaml.safe_load(out.stdout)["data"]["encoder"]
        else:
            cfg = build_parser().parse_args(argv)
            assert cfg.command == argv[0]
            if argv[0] == "embed":
                assert cfg.embed.num_nodes == 4 and "{00000000..00012895}" in cfg.embed.shards
                encoders["embed"] = dict(vars(cfg.embed.encoder))
    if len(encoders) == 2:  # fit uses the store embed wrote: DBPDataModule refuses another encoder
        assert encoders["fit"] == encoders["embed"]
