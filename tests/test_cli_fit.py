from pathlib import Path

import pytest

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
