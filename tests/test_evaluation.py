import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from dbp_lightning.clip_module import CLIPModule
from dbp_lightning.evaluation import TASKS, aggregate, evaluate_task, evaluate_tasks, read_results, select_tasks
from dbp_lightning.evaluation.tasks import BY_KEY
from evalsets import CLASSES, write_classification, write_retrieval


@pytest.fixture(scope="module")
def clip():
    return CLIPModule("tiny-clip", seed=7)


def images_of(folder, module):
    out = []
    for path in sorted((folder / "test").glob("*.tar")):
        for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            raw = next(s[k] for k in ("png", "jpg") if k in s)
            out.append(module.preprocess_val(Image.open(io.BytesIO(raw)).convert("RGB")))
    return torch.stack(out)


def test_classification_matches_a_hand_computation(tmp_path, clip):
    task = BY_KEY["cifar10"]
    labels = write_classification(tmp_path, task.folder)
    row = evaluate_task(clip.model, clip.preprocess_val, clip.tokenizer, task, str(tmp_path), batch_size=5)
    assert row["status"] == "ok" and row["metrics"]["main_metric"] == row["metrics"]["acc1"]
    model = clip.model.eval()
    with torch.no_grad():
        weights = []
        for c in CLASSES:
            t = F.normalize(model.encode_text(clip.tokenizer([f"a photo of a {c}.", f"a drawing of a {c}."])), dim=-1)
            weights.append(F.normalize(t.mean(0), dim=0))
        img = F.normalize(model.encode_image(images_of(tmp_path / task.folder, clip)), dim=-1)
        pred = (img @ torch.stack(weights, 1)).argmax(1).numpy()
    labels = np.array(labels)
    assert row["metrics"]["acc1"] == pytest.approx((pred == labels).mean())
    recall = np.mean([(pred[labels == c] == c).mean() for c in range(len(CLASSES))])
    assert row["metrics"]["mean_per_class_recall"] == pytest.approx(recall)


def test_retrieval_matches_a_hand_computation(tmp_path, clip):
    task = BY_KEY["retrieval/flickr30k"]
    captions = write_retrieval(tmp_path, task.folder)
    row = evaluate_task(clip.model, clip.preprocess_val, clip.tokenizer, task, str(tmp_path), batch_size=4)
    model = clip.model.eval()
    flat = [c for caps in captions for c in caps]
    owner = np.repeat(np.arange(len(captions)), 2)
    with torch.no_grad():
        img = F.normalize(model.encode_image(images_of(tmp_path / task.folder, clip)), dim=-1)
        txt = F.normalize(model.encode_text(clip.tokenizer(flat)), dim=-1)
    sims = (txt @ img.T).numpy()
    text_to_image = (sims.argmax(1) == owner).mean()          # each caption finds its image
    image_to_text = (owner[sims.argmax(0)] == np.arange(len(captions))).mean()
    m = row["metrics"]
    assert m["image_retrieval_recall@1"] == pytest.approx(text_to_image)
    assert m["text_retrieval_recall@1"] == pytest.approx(image_to_text)
    assert m["main_metric"] == pytest.approx(0.5 * (text_to_image + image_to_text))


def test_missing_tasks_are_reported_and_counted(tmp_path, clip):
    write_classification(tmp_path, BY_KEY["cifar10"].folder, n=6, shards=1)
    tasks = select_tasks("cifar10,mnist,misc/winogavil")
    rows, summary = evaluate_tasks(clip.model, clip.preprocess_val, clip.tokenizer, tasks, str(tmp_path),
                                   out_dir=str(tmp_path / "out"), batch_size=4)
    assert [r["status"] for r in rows] == ["ok", "missing", "missing"]
    assert summary["available"] == "1/3" and summary["missing"] == ["MNIST", "WinoGAViL"]
    lines = (tmp_path / "out" / "eval_results.jsonl").read_text().splitlines()
    assert [json.loads(line)["dataset"] for line in lines] == ["CIFAR-10", "MNIST", "WinoGAViL"]
    assert "main_metric" not in json.loads(lines[1])["metrics"]  # missing is not zero


def test_task_table_and_aggregation_follow_datacomp(tmp_path):
    assert len(TASKS) == 38 and len({t.name for t in TASKS}) == 38
    assert sum(t.group == "VTAB" for t in TASKS) == 13 and sum(t.group == "ImageNet dist. shifts" for t in TASKS) == 6
    rng = np.random.default_rng(0)
    values = {t.name: float(rng.uniform()) for t in TASKS}
    path = tmp_path / "eval_results.jsonl"
    path.write_text("".join(json.dumps({"key": t.key, "dataset": t.name, "metrics": {"main_metric": values[t.name]}}) + "\n"
                            for t in TASKS) + json.dumps({"dataset": "FairFace", "metrics": {"main_metric": None}}) + "\n")
    summary = aggregate(read_results(path))
    retrieval = ["Flickr", "MSCOCO", "WinoGAViL"]
    vtab = ["Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
            "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45", "SVHN", "SUN397"]
    assert summary["ImageNet"] == values["ImageNet 1k"]
    assert summary["Retrieval"] == pytest.approx(np.mean([values[n] for n in retrieval]))
    assert summary["VTAB"] == pytest.approx(np.mean([values[n] for n in vtab]))
    assert summary["Average"] == pytest.approx(np.mean(list(values.values())))
    assert summary["available"] == "38/38" and summary["missing"] == []
    with pytest.raises(ValueError, match="unknown task 'imagenet-x'"):
        select_tasks("imagenet,imagenet-x")


