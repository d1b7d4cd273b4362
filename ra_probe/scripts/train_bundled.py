"""Train the bundled models: `python -m ra_probe.scripts.train_bundled [NAME ...]`.

SGD momentum 0.9, lr 0.05 with cosine decay, 500 epochs, batch 128, one CPU thread; about a minute each.
"""
from __future__ import annotations

import argparse
import math

import torch
from safetensors.torch import save_file
from torch import nn

from ra_probe.load.bundled import MODELS, WEIGHTS_DIR
from ra_probe.load.bundled.digits import load_split
from ra_probe.load.bundled.fcresnet import FCResNet

EPOCHS, BATCH, LR, SEED = 500, 128, 0.05, 0


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(name: str) -> dict:
    spec = MODELS[name]
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in load_split())
    model = FCResNet(skip=spec.skip)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(x_train)).split(BATCH):
            opt.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            sched.step()
    WEIGHTS_DIR.mkdir(exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"train_accuracy": f"{accuracy(model, x_train, y_train):.4f}",
            "test_accuracy": f"{accuracy(model, x_test, y_test):.4f}",
            "weight_decay": str(spec.weight_decay), "skip": str(spec.skip), "epochs": str(EPOCHS)}
    save_file(state, spec.weights, metadata=meta)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(MODELS), choices=list(MODELS))
    for name in parser.parse_args().names:
        print(name, train(name))


if __name__ == "__main__":
    main()
