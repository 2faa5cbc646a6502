"""WebDataset shards: listing, reading, and the identity of a sample."""

from .shards import expand_shards, iter_shard, sample_id

__all__ = ["expand_shards", "iter_shard", "sample_id"]
