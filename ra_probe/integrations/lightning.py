"""A PyTorch Lightning callback that probes RA and NC during training (needs `pip install lightning`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the older package name
    from pytorch_lightning import Callback, LightningModule, Trainer

from ra_probe.integrations.tracker import LiveProbe, ModelPicker, save_report


class ResidualAlignmentCallback(Callback):
    """Probe the network once when training starts (step 0), then after every `every_n_epochs`-th
    training epoch and, with `every_n_steps`, after every `every_n_steps`-th optimizer step (a step
    is probed once even when both fall on it). Global rank 0 only.

    Each probe is logged through every logger of the trainer (`log_metrics(metrics,
    step=trainer.global_step)`) and put in `trainer.callback_metrics`, so that EarlyStopping or
    ModelCheckpoint placed after this callback can monitor them: the report's headline numbers as
    `ra/<name>` and `nc/<name>` (`ra/alignment`, `ra/linearity`, `ra/median_rank`, `ra/mean_sigma1`,
    `nc/nc1`…), `ra/verdict`, `nc/verdict` (absent 0, partial 0.5, present 1) and `ra/probe_seconds`;
    a metric the probe could not determine is left out (see `ra_probe.integrations.tracker.scalars`).
    `log_report`: True to also write each full JSON report to `<log_dir>/ra-probe/step-<step>.json`, or
    a folder.

    `data`: anything `ra_probe.probe` takes (a held-out (x, y) pair is best); its first `samples` are
    taken once and measured at every probe. `model`: which network to probe, the LightningModule
    itself by default, an attribute path ("net") or a callable(pl_module). Settings are
    `ra_probe.probe`'s over `DEFAULTS` (samples="auto" up to max_samples=64, k=16, align_k=8). The probe runs on the live weights
    and leaves training exactly as it was: the trained weights are those of a run without it."""

    def __init__(self, data: Any, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                 log_report: bool | str | Path = False, model: ModelPicker = None, **settings: Any):
        self.live = LiveProbe(data, model, **settings)
        self.every_n_epochs, self.every_n_steps, self.log_report = every_n_epochs, every_n_steps, log_report
        self.probed_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.probed_step = None
        self.probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.probe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.probe(trainer, pl_module)

    def probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Probe now and log at `trainer.global_step` (once per step)."""
        if trainer.global_rank != 0 or self.probed_step == trainer.global_step:
            return
        self.probed_step = trainer.global_step
        # a probe in another dtype moves the network there and back; Lightning's record of it stays
        kept = [(m, m._device, m._dtype) for m in pl_module.modules()
                if hasattr(m, "_device") and hasattr(m, "_dtype")]
        try:
            report, metrics = self.live(pl_module)
        finally:
            for module, device, dtype in kept:
                module._device, module._dtype = device, dtype
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # callbacks that watch metrics (EarlyStopping, ModelCheckpoint) read them here
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        if self.log_report:
            folder = (Path(trainer.log_dir or trainer.default_root_dir) / "ra-probe" if self.log_report is True
                      else self.log_report)
            save_report(report, folder, trainer.global_step)
