"""Probing during training: the plain-loop Tracker, the Lightning and Hugging Face callbacks. A short run
of the bundled FC ResNet recipe on digits (width 64, 4 blocks, 700 samples, 4 epochs of 11 steps), in
which RA2 alignment roughly doubles; every run is compared with the same run without the probe."""
from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ra_probe
from ra_probe.integrations.tracker import LiveProbe, preserved_rng, scalars
from ra_probe.load.bundled.digits import load_split
from ra_probe.load.bundled.fcresnet import FCResNet

EPOCHS, BATCH, TRAIN = 4, 64, 700
STEPS = -(-TRAIN // BATCH)  # optimizer steps per epoch
PROBED = [STEPS * epoch for epoch in range(EPOCHS + 1)]  # before training, then after each epoch
LOGGED = {"ra/depth", "ra/alignment", "ra/linearity", "ra/mean_sigma1", "ra/L_times_mean_sigma1", "nc/nc1", "nc/nc2_equinorm_means",
          "nc/nc2_equiangular", "nc/nc3", "nc/nc4", "ra/verdict", "nc/verdict", "ra/probe_seconds"}
ALWAYS = LOGGED - {"ra/verdict", "nc/verdict"}  # an undetermined verdict (NC at init, near its thresholds) is not logged


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    x, y, x_val, y_val = (torch.from_numpy(a) for a in load_split())
    return x[:TRAIN], y[:TRAIN], (x_val[:64], y_val[:64])  # NC needs 5 samples a class on average


def network() -> nn.Module:
    return FCResNet(width=64, depth=4)


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-3)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    """Parameters and buffers (BatchNorm running statistics) bit for bit."""
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    assert all(torch.equal(left[name], right[name]) for name in left)


def assert_alignment_grows(history: list[dict]) -> None:
    start, end = history[0]["ra/alignment"], history[-1]["ra/alignment"]
    assert end > start + 0.02, (start, end)


def train_plain(digits, tracker_of=None):
    """The plain loop; `tracker_of(model)` gives a Tracker stepped before training and after each epoch."""
    x, y, _ = digits
    torch.manual_seed(0)
    model = network()
    opt = optimizer(model.parameters())
    tracker = tracker_of(model) if tracker_of else None
    step = 0
    for epoch in range(EPOCHS + 1):
        if tracker:
            tracker.step(step)
        if epoch == EPOCHS:
            break
        model.train()
        for idx in torch.randperm(TRAIN).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
    return model, tracker


def reference(name: str) -> ra_probe.Report:
    return ra_probe.load_report(Path(__file__).parents[2] / "examples" / "reports" / f"{name}.json")


def test_scalars_of_reports():
    report = reference("fc-digits")  # RA and NC present; the first site's rank reaches k
    metrics, values = report.metrics, scalars(report)
    # mean and largest rank are undetermined (the first site's rank reaches k)
    bounds = {f"{name}_{end}" for name in ("ra/alignment", "ra/linearity", "ra/median_rank", "ra/rank_share",
                                           "ra/L_times_mean_sigma1", "nc/nc1", "nc/nc2_equinorm_means",
                                           "nc/nc2_equiangular", "nc/nc3", "nc/nc4") for end in ("low", "high")}
    assert set(values) == LOGGED - {"ra/probe_seconds"} | {"ra/median_rank", "ra/rank_share"} | bounds
    assert [values["ra/alignment_low"], values["ra/alignment_high"]] == metrics["ra2"]["mean_score_ci"]
    assert values["ra/alignment"] == metrics["ra2"]["mean_score"] > 0.5
    assert values["ra/linearity"] == metrics["ra1"]["mean_linearity"]
    assert values["ra/median_rank"] == 9.0  # the median of 14, 10, 9, 9, 9, 9, 9
    assert values["ra/L_times_mean_sigma1"] == metrics["ra4"]["L_times_mean_sigma1"]
    assert values["ra/depth"] == 8 and values["ra/rank_share"] == metrics["ra3"]["share_rank_le_classes"]
    assert values["ra/mean_sigma1"] == pytest.approx(sum(s["sigma1_mean"] for s in metrics["ra4"]["sites"]) / 8)
    assert all(values[f"nc/{name}"] == metrics["nc"][name] for name in
               ("nc1", "nc2_equinorm_means", "nc2_equiangular", "nc3", "nc4"))
    assert values["ra/verdict"] == values["nc/verdict"] == 1.0
    lowwd = scalars(reference("fc-digits-lowwd"))  # RA absent, every rank reaches k
    assert lowwd["ra/verdict"] == 0.0 and "ra/median_rank" not in lowwd
    nc = {"nc/nc1", "nc/nc2_equinorm_means", "nc/nc2_equiangular", "nc/nc3", "nc/nc4"}
    assert set(scalars(reference("fc-digits-noskip"))) == {  # no residual sites: RA not applicable
        "ra/depth", "nc/verdict", *nc, *(f"{name}_{end}" for name in nc for end in ("low", "high"))}
    partial = ra_probe.Report(dict(report, verdict={**report["verdict"], "nc": "partial"}))
    assert scalars(partial)["nc/verdict"] == 0.5