def test_callback_logs_during_fit_and_eval_cli_reads_the_checkpoint(tmp_path, capsys):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from dbp_lightning.cli import main
    from dbp_lightning.evaluation import ZeroShotCallback

    write_classification(tmp_path / "evalsets", BY_KEY["cifar10"].folder, n=12, shards=1)
    module = CLIPModule("tiny-clip", lr=1e-3, warmup_steps=1)
    images = torch.randn(8, 3, 64, 64)
    texts = module.tokenizer([f"caption {i}" for i in range(8)])
    callback = ZeroShotCallback("cifar10,mnist", data_root=str(tmp_path / "evalsets"), batch_size=4,
                                out_dir=str(tmp_path / "zs"))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path / "logs"),
                        callbacks=[callback], enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(images, texts), batch_size=4))
    rows, summary = callback.last
    assert summary["available"] == "1/2" and module.training
    assert (tmp_path / "zs" / "epoch_0" / "eval_results.jsonl").exists()
    logged = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "zeroshot/CIFAR-10" in logged and "zeroshot/tasks_available" in logged
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert main(["eval", "--ckpt", str(ckpt), "--tasks", "cifar10,mnist", "--data_root",
                 str(tmp_path / "evalsets"), "--out", str(tmp_path / "eval"), "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "| CIFAR-10 | acc1 |" in out and "| MNIST | acc1 | missing |" in out and "1/2 tasks" in out
    final = json.loads((tmp_path / "eval" / "eval_results.jsonl").read_text().splitlines()[0])
    assert final["metrics"]["acc1"] == pytest.approx(
        evaluate_task(module.model, module.preprocess_val, module.tokenizer, BY_KEY["cifar10"],
                      str(tmp_path / "evalsets"), batch_size=4)["metrics"]["acc1"])
    assert (tmp_path / "eval" / "eval_table.csv").read_text().startswith("task,key,main_metric")


def test_grouped_metrics_match_their_definitions():
    from dbp_lightning.evaluation.grouped import grouped_metrics

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(60, 7))
    target = rng.integers(0, 7, 60)
    meta = np.stack([rng.integers(0, 6, 60), rng.integers(0, 3, 60)], 1)
    pred = logits.argmax(1)
    per_region = {g: (pred == target)[meta[:, 0] == g].mean() for g in np.unique(meta[:, 0])}
    fmow = grouped_metrics("wilds/fmow", logits, target, meta)
    assert fmow["acc_worst_region"] == min(per_region.values())  # region 5 counts, as in DataComp
    assert grouped_metrics("fairness/geode", logits, target, meta)["acc_wg"] == min(per_region.values())
    top5 = np.array([t in np.argsort(-row)[:5] for row, t in zip(logits, target)])
    ds = grouped_metrics("fairness/dollar_street", logits, target, meta)["acc_top5_wg"]
    assert ds == min(top5[meta[:, 0] == g].mean() for g in np.unique(meta[:, 0]))
    f1s = []
    for c in np.unique(target):
        tp = ((pred == c) & (target == c)).sum()
        precision = tp / max((pred == c).sum(), 1)
        recall = tp / (target == c).sum()
        f1s.append(0 if tp == 0 else 2 * precision * recall / (precision + recall))
    assert grouped_metrics("wilds/iwildcam", logits, target, meta)["F1-macro_all"] == pytest.approx(np.mean(f1s))


@pytest.mark.parametrize("key", ["wilds/fmow", "fairness/geode", "wilds/camelyon17"])
def test_grouped_tasks_end_to_end_with_two_workers(tmp_path, clip, key):
    from dbp_lightning.evaluation.grouped import grouped_metrics
    from evalsets import write_grouped

    task = BY_KEY[key]
    labels, meta = write_grouped(tmp_path, task.folder, n=32, shards=2)
    row = evaluate_task(clip.model, clip.preprocess_val, clip.tokenizer, task, str(tmp_path), batch_size=4,
                        num_workers=2)
    assert row["status"] == "ok"
    model = clip.model.eval()
    with torch.no_grad():  # the same classifier by hand, samples in file order
        weights = torch.stack([F.normalize(F.normalize(model.encode_text(clip.tokenizer([f"a photo of a {c}."])),
                                                       dim=-1).mean(0), dim=0) for c in CLASSES], 1)
        logits = 100 * F.normalize(model.encode_image(images_of(tmp_path / task.folder, clip)), dim=-1) @ weights
    expected = grouped_metrics(key, logits.numpy(), np.array(labels), np.array(meta))
    assert row["metrics"]["main_metric"] == pytest.approx(expected[task.main_metric])
    assert row["metrics"]["acc1"] == pytest.approx(expected["acc1"])


def test_retrieval_from_a_local_datasets_copy_like_datacomp(tmp_path, clip):
    import datasets

    from wds_util import image_bytes

    images = [Image.open(io.BytesIO(image_bytes(700 + i))) for i in range(10)]  # recall@10 needs 10
    captions = [[f"image {i} first", f"image {i} second"] for i in range(10)]
    datasets.Dataset.from_dict({"image": images, "caption": captions},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "caption": datasets.Sequence(datasets.Value("string"))})
                               ).save_to_disk(str(tmp_path / "flickr30k"))
    row = evaluate_task(clip.model, clip.preprocess_val, clip.tokenizer, BY_KEY["retrieval/flickr30k"],
                        str(tmp_path), batch_size=4)
    model = clip.model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([clip.preprocess_val(i.convert("RGB")) for i in images])), dim=-1)
        txt = F.normalize(model.encode_text(clip.tokenizer([c for cs in captions for c in cs])), dim=-1)
    owner = np.repeat(np.arange(10), 2)
    sims = (txt @ img.T).numpy()
    expected = 0.5 * ((sims.argmax(1) == owner).mean() + (owner[sims.argmax(0)] == np.arange(10)).mean())
    assert row["status"] == "ok" and row["metrics"]["main_metric"] == pytest.approx(expected)


