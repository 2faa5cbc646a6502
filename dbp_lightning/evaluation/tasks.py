"""The evaluation task table: ImageNet-1k and DataComp's 38 tasks, their main metric and group.

Keys, names, main metrics and groups follow DataComp's ``tasklist.yml`` and
``aggregate_scores.py``; a task's data lives in clip_benchmark's WebDataset layout at
``<data_root>/wds_<key with / as ->_test/`` (what DataComp's ``download_evalsets.py`` writes).
"""

from __future__ import annotations

from typing import NamedTuple

IMAGENET, SHIFTS, VTAB, RETRIEVAL, OTHER = "ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Other"
GROUPS = (IMAGENET, SHIFTS, VTAB, RETRIEVAL, OTHER)


class Task(NamedTuple):
    key: str          #: DataComp / clip_benchmark dataset id (``wds/<key>``)
    name: str         #: DataComp's display name (the ``dataset`` field of eval_results.jsonl)
    kind: str         #: classification, retrieval, winogavil, wilds or fairness
    main_metric: str  #: the metric DataComp averages
    group: str

    @property
    def folder(self) -> str:
        # DataComp's download_evalsets.py drops the fairness/ prefix from these folder names
        return f"wds_{self.key.removeprefix('fairness/').replace('/', '-')}_test"


def _t(key, name, group=OTHER, metric="acc1", kind="classification"):
    return Task(key, name, kind, metric, group)


TASKS: tuple[Task, ...] = (
    _t("imagenet1k", "ImageNet 1k", IMAGENET),
    _t("imagenet_sketch", "ImageNet Sketch", SHIFTS),
    _t("imagenetv2", "ImageNet v2", SHIFTS),
    _t("imagenet-a", "ImageNet-A", SHIFTS),
    _t("imagenet-o", "ImageNet-O", SHIFTS),
    _t("imagenet-r", "ImageNet-R", SHIFTS),
    _t("objectnet", "ObjectNet", SHIFTS),
    _t("vtab/caltech101", "Caltech-101", VTAB, "mean_per_class_recall"),
    _t("vtab/cifar100", "CIFAR-100", VTAB),
    _t("vtab/clevr_count_all", "CLEVR Counts", VTAB),
    _t("vtab/clevr_closest_object_distance", "CLEVR Distance", VTAB),
    _t("vtab/dtd", "Describable Textures", VTAB),
    _t("vtab/eurosat", "EuroSAT", VTAB),
    _t("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", VTAB),
    _t("vtab/flowers", "Oxford Flowers-102", VTAB, "mean_per_class_recall"),
    _t("vtab/pets", "Oxford-IIIT Pet", VTAB, "mean_per_class_recall"),
    _t("vtab/pcam", "PatchCamelyon", VTAB),
    _t("vtab/resisc45", "RESISC45", VTAB),
    _t("vtab/svhn", "SVHN", VTAB),
    _t("sun397", "SUN397", VTAB),
    _t("retrieval/flickr30k", "Flickr", RETRIEVAL, "mean_recall@1", "retrieval"),
    _t("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", RETRIEVAL, "mean_recall@1", "retrieval"),
    _t("misc/winogavil", "WinoGAViL", RETRIEVAL, "jaccard_score_10-12", "winogavil"),
    _t("cifar10", "CIFAR-10"),
    _t("country211", "Country211"),
    _t("fgvc_aircraft", "FGVC Aircraft", OTHER, "mean_per_class_recall"),
    _t("food101", "Food-101"),
    _t("gtsrb", "GTSRB"),
    _t("mnist", "MNIST"),
    _t("voc2007", "Pascal VOC 2007"),
    _t("renderedsst2", "Rendered SST2"),
    _t("cars", "Stanford Cars"),
    _t("stl10", "STL-10"),
    _t("wilds/iwildcam", "iWildCam", OTHER, "F1-macro_all", "wilds"),
    _t("wilds/camelyon17", "Camelyon17", OTHER, "acc1", "wilds"),
    _t("wilds/fmow", "FMoW", OTHER, "acc_worst_region", "wilds"),
    _t("fairness/dollar_street", "Dollar Street", OTHER, "acc_top5_wg", "fairness"),
    _t("fairness/geode", "GeoDE", OTHER, "acc_wg", "fairness"),
)
assert len(TASKS) == 38

#: the held-out sets ``dbp-lightning data demo`` writes (``data/demo.py``)
DEMO_TASKS = (
    _t("demo-fashion_mnist", "Fashion-MNIST", "Demo"),
    _t("demo-clipart_categories", "Clip-art categories", "Demo", "mean_per_class_recall"),
    _t("demo-retrieval", "Caption retrieval", "Demo", "mean_recall@1", "retrieval"),
)

#: the held-out sets ``dbp-lightning data icons`` writes (``data/icons.py``): whole icon sets
#: never seen in training; the concepts split at the median of their training icons
ICON_TASKS = (
    _t("icons-retrieval", "Icon retrieval (unseen sets)", "Icons", "mean_recall@1", "retrieval"),
    _t("icons-concepts_frequent", "Frequent concepts (unseen sets)", "Icons", "mean_per_class_recall"),
    _t("icons-concepts_rare", "Rare concepts (unseen sets)", "Icons", "mean_per_class_recall"),
)

BY_KEY = {t.key: t for t in TASKS + DEMO_TASKS + ICON_TASKS}
BY_NAME = {t.name: t for t in TASKS}


def select_tasks(spec: str | list[str]) -> list[Task]:
    """Tasks from a comma-separated list or a list of keys, with the shorthands ``imagenet``
    (ImageNet-1k), ``datacomp38`` (all 38), ``demo`` (the demo's held-out sets) and ``icons`` (the icon
    pool's held-out sets and the demo's). Unknown keys raise ValueError naming them."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Task] = []
    for name in (n.strip() for n in names if n.strip()):
        if name == "datacomp38":
            out += TASKS
        elif name == "demo":
            out += DEMO_TASKS
        elif name == "icons":
            out += ICON_TASKS + DEMO_TASKS
        elif name == "imagenet":
            out.append(BY_KEY["imagenet1k"])
        elif name in BY_KEY:
            out.append(BY_KEY[name])
        else:
            raise ValueError(f"tasks: unknown task {name!r}; use imagenet, datacomp38, demo, icons or a "
                             f"DataComp key such as vtab/cifar100")
    return list(dict.fromkeys(out))