def test_tracker_history_and_training_unperturbed(digits):
    logged = []
    shuffled = DataLoader(TensorDataset(*digits[2]), batch_size=8, shuffle=True)  # draws from torch's RNG
    tracked, tracker = train_plain(digits, lambda model: ra_probe.Tracker(
        model, shuffled, log=lambda metrics, step: logged.append((step, metrics))))
    plain, _ = train_plain(digits)
    assert_same_weights(tracked, plain)
    assert [h["step"] for h in tracker.history] == PROBED
    assert [step for step, _ in logged] == PROBED
    assert all(ALWAYS <= set(h) for h in tracker.history)
    assert logged[-1][1] == {k: v for k, v in tracker.history[-1].items() if k != "step"}
    assert tracker.report.metrics["ra2"]["mean_score"] == tracker.history[-1]["ra/alignment"]
    assert "ra/verdict" in tracker.history[-1]  # trained: RA decided (NC, near its thresholds after 4 epochs, is not)
    assert_alignment_grows(tracker.history)


def test_import_never_loads_lightning():
    code = "import ra_probe, sys; ra_probe.Tracker; assert 'lightning' not in sys.modules and " \
           "'pytorch_lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_states_preserved():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with preserved_rng():
        draws()
    assert draws() == expected


def test_network_picked():
    owner = SimpleNamespace(net=network())
    assert LiveProbe(None).network(owner) is owner
    assert LiveProbe(None, model="net.blocks").network(owner) is owner.net.blocks
    assert LiveProbe(None, model=lambda o: o.net.head).network(owner) is owner.net.head


def lightning_classifier():
    """The test network as a LightningModule (`net`), trained with cross-entropy."""
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = network()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return optimizer(self.parameters())

    return Classifier()


def fit_lightning(digits, folder, callbacks):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    x, y, _ = digits
    L.seed_everything(0, verbose=False)
    module = lightning_classifier()
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=CSVLogger(folder, name="run"),
                        callbacks=callbacks, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True))
    return module, trainer


def test_lightning_callback(digits, tmp_path):
    pytest.importorskip("lightning")
    from ra_probe.integrations.lightning import ResidualAlignmentCallback

    probed, trainer = fit_lightning(digits, tmp_path / "probed", [ResidualAlignmentCallback(
        digits[2], every_n_steps=2 * STEPS, log_report=True)])  # steps 22 and 44 also end an epoch: probed once)
    plain, _ = fit_lightning(digits, tmp_path / "plain", [])
    assert_same_weights(probed, plain)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f) if row["ra/alignment"]]
    assert [int(row["step"]) for row in rows] == PROBED
    assert all(ALWAYS <= set(row) for row in rows)
    assert_alignment_grows(rows)
    reports = sorted((tmp_path / "probed" / "run" / "version_0" / "ra-probe").glob("*.json"))
    assert [r.name for r in reports] == [f"step-{step:08d}.json" for step in PROBED]
    last = ra_probe.load_report(reports[-1])
    assert last["metrics"]["ra2"]["mean_score"] == pytest.approx(rows[-1]["ra/alignment"])
    assert trainer.callback_metrics["ra/alignment"].item() == pytest.approx(rows[-1]["ra/alignment"])


