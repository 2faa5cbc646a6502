"""The pools curators already have, pruned as they lie (or imported once): DataComp's metadata
directory (compressed or not, float16 or float32), clip-retrieval/LAION parts and NeMo Curator
parquet select exactly what the same embeddings select given as one .npy, subset.npy agrees with
DataComp's own lookup rule, and kept_metadata/ holds exactly the kept source rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dbp_lightning.cli import main

N, D, PARTS = 900, 16, 3
PRUNE = ["--stages", "[semdedup, clip_score, dbp]", "--semdedup.k", "6", "--semdedup.target_fraction",
         "0.9", "--clip_score.column", "clip_l14_similarity_score", "--clip_score.fraction", "0.8",
         "--select.k", "8", "--select.num_neighbors", "3", "--select.target_fraction", "0.5"]


def _pool(dtype):
    """N unit rows in 30 concepts with planted near-duplicates, and DataComp-style metadata."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, D))
    x = centres[rng.integers(0, 30, N)] + 0.3 * rng.standard_normal((N, D))
    x[N - 60:] = x[:60] + 1e-3 * rng.standard_normal((60, D))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
    uid = [f"{int(v):032x}" for v in rng.integers(0, 2**62, N)]
    meta = pa.table({"uid": uid, "url": [f"https://example.org/{i}.jpg" for i in range(N)],
                     "text": [f"caption {i}" for i in range(N)],
                     "clip_l14_similarity_score": rng.uniform(0.1, 0.4, N).astype(np.float32),
                     "face_bboxes": [[[0.1, 0.2, 0.3, 0.4]] if i % 7 == 0 else [] for i in range(N)]})
    return x, meta


def _bounds():
    return np.linspace(0, N, PARTS + 1).astype(int)


def _reference(tmp_path, x, meta, key="uid", prune=PRUNE):
    """The selection of the same rows given as one .npy with its metadata."""
    np.save(tmp_path / "ref.npy", x)
    table = meta.append_column("key", meta.column(key)) if key != "key" else meta
    pq.write_table(table.select([c for c in table.column_names if c != "face_bboxes"]),
                   tmp_path / "ref.parquet")
    assert main(["prune", "--input", str(tmp_path / "ref.npy"), "--metadata", str(tmp_path / "ref.parquet"),
                 "--output", str(tmp_path / "ref_run"), *prune]) == 0
    return tmp_path / "ref_run"


def _kept(run):
    return pq.read_table(run / "selection.parquet", columns=["kept"]).column("kept").to_numpy()


def _write_datacomp(root, x, meta, compressed):
    root.mkdir()
    save = np.savez_compressed if compressed else np.savez
    other = np.random.default_rng(1).standard_normal((N, 8)).astype(x.dtype)
    for i, (a, b) in enumerate(zip(_bounds(), _bounds()[1:])):
        pq.write_table(meta.slice(a, b - a), root / f"{i:08d}.parquet")
        save(root / f"{i:08d}.npz", l14_img=x[a:b], b32_img=other[a:b])


