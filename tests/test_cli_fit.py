import json
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from dbp_lightning.cli import main
from wds_util import write_shards

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "fit").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_fit_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "prune:" in printed


def test_tiny_fit_then_validate_through_lightning_cli(tmp_path):
    write_shards(tmp_path / "wds", n_shards=2, per_shard=24)
    write_shards(tmp_path / "val", n_shards=1, per_shard=8)
    common = ["--config", str(CONFIGS[[c.stem for c in CONFIGS].index("tiny_cpu")]),
              "--data.shards", str(tmp_path / "wds"), "--data.cache_dir", str(tmp_path / "cache"),
              "--data.val_shards", str(tmp_path / "val"), "--data.batch_size", "8",
              "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "run"),
              "--data.prune.semdedup.k", "4", "--data.prune.select.k", "6",
              "--data.prune.select.num_neighbors", "3", "--trainer.max_epochs", "1"]
    assert main(["fit", *common]) == 0
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    assert main(["validate", *common, "--ckpt_path", str(ckpt)]) == 0
    assert list((tmp_path / "cache").glob("embeddings-*/manifest.json"))


class RecordIds(Callback):
    """A callback (for --trainer.callbacks) appending each training batch's epoch and sample ids
    to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.current_epoch, list(batch[2])]) + "\n")


def _epochs(path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in Path(path).read_text().splitlines():
        epoch, ids = json.loads(line)
        out.setdefault(epoch, []).extend(ids)
    return out


def test_fit_writes_last_ckpt_and_a_resumed_fit_continues_the_shuffled_order(tmp_path):
    write_shards(tmp_path / "wds", n_shards=2, per_shard=24)
    common = ["--config", str(CONFIGS[[c.stem for c in CONFIGS].index("tiny_cpu")]),
              "--data.shards", str(tmp_path / "wds"), "--data.cache_dir", str(tmp_path / "cache"),
              "--data.batch_size", "8", "--data.num_workers", "2",
              "--data.shuffle_initial", "8", "--data.shuffle_buffer", "16",
              "--data.prune.semdedup.k", "4", "--data.prune.select.k", "6",
              "--data.prune.select.num_neighbors", "3"]

    def record(name):
        return ["--trainer.callbacks+=test_cli_fit.RecordIds", f"--trainer.callbacks.path={tmp_path / name}"]

    assert main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "straight"),
                 "--trainer.max_epochs", "2", *record("straight.jsonl")]) == 0
    assert main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "cut"),
                 "--trainer.max_epochs", "1"]) == 0
    last = next((tmp_path / "cut").rglob("last.ckpt"))
    assert main(["validate", *common, "--trainer.default_root_dir", str(tmp_path / "cut"),
                 "--ckpt_path", str(last)]) == 0
    assert main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "cut"),
                 "--trainer.max_epochs", "2", "--ckpt_path", str(last), *record("resumed.jsonl")]) == 0
    straight, resumed = _epochs(tmp_path / "straight.jsonl"), _epochs(tmp_path / "resumed.jsonl")
    assert list(resumed) == [1] and resumed[1] == straight[1]
    assert straight[0] != straight[1] and sorted(straight[0]) == sorted(straight[1])