def test_lightning_probe_keeps_module_dtype(digits):
    pytest.importorskip("lightning")
    from ra_probe.integrations.lightning import ResidualAlignmentCallback

    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(global_rank=0, global_step=7, loggers=[logger], callback_metrics={})
    module = lightning_classifier().to(torch.bfloat16)  # probed in float32, then put back
    ResidualAlignmentCallback(digits[2]).probe(trainer, module)
    assert module.dtype == torch.bfloat16 and module.net.stem.weight.dtype == torch.bfloat16
    trainer.global_step = 8
    ResidualAlignmentCallback(digits[2], model="net").probe(trainer, module)
    assert [step for step, _ in logged] == [7, 8] and all(ALWAYS <= set(metrics) for _, metrics in logged)
    assert logged[0][1]["ra/alignment"] == logged[1][1]["ra/alignment"]  # the same network
    trainer.global_rank, trainer.global_step = 1, 9
    ResidualAlignmentCallback(digits[2]).probe(trainer, module)
    assert len(logged) == 2


def fit_transformers(digits, folder, callback=None):
    from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments
    from transformers.modeling_outputs import SequenceClassifierOutput

    class Classifier(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.net = network()

        def forward(self, x, labels=None):
            logits = self.net(x)
            loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    x, y, (x_val, y_val) = digits
    torch.manual_seed(0)
    model = Classifier(PretrainedConfig())
    args = TrainingArguments(output_dir=str(folder), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=32, eval_strategy="epoch", logging_steps=2 * STEPS,
                             lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, optimizers=(optimizer(model.parameters()), None),
                      train_dataset=[{"x": x[i], "labels": y[i]} for i in range(TRAIN)],
                      eval_dataset=[{"x": x_val[i], "labels": y_val[i]} for i in range(len(x_val))])
    if callback is not None:
        callback.trainer = trainer
        trainer.add_callback(callback)
    trainer.train()
    return model, trainer.state.log_history


def test_transformers_callback(digits, tmp_path):
    from ra_probe.integrations.transformers import ResidualAlignmentCallback

    # steps 0 (train begin), 11 and 33 (evaluations), 22 and 44 (every 22 steps, where the loss is logged too)
    probe = ResidualAlignmentCallback(digits[2], every_n_steps=2 * STEPS)
    probed, history = fit_transformers(digits, tmp_path, probe)
    plain, plain_history = fit_transformers(digits, tmp_path, None)
    assert_same_weights(probed, plain)
    rows = [entry for entry in history if "ra/alignment" in entry]
    assert [row["step"] for row in rows] == PROBED
    assert all(ALWAYS <= set(row) for row in rows)
    assert_alignment_grows(rows)
    losses = [(e["step"], e.get("loss"), e.get("eval_loss")) for e in history if "loss" in e or "eval_loss" in e]
    assert losses == [(e["step"], e.get("loss"), e.get("eval_loss")) for e in plain_history
                      if "loss" in e or "eval_loss" in e]
    assert [step for step, loss, _ in losses if loss is not None] == [2 * STEPS, 4 * STEPS]


def test_transformers_callback_without_trainer(digits):
    from transformers import TrainerControl, TrainerState

    from ra_probe.integrations.transformers import ResidualAlignmentCallback

    state, control = TrainerState(), TrainerControl()
    callback = ResidualAlignmentCallback(digits[2], model=lambda wrapper: wrapper[0])
    callback.on_train_begin(SimpleNamespace(), state, control, model=nn.Sequential(network()))
    assert [entry["step"] for entry in state.log_history] == [0] and ALWAYS <= set(state.log_history[0])