def _check_run(run, ref, meta, id_column="uid"):
    assert (_kept(run) == _kept(ref)).all() and _kept(run).any() and not _kept(run).all()
    kept = _kept(run)
    # kept_metadata/: exactly the kept rows, every source column, in pool order
    parts = sorted((run / "kept_metadata").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    source = meta.filter(pa.array(kept))
    for column in meta.column_names:
        assert table.column(column).to_pylist() == source.column(column).to_pylist(), column
    if id_column == "uid":  # DataComp's subset file, read back with DataComp's own rule
        subset = np.load(run / "subset.npy")
        assert (run / "subset.npy").read_bytes() == (ref / "subset.npy").read_bytes()
        wanted = np.array([divmod(int(u, 16), 2**64) for u in meta.column("uid").to_pylist()], "u8,u8")
        at = np.minimum(np.searchsorted(subset, wanted), len(subset) - 1)
        assert ((subset[at] == wanted) == kept).all()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_datacomp_uncompressed_is_pruned_in_place_as_the_same_npy(tmp_path, dtype, capsys):
    x, meta = _pool(dtype)
    ref = _reference(tmp_path, x, meta)
    _write_datacomp(tmp_path / "dc", x, meta, compressed=False)
    assert main(["prune", "--input", str(tmp_path / "dc"), "--output", str(tmp_path / "run"), *PRUNE]) == 0
    _check_run(tmp_path / "run", ref, meta)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["layout"] == "datacomp"


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_datacomp_compressed_is_imported_once_then_pruned_as_the_same_npy(tmp_path, dtype, capsys):
    x, meta = _pool(dtype)
    ref = _reference(tmp_path, x, meta)
    _write_datacomp(tmp_path / "dc", x, meta, compressed=True)
    argv = ["prune", "--input", str(tmp_path / "dc"), "--output", str(tmp_path / "run"), *PRUNE]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stores l14_img compressed, which cannot be memory-mapped; import the pool once: " \
           f"dbp-lightning import --input {tmp_path / 'dc'} --input_format datacomp --out STORE" in err
    assert main(["import", "--input", str(tmp_path / "dc"), "--out", str(tmp_path / "store"),
                 "--dtype", dtype]) == 0
    assert main(["prune", "--input", str(tmp_path / "store"), "--output", str(tmp_path / "run"), *PRUNE]) == 0
    _check_run(tmp_path / "run", ref, meta)
    # a rerun of the import finds every part done and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("*.npy")}
    assert main(["import", "--input", str(tmp_path / "dc"), "--out", str(tmp_path / "store"),
                 "--dtype", dtype]) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("*.npy")}


def test_clip_retrieval_parts_are_pruned_in_place_by_key(tmp_path):
    x, meta = _pool("float16")
    meta = meta.drop_columns(["uid"]).append_column("key", pa.array([f"{i:09d}" for i in range(N)]))
    meta = meta.rename_columns(["url", "caption", "clip_l14_similarity_score", "face_bboxes", "key"])
    ref = _reference(tmp_path, x, meta, key="key")
    root = tmp_path / "laion"
    for folder in ("img_emb", "metadata"):
        (root / folder).mkdir(parents=True)
    for i, (a, b) in enumerate(zip(_bounds(), _bounds()[1:])):  # parts 0, 1, 2: 10 sorts before 2
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x[a:b])
        pq.write_table(meta.slice(a, b - a), root / "metadata" / f"metadata_{i}.parquet")
    assert main(["prune", "--input", str(root), "--output", str(tmp_path / "run"), *PRUNE]) == 0
    _check_run(tmp_path / "run", ref, meta, id_column="key")
    assert not (tmp_path / "run" / "subset.npy").exists()


def test_nemo_parquet_is_imported_then_pruned_as_the_same_npy(tmp_path, capsys):
    x, meta = _pool("float32")
    meta = meta.drop_columns(["uid"]).append_column("id", pa.array([f"doc-{i}" for i in range(N)]))
    ref = _reference(tmp_path, x, meta, key="id")
    root = tmp_path / "nemo"
    root.mkdir()
    for i, (a, b) in enumerate(zip(_bounds(), _bounds()[1:])):
        part = meta.slice(a, b - a).append_column("embedding", pa.array(list(x[a:b]), pa.list_(pa.float32())))
        pq.write_table(part, root / f"part_{i}.parquet")
    assert main(["prune", "--input", str(root), "--output", str(tmp_path / "run"), *PRUNE]) == 2
    assert "NeMo Curator's parquet holds embeddings as list columns" in capsys.readouterr().err
    assert main(["import", "--input", str(root), "--out", str(tmp_path / "store"), "--dtype", "float32"]) == 0
    assert main(["prune", "--input", str(tmp_path / "store"), "--output", str(tmp_path / "run"), *PRUNE]) == 0
    _check_run(tmp_path / "run", ref, meta, id_column="id")


