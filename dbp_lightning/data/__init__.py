"""WebDataset shards: listing and reading (``shards``), rewriting (``reshard``), the demo pool
(``demo``). Nothing is imported here: webdataset imports torch, which ``prune`` never needs."""

#: tar member mtime of the shards this package writes: the same samples give byte-identical shards
TAR_MTIME = 946684800.0  # 2000-01-01 UTC
