"""ProjectionCLIP, paired features and the feature-space zero-shot metrics."""

import lightning as L
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from dbp_lightning.evaluation.features import (TaskFeatures, evaluate_features,
                                               retrieval_metrics)
from dbp_lightning.evaluation.tasks import BY_KEY, Task
from dbp_lightning.projection import ProjectionCLIP, paired_features
from dbp_lightning.store import write_store

from conftest import unit_rows


class _Identity(torch.nn.Module):
    """clip_benchmark's model interface over ready features: 'images' are image features and
    'tokens' are row indices into a table of text features."""

    def __init__(self, text_table: np.ndarray):
        super().__init__()
        self.table = torch.from_numpy(text_table)

    def encode_image(self, x):
        return x

    def encode_text(self, idx):
        return self.table[idx]


def _tokenizer(texts):
    return torch.tensor([int(t) for t in texts])


def test_classification_metrics_equal_clip_benchmark(rng):
    from clip_benchmark.metrics import zeroshot_classification

    n, c, t, d = 60, 6, 3, 8
    image = unit_rows(rng, n, d)
    labels = rng.integers(0, c, n)
    prompts = unit_rows(rng, c * t, d)
    # clip_benchmark formats each template with the class name: make the text the table row
    templates = [f"{{c}}{j}" for j in range(t)]
    classnames = [str(i) for i in range(c)]
    table = np.zeros((int(f"{c - 1}{t - 1}") + 1, d), np.float32)
    for i in range(c):
        for j in range(t):
            table[int(f"{i}{j}")] = prompts[i * t + j]
    dataset = TensorDataset(torch.from_numpy(image), torch.from_numpy(labels))
    dataset.classes = classnames  # clip_benchmark reads the class count from the dataset
    loader = DataLoader(dataset, batch_size=16)
    ref = zeroshot_classification.evaluate(_Identity(table), loader, _tokenizer, classnames, templates, "cpu")
    # evaluate_features itself: the class embedding (prompt mean, normalised) included
    task = Task("toy", "Toy", "classification", "acc1", "other")
    features = {"toy": TaskFeatures("classification", image, labels=labels, class_text=prompts.reshape(c, t, d))}
    rows, _ = evaluate_features(_Towers(), features, [task])
    ours = rows[0]["metrics"]
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert ours["main_metric"] == ours["acc1"]


class _Towers(torch.nn.Module):
    """A model whose heads pass the (unit-norm) frozen features through."""

    def encode_image(self, x):
        return x

    def encode_text(self, x):
        return x


def test_retrieval_metrics_equal_clip_benchmark(rng):
    from clip_benchmark.metrics import zeroshot_retrieval

    n, d = 12, 6
    image = unit_rows(rng, n, d)
    captions_per_image = rng.integers(1, 4, n)
    owner = np.repeat(np.arange(n), captions_per_image)
    text = unit_rows(rng, len(owner), d) + 0.8 * image[owner]
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    batches, row = [], 0
    for start in range(0, n, 5):
        caps = []
        for i in range(start, min(n, start + 5)):
            caps.append([str(row + j) for j in range(captions_per_image[i])])
            row += captions_per_image[i]
        batches.append((torch.from_numpy(image[start : start + 5]), caps))
    ref = zeroshot_retrieval.evaluate(_Identity(text), batches, _tokenizer, "cpu", recall_k_list=[1, 5])
    ours = retrieval_metrics(image @ text.T, owner, ks=(1, 5))
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["mean_recall@1"] == pytest.approx(0.5 * (ref["image_retrieval_recall@1"]
                                                         + ref["text_retrieval_recall@1"]))


