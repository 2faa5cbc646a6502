"""``ZeroShotCallback``: zero-shot evaluation of the model being trained, every n epochs."""

from __future__ import annotations

import os
from typing import Optional

import lightning as L

from .run import evaluate_tasks
from .tasks import select_tasks


class ZeroShotCallback(L.Callback):
    """Evaluates ``pl_module.model`` (an open_clip model, with the module's ``preprocess_val``
    and ``tokenizer``) on rank 0 at the end of every ``every_n_epochs``-th training epoch.

    Logs ``zeroshot/<task>`` main metrics and ``zeroshot/<group>`` averages to every logger,
    and ``zeroshot/tasks_available`` (a task without data is reported missing, not zero); writes
    ``<out_dir>/epoch_<n>/eval_results.jsonl`` and ``eval_summary.json``. Other ranks wait at a
    barrier meanwhile, so keep the evaluation shorter than the process group's timeout.

    Args:
        tasks: "imagenet", "datacomp38", or comma-separated DataComp keys.
        data_root: directory holding the tasks in clip_benchmark's WebDataset layout.
        every_n_epochs: evaluation period.
        batch_size, num_workers: for the evaluation loaders.
        imagenet_folder: an ImageFolder for ImageNet-1k when it is not under ``data_root``.
        out_dir: where results go (default: the trainer's ``default_root_dir``/zeroshot).
    """

    def __init__(self, tasks: str = "imagenet", data_root: Optional[str] = None, every_n_epochs: int = 1,
                 batch_size: int = 64, num_workers: int = 0, imagenet_folder: Optional[str] = None,
                 out_dir: Optional[str] = None):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.tasks = select_tasks(tasks)
        self.data_root, self.every_n_epochs = data_root, every_n_epochs
        self.batch_size, self.num_workers = batch_size, num_workers
        self.imagenet_folder, self.out_dir = imagenet_folder, out_dir
        self.last: Optional[tuple[list, dict]] = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # `dbp-lightning validate`: evaluate once
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Run the tasks on rank 0, log and write the results; other ranks wait."""
        if trainer.is_global_zero:
            out = os.path.join(self.out_dir or os.path.join(trainer.default_root_dir, "zeroshot"),
                               f"epoch_{trainer.current_epoch}")
            was_training = pl_module.training
            rows, summary = evaluate_tasks(pl_module.model, pl_module.preprocess_val, pl_module.tokenizer,
                                           self.tasks, self.data_root, out_dir=out,
                                           batch_size=self.batch_size, num_workers=self.num_workers,
                                           device=pl_module.device.type, imagenet_folder=self.imagenet_folder)
            pl_module.train(was_training)
            metrics = {f"zeroshot/{r['dataset']}": r["metrics"]["main_metric"] for r in rows if r["status"] == "ok"}
            metrics.update({f"zeroshot/{g}": v for g, v in summary.items()
                            if g in ("ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average") and v is not None})
            metrics["zeroshot/tasks_available"] = int(summary["available"].split("/")[0])
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self.last = (rows, summary)
        trainer.strategy.barrier()