def test_an_unrecognised_directory_names_the_layouts(tmp_path, capsys):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "notes.txt").write_text("x")
    assert main(["prune", "--input", str(tmp_path / "pool"), "--output", str(tmp_path / "run"),
                 "--stages", "[random]", "--select.target_fraction", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is none of the layouts prune reads: an embedding store" in err[0]


def test_two_arrays_joined_are_imported_unit_norm_and_halves_alike(tmp_path, capsys):
    x, meta = _pool("float32")
    _write_datacomp(tmp_path / "dc", x, meta, compressed=False)
    argv = ["prune", "--input", str(tmp_path / "dc"), "--array", "l14_img+b32_img",
            "--output", str(tmp_path / "run"), "--stages", "[random]", "--select.target_fraction", "0.5"]
    assert main(argv) == 2 and "array 'l14_img+b32_img' joins two arrays" in capsys.readouterr().err
    assert main(["import", "--input", str(tmp_path / "dc"), "--array", "l14_img+b32_img",
                 "--out", str(tmp_path / "store"), "--dtype", "float32"]) == 0
    from dbp_lightning.store import EmbeddingStore

    store = EmbeddingStore(tmp_path / "store")
    joined = store.embeddings[:]
    other = np.random.default_rng(1).standard_normal((N, 8)).astype(np.float32)
    expect = np.concatenate([x / np.linalg.norm(x, axis=1, keepdims=True),
                             other / np.linalg.norm(other, axis=1, keepdims=True)], axis=1) / np.sqrt(2)
    assert joined.shape == (N, D + 8) and np.allclose(joined, expect, atol=1e-6)
    assert np.allclose(np.linalg.norm(joined, axis=1), 1, atol=1e-5)
    assert store.metadata(["key"]).column("key").to_pylist() == meta.column("uid").to_pylist()


def test_clip_retrieval_parts_go_in_number_order_and_holes_are_named(tmp_path, capsys):
    from dbp_lightning.data.pools import open_pool

    root = tmp_path / "laion"
    for folder in ("img_emb", "metadata"):
        (root / folder).mkdir(parents=True)
    rows = {2: 3, 10: 4}  # "10" sorts before "2" as text
    for n, r in rows.items():
        np.save(root / "img_emb" / f"img_emb_{n}.npy", np.full((r, 4), n, np.float16))
        pq.write_table(pa.table({"key": [f"{n}-{i}" for i in range(r)]}),
                       root / "metadata" / f"metadata_{n:04d}.parquet")
    pool = open_pool(root)
    assert pool.metadata.column("key").to_pylist()[:4] == ["2-0", "2-1", "2-2", "10-0"]
    assert pool.embeddings[:][:, 0].tolist() == [2] * 3 + [10] * 4
    (root / "metadata" / "metadata_0010.parquet").unlink()
    with pytest.raises(ValueError, match="part 10 is in the embeddings or the metadata, not both"):
        open_pool(root)


def test_review_cases_mixed_dtypes_widths_a_named_identity_and_non_ascii_uids(tmp_path, capsys):
    from dbp_lightning.data.pools import open_pool
    from dbp_lightning.rundir import datacomp_subset

    x, meta = _pool("float16")
    _write_datacomp(tmp_path / "dc", x, meta, compressed=False)
    np.savez(tmp_path / "dc" / f"{PARTS - 1:08d}.npz",  # the last part in float32
             l14_img=x[_bounds()[-2]:].astype(np.float32), b32_img=np.zeros((N - _bounds()[-2], 8)))
    with pytest.raises(ValueError, match="the parts mix float16 and float32; import the pool"):
        open_pool(tmp_path / "dc")
    # import --id_column url on a pool with uids: the store's identity is the url, not the uid
    assert main(["import", "--input", str(tmp_path / "dc"), "--out", str(tmp_path / "store"),
                 "--id_column", "url"]) == 0
    pool = open_pool(tmp_path / "store")
    assert pool.metadata.column_names == ["key"]
    assert pool.metadata.column("key").to_pylist() == meta.column("url").to_pylist()
    # parts of two widths: refused while importing, naming the part
    np.savez(tmp_path / "dc" / f"{PARTS - 1:08d}.npz", l14_img=np.ones((N - _bounds()[-2], D + 1), np.float16))
    assert main(["import", "--input", str(tmp_path / "dc"), "--out", str(tmp_path / "store2")]) == 2
    assert f"part {PARTS - 1:08d} holds {D + 1}-d rows, the parts before it {D}-d" in capsys.readouterr().err
    assert datacomp_subset(["é" + "0" * 31]) is None  # 32 characters, 33 bytes: not a DataComp uid