def _retrieval_by_argsort(scores, text_image, ks):
    """The definition: rank every row with a stable argsort (ties to the lower index)."""
    n_images = scores.shape[0]
    out = {}
    for k in [k for k in ks if k <= n_images]:
        top_images = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]
        out[f"image_retrieval_recall@{k}"] = float((top_images == text_image[:, None]).any(1).mean())
        top_texts = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out[f"text_retrieval_recall@{k}"] = float((text_image[top_texts] == np.arange(n_images)[:, None])
                                                  .any(1).mean())
    out["mean_recall@1"] = 0.5 * (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"])
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 9), st.integers(1, 14), st.integers(0, 2**32 - 1), st.booleans())
def test_retrieval_metrics_equal_the_argsort_definition(n_images, n_texts, seed, ties):
    """Ties (scores from few levels), several captions per image and images with none."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (n_images, n_texts)).astype(np.float32) if ties else \
        rng.standard_normal((n_images, n_texts)).astype(np.float32)
    owner = rng.integers(0, n_images, n_texts)
    ks = (1, 2, 5, 10)
    ours = retrieval_metrics(scores, owner, ks)
    assert ours == _retrieval_by_argsort(scores, owner, ks)


def test_paired_features_align_by_key(tmp_path, rng):
    keys = [f"k{i}" for i in range(10)]
    image, text = unit_rows(rng, 10, 4), unit_rows(rng, 10, 3)
    write_store(tmp_path / "img", image, pa.table({"key": keys}))
    order = [7, 3, 9, 0, 1, 2, 4, 5, 6]  # the text encoder skipped k8 and wrote another order
    write_store(tmp_path / "txt", text[order], pa.table({"key": [keys[i] for i in order]}))
    got_keys, got_image, got_text = paired_features(tmp_path / "img", tmp_path / "txt")
    assert list(got_keys) == [k for k in keys if k != "k8"]
    rows = [keys.index(k) for k in got_keys]
    np.testing.assert_allclose(got_image, image[rows], atol=1e-3)  # float16 store
    np.testing.assert_allclose(got_text, text[rows], atol=1e-3)
    write_store(tmp_path / "other", text[:2], pa.table({"key": ["x", "y"]}))
    with pytest.raises(ValueError, match="share no sample"):
        paired_features(tmp_path / "img", tmp_path / "other")


def test_projection_clip_learns_a_pairing(rng):
    """Text features are a hidden linear map of image features plus noise: training the heads
    must lift caption retrieval far above its chance level and above the untrained heads."""
    n, di, dt = 512, 32, 16
    image = rng.standard_normal((n, di)).astype(np.float32)
    text = image @ rng.standard_normal((di, dt)).astype(np.float32) + 0.1 * rng.standard_normal((n, dt)).astype(np.float32)
    held_out = TaskFeatures("retrieval", image[:128], text=text[:128], text_image=np.arange(128))
    tasks = [BY_KEY["demo-retrieval"]]
    model = ProjectionCLIP(di, dt, embed_dim=32, lr=5e-3, warmup_steps=5, seed=0)
    before = evaluate_features(model, {"demo-retrieval": held_out}, tasks)[0][0]["metrics"]["mean_recall@1"]
    loader = DataLoader(TensorDataset(torch.from_numpy(image[128:]), torch.from_numpy(text[128:])),
                        batch_size=64, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=150, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    rows, summary = evaluate_features(model, {"demo-retrieval": held_out}, tasks)
    after = rows[0]["metrics"]["mean_recall@1"]
    assert after > 0.5 and after > before + 0.3, (before, after)
    assert summary["Average"] == pytest.approx(after)
    assert float(model.logit_scale.detach()) <= np.log(100) + 1e-6


def test_task_features_round_trip(tmp_path, rng):
    f = TaskFeatures("classification", unit_rows(rng, 5, 4), labels=np.arange(5), class_text=np.ones((5, 2, 3), np.float32))
    f.save(tmp_path / "t.npz")
    g = TaskFeatures.load(tmp_path / "t.npz")
    assert g.kind == "classification" and g.text is None
    np.testing.assert_array_equal(g.image, f.image)
    np.testing.assert_array_equal(g.class_text, f.class_text)
