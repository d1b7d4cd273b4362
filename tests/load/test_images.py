"""Image folders as data: labels from class sub-folders, mixed sizes and modes, the model's own
preprocessing, and a probe on them through the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from ra_probe.errors import UserError
from ra_probe.load.data import load_samples
from ra_probe.load.models import load_model

MODES = ["RGB", "L", "RGBA", "P", "CMYK"]


def write_images(folder: Path, count: int, seed: int) -> None:
    """`count` images of varied sizes and modes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(MODES[i % len(MODES)])
        image.save(folder / f"{i}.{'jpg' if image.mode in ('CMYK', 'L') else 'png'}")


@pytest.fixture
def conv_net():
    return load_model(f"{TINY}:conv_net")


def test_class_folders_give_labels_and_mixed_images_are_preprocessed(tmp_path, conv_net):
    for index, name in enumerate(["ants", "bees", "cats"]):
        write_images(tmp_path / name, 5, seed=index)
    samples = load_samples(str(tmp_path), conv_net, limit=12, seed=0)
    assert samples.inputs.shape == (12, 3, 8, 8) and samples.inputs.dtype == torch.float32
    assert torch.isfinite(samples.inputs).all()
    assert set(samples.labels.tolist()) <= {0, 1, 2} and len(set(samples.labels.tolist())) == 3  # seeded mix
    # the same seed gives the same subset; ImageNet normalization puts values around zero
    again = load_samples(str(tmp_path), conv_net, limit=12, seed=0)
    assert torch.equal(samples.inputs, again.inputs) and torch.equal(samples.labels, again.labels)
    assert -3 < samples.inputs.mean() < 3 and samples.inputs.std() > 0.1


def test_integer_class_folders_are_classifier_rows(tmp_path, conv_net):
    write_images(tmp_path / "3", 2, seed=0)
    write_images(tmp_path / "1", 2, seed=1)
    samples = load_samples(str(tmp_path), conv_net, seed=0)
    assert sorted(samples.labels.tolist()) == [1, 1, 3, 3]


def test_flat_folder_is_unlabelled(tmp_path, conv_net):
    write_images(tmp_path, 4, seed=0)
    samples = load_samples(str(tmp_path), conv_net)
    assert samples.labels is None and samples.inputs.shape == (4, 3, 8, 8)


def test_folder_for_a_vector_model_or_mixed_layout_is_refused(tmp_path, conv_net):
    write_images(tmp_path / "a", 2, seed=0)
    with pytest.raises(UserError, match="needs an image model"):
        load_samples(str(tmp_path), load_model("bundled/fc-digits"))
    write_images(tmp_path, 1, seed=0)
    with pytest.raises(UserError, match="mixes images"):
        load_samples(str(tmp_path), conv_net)


def test_probe_on_an_image_folder_reports_labels_from_the_folders(cli, tmp_path):
    for name in ("0", "1", "2", "3"):
        write_images(tmp_path / "images" / name, 3, seed=int(name))
    code, out, err = cli("probe", f"{TINY}:conv_net", "--data", "images", "--samples", "12", "--k", "4",
                         "--json", "report.json", "--no-cache")
    assert code == 0, err
    report = json.loads(Path("report.json").read_text())
    assert {k: report["data"][k] for k in ("name", "samples", "labelled", "tokens")} == {
        "name": "images", "samples": 12, "labelled": True, "tokens": None}
    assert report["metrics"]["nc"]["labels_from"] == "data" and report["metrics"]["nc"]["classes"] == 4
    assert len(report["sites"]) == 2


def test_timm_models_use_their_own_data_config(tmp_path):
    model = load_model("timm/resnet18", pretrained=False)
    write_images(tmp_path / "a", 2, seed=0)
    write_images(tmp_path / "b", 1, seed=1)
    samples = load_samples(str(tmp_path), model)
    assert samples.inputs.shape == (3, *model.data_config["input_size"]) and sorted(samples.labels.tolist()) == [0, 0, 1]


def test_hf_models_use_their_image_processor_and_label_names(tmp_path):
    import transformers

    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3,
                                    id2label={0: "ants", 1: "bees", 2: "cats"},
                                    label2id={"ants": 0, "bees": 1, "cats": 2})
    transformers.ResNetForImageClassification(cfg).save_pretrained(tmp_path / "model")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, image_mean=[0, 0, 0],
                                        image_std=[1, 1, 1]).save_pretrained(tmp_path / "model")
    write_images(tmp_path / "images" / "bees", 2, seed=0)
    write_images(tmp_path / "images" / "cats", 1, seed=1)
    samples = load_samples(str(tmp_path / "images"), load_model(str(tmp_path / "model")))
    assert samples.inputs.shape == (3, 3, 224, 224)
    assert 0 <= samples.inputs.min() and samples.inputs.max() <= 1  # the processor's normalization, not timm's
    assert sorted(samples.labels.tolist()) == [1, 1, 2]  # rows of the classifier, by name
