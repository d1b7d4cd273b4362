"""A Hugging Face `Trainer` callback that probes RA and NC during training."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ra_probe.integrations.tracker import LiveProbe, Metrics, ModelPicker, save_report


class ResidualAlignmentCallback(TrainerCallback):
    """Probe the model when training begins (step 0), after each evaluation (`on_evaluate`, the
    Trainer's `eval_strategy` decides when) unless `at_evaluate=False`, and, with `every_n_steps`,
    after every `every_n_steps`-th optimizer step (a step is probed once even when several of these
    fall on it). World process zero only.

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        trainer.add_callback(ResidualAlignmentCallback((x_val, y_val), trainer=trainer))

    Each probe is logged with `trainer.log`, so it lands in `trainer.state.log_history` (with `step`
    and `epoch`) and reaches every reporting integration (`report_to`): the report's headline numbers
    as `ra/<name>` and `nc/<name>` (`ra/alignment`, `ra/linearity`, `ra/median_rank`, `ra/mean_sigma1`,
    `nc/nc1`…), `ra/verdict`, `nc/verdict` (absent 0, partial 0.5, present 1) and `ra/probe_seconds`;
    a metric the probe could not determine is left out (see `ra_probe.integrations.tracker.scalars`).
    Without `trainer` (a callback made before its Trainer; set `callback.trainer` later), the metrics
    only go to `state.log_history`. `log_report`: True to also write each full JSON report to
    `<output_dir>/ra-probe/step-<step>.json`, or a folder.

    `data`: anything `ra_probe.probe` takes; its first `samples` are taken once and measured at every
    probe. `model`: which network to probe, the Trainer's model by default, an attribute path or a
    callable(model). Settings are `ra_probe.probe`'s over `DEFAULTS` (samples="auto" up to max_samples=64, k=16, align_k=8). The
    probe runs on the live weights and leaves training exactly as it was."""

    def __init__(self, data: Any, trainer: Trainer | None = None, at_evaluate: bool = True,
                 every_n_steps: int | None = None, log_report: bool | str | Path = False,
                 model: ModelPicker = None, **settings: Any):
        self.live = LiveProbe(data, model, **settings)
        self.trainer, self.at_evaluate, self.every_n_steps = trainer, at_evaluate, every_n_steps
        self.log_report = log_report
        self.probed_step: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.probed_step = None
        self.probe(args, state, control, kwargs["model"])

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.probe(args, state, control, kwargs["model"])

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.at_evaluate:
            self.probe(args, state, control, kwargs["model"])

    def probe(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any) -> None:
        """Probe now and log at `state.global_step` (once per step)."""
        if not state.is_world_process_zero or self.probed_step == state.global_step:
            return
        self.probed_step = state.global_step
        report, metrics = self.live(model)
        self.log(state, control, metrics)
        if self.log_report:
            folder = Path(args.output_dir) / "ra-probe" if self.log_report is True else self.log_report
            save_report(report, folder, state.global_step)

    def log(self, state: TrainerState, control: TrainerControl, metrics: Metrics) -> None:
        if self.trainer is None:
            state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
            return
        should_log = control.should_log  # the Trainer's own log due at this step still happens
        self.trainer.log(dict(metrics))
        control.should_log = should_log