def test_winogavil_from_a_local_datasets_copy(tmp_path, clip):
    import datasets

    from wds_util import image_bytes

    rng = np.random.default_rng(3)
    rows = {"cue": [], "candidates": [], "associations": [], "candidate_images": []}
    for i, n in enumerate([5, 6, 10, 12, 10]):
        names = [f"c{i}_{j}" for j in range(n)]
        rows["cue"].append(["apple", "boat", "ice", "tree", "ocean"][i])
        rows["candidates"].append(names)
        rows["associations"].append(list(rng.choice(names, 2 + i % 3, replace=False)))
        rows["candidate_images"].append([Image.open(io.BytesIO(image_bytes(500 + 20 * i + j))) for j in range(n)])
    features = datasets.Features({"cue": datasets.Value("string"),
                                  "candidates": datasets.Sequence(datasets.Value("string")),
                                  "associations": datasets.Sequence(datasets.Value("string")),
                                  "candidate_images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "winogavil"))
    row = evaluate_task(clip.model, clip.preprocess_val, clip.tokenizer, BY_KEY["misc/winogavil"], str(tmp_path))
    model = clip.model.eval()
    expected = []
    for i in range(5):
        imgs = torch.stack([clip.preprocess_val(im.convert("RGB")) for im in rows["candidate_images"][i]])
        prompt = ("An " if rows["cue"][i][0] in "aeiou" else "A ") + rows["cue"][i]
        with torch.no_grad():
            sims = (F.normalize(model.encode_text(clip.tokenizer([prompt])), dim=-1)
                    @ F.normalize(model.encode_image(imgs), dim=-1).T)[0].numpy()
        truth = set(rows["associations"][i])
        picked = {rows["candidates"][i][j] for j in np.argsort(sims)[::-1][: len(truth)]}
        expected.append(len(truth & picked) / len(truth | picked))
    assert row["status"] == "ok"
    assert row["metrics"]["jaccard_score_10-12"] == pytest.approx(np.mean(expected[2:]))
    assert row["metrics"]["main_metric"] == row["metrics"]["jaccard_score_10-12"]
    assert row["metrics"]["avg_jaccard_score"] == pytest.approx(np.mean(expected))


def test_eval_cli_does_not_need_the_initial_weights(tmp_path, capsys):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from dbp_lightning.cli import main

    init = CLIPModule("tiny-clip", seed=3)
    torch.save(init.model.state_dict(), tmp_path / "init.pt")
    module = CLIPModule("tiny-clip", pretrained=str(tmp_path / "init.pt"))
    data = TensorDataset(torch.randn(4, 3, 64, 64), module.tokenizer([f"c{i}" for i in range(4)]))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=4))
    (tmp_path / "init.pt").unlink()  # the initial weights are gone; the checkpoint holds the model
    write_classification(tmp_path / "evalsets", BY_KEY["cifar10"].folder, n=6, shards=1)
    assert main(["eval", "--ckpt", str(next(tmp_path.rglob("*.ckpt"))), "--tasks", "cifar10",
                 "--data_root", str(tmp_path / "evalsets"), "--out", str(tmp_path / "eval")]) == 0
    assert "1/1 tasks" in capsys.readouterr().out
