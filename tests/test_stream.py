"""The training stream is shuffled as open_clip's is: shard order and a sample buffer seeded by
(seed, epoch, rank, worker), or shards drawn with replacement; epochs differ, the same seed
repeats, a resumed fit continues the order, and without resampling every kept sample comes
once per epoch."""

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from test_datamodule import selection_dm
from wds_util import uid, write_shards

from dbp_lightning.data.stream import Epoch, SampleShuffle

KEPT = {i for i in range(48) if i % 4 != 3}  # 36 of 48 kept


def _orders(dm, passes: int) -> list[list[str]]:
    loader = dm.train_dataloader()
    return [[i for batch in loader for i in batch[2]] for _ in range(passes)]


@pytest.fixture
def pool(tmp_path):
    write_shards(tmp_path / "wds", n_shards=4, per_shard=12)
    return tmp_path


def _dm(root, sub, **kwargs):
    (root / sub).mkdir()
    (root / sub / "wds").symlink_to(root / "wds")
    dm = selection_dm(root / sub, "selection", KEPT, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("workers", [0, 2])
def test_epochs_differ_the_same_seed_repeats_and_each_kept_sample_comes_once(pool, workers):
    kept = sorted(uid(i) for i in KEPT)
    first = _orders(_dm(pool, "a", num_workers=workers, shuffle_initial=8, shuffle_buffer=16), 3)
    again = _orders(_dm(pool, "b", num_workers=workers, shuffle_initial=8, shuffle_buffer=16), 3)
    other = _orders(_dm(pool, "c", num_workers=workers, shuffle_initial=8, shuffle_buffer=16,
                        seed=1), 1)
    for order in first:
        assert sorted(order) == kept  # exactly the kept samples, each once
    assert first == again  # same seed: same orders, epoch by epoch
    assert len({tuple(o) for o in first}) == 3 and first[0] != other[0]  # three epochs, three orders
    unshuffled = _orders(_dm(pool, "d", num_workers=workers, shuffle=False), 2)
    assert unshuffled[0] == unshuffled[1] and sorted(unshuffled[0]) == kept


def test_a_resumed_fit_continues_the_order(pool):
    """Lightning restores current_epoch on resume: a DataModule started at epoch 2 streams what
    an uninterrupted one streams in its third epoch."""
    straight = _orders(_dm(pool, "a", num_workers=2), 3)
    resumed = _dm(pool, "b", num_workers=2)
    resumed.trainer = SimpleNamespace(current_epoch=2, global_rank=0, world_size=1, local_rank=0,
                                      lightning_module=None)
    assert _orders(resumed, 1)[0] == straight[2]


def test_resampled_draws_only_kept_samples_evenly_and_every_rank_takes_the_same_steps(pool):
    dm = _dm(pool, "a", num_workers=2, resampled=True, train_num_samples=96, batch_size=4)
    loader = dm.train_dataloader()
    assert len(loader) == 24
    counts = Counter()
    epochs = [[i for batch in loader for i in batch[2]] for _ in range(30)]
    for order in epochs:
        assert len(order) == 96
        counts.update(order)
    assert set(counts) <= {uid(i) for i in KEPT}  # only kept samples
    assert len(set(counts)) == len(KEPT)
    # whole shards are drawn: 2,880 samples from 4 shards of 9 kept each, ~80 per sample
    mean = np.mean(list(counts.values()))
    assert all(0.6 * mean <= c <= 1.4 * mean for c in counts.values()), counts
    assert epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="train_num_samples: resampled=True needs"):
        _dm(pool, "b", resampled=True)


def test_the_sample_buffer_is_a_seeded_permutation():
    items = list(range(1000))
    epoch = Epoch(0)
    shuffle = SampleShuffle(100, 20, seed=3, epoch=epoch, rank=0)
    a, b = list(shuffle(iter(items))), list(shuffle(iter(items)))
    assert sorted(a) == items and a == b and a != items
    epoch.value = 1
    assert list(shuffle(iter(items))) != a
    # the buffer reads at most bufsize ahead: no sample comes out before it could be read
    assert max(x - pos for pos, x in enumerate(a)) <= 100
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 1"):
        SampleShuffle(10, 20, seed=0, epoch=epoch, rank=0)


@pytest.mark.parametrize("kept, epochs, resharded", [
    ({i for i in range(48) if i % 4 == 0}, 20, True),   # 25 % kept, 20 epochs: reshard pays
    ({i for i in range(48) if i % 4 == 0}, 2, False),   # too few epochs to pay the reshard back
    (KEPT, 20, False),                                  # 75 % kept: filtering is as fast
])
def test_reshard_auto_follows_the_measured_rule_and_says_why(pool, kept, epochs, resharded, caplog):
    import logging

    (pool / "a").mkdir()
    (pool / "a" / "wds").symlink_to(pool / "wds")
    dm = selection_dm(pool / "a", "selection", kept, num_workers=2, reshard="auto")
    dm.trainer = SimpleNamespace(current_epoch=0, global_rank=0, world_size=1, local_rank=0,
                                 lightning_module=None, max_epochs=epochs, max_steps=-1)
    dm.prepare_data()
    with caplog.at_level(logging.INFO, logger="dbp_lightning.datamodule"):
        dm.setup("fit")
    choice = "reshard" if resharded else "filter"
    assert f"reshard=auto -> {choice}: keeps {100 * len(kept) / 48:.0f}% of the pool over ~{epochs} epochs" \
        in caplog.text
    assert dm.reshard is resharded and bool(list(dm.reshard_dir.glob("*.tar"))) is resharded
    order = [i for batch in dm.train_dataloader() for i in batch[2]]
    assert sorted(order) == sorted(uid(i) for i in kept)
    with pytest.raises(ValueError, match="reshard: true, false or auto, got 'yes'"):
        selection_dm(pool / "a", "selection", kept, reshard="yes")
