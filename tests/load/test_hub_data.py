"""Hugging Face datasets as data (hf-data/<org>/<name>), read offline from files laid out as the Hub's
cache lays them out, and the real data of its domain a model is probed on when no data is named."""
import io
import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers as tf
from conftest import TINY
from PIL import Image
from tiny_models import hf_config, saved

import ra_probe
from ra_probe.errors import UserError
from ra_probe.load.classes import cifar, imagenet_1k, rows_by_name
from ra_probe.load.data import load_samples
from ra_probe.load.defaults import CIFAR, IMAGENETTE, SST2, WIKITEXT, default_data
from ra_probe.load.models import load_model
from ra_probe.load.samples import Samples
from ra_probe.sweeps.spec import read_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"
IMAGENETTE_NAMES = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                    "garbage truck", "gas pump", "golf ball", "parachute"]
IMAGENETTE_ROWS = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]  # ImageNet-1k's rows of these classes
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "residual", "branch", "aligns", "sites", "good", "bad"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hub cache, offline: what is not put in it cannot be had."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put(cache: Path, repo: str, config: str, split: str, columns: dict, features: dict) -> Path:
    """One parquet shard of a dataset's conversion (branch refs/convert/parquet) in the Hub's cache layout,
    the dataset's features in the schema's "huggingface" metadata as `datasets` writes them; row groups
    of 7 rows, so a slice spans several."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs" / "refs" / "convert").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "refs" / "convert" / "parquet").write_text(COMMIT)
    path = folder / "snapshots" / COMMIT / config / split / "0000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path, row_group_size=7)
    return path


def png(value: int, size=(10, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def image_set(cache: Path, repo: str, config: str, split: str, names: list[str], per_class: int) -> list[int]:
    """`per_class` images of each class, in class order; image of class c is one grey level, 20 + 20c."""
    labels = [c for c in range(len(names)) for _ in range(per_class)]
    put(cache, repo, config, split, {"image": [{"bytes": png(20 + 20 * c), "path": f"{c}.png"} for c in labels],
                                     "label": labels},
        {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}})
    return labels


def grey_level(pixels: torch.Tensor) -> int:
    """The grey level of a constant image back from timm's ImageNet normalization (red channel)."""
    return round(float((pixels[0].mean() * 0.229 + 0.485) * 255))


@pytest.fixture(scope="module")
def resnet():
    return load_model("timm/resnet18", pretrained=False, input_shape=(3, 16, 16))


def test_a_dataset_slice_is_read_offline_class_balanced_seeded_and_only_its_rows(hub, resnet, monkeypatch):
    image_set(hub, "frgfm/imagenette", "320px", "validation", IMAGENETTE_NAMES, per_class=4)
    groups = []
    read = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, g, **kw: groups.append(g) or read(self, g, **kw))
    samples = load_samples("hf-data/frgfm/imagenette:320px@validation", resnet, limit=20, seed=0)
    assert samples.inputs.shape == (20, 3, 16, 16)
    rows = samples.labels.tolist()
    assert sorted(rows) == sorted(IMAGENETTE_ROWS * 2)  # two of each class: the names landed on ImageNet's rows
    assert sorted(rows[:10]) == IMAGENETTE_ROWS  # any first rows are balanced too (the null's)
    # each image is its own label's: grey level 20 + 20c for the class c at row IMAGENETTE_ROWS[c]
    assert [grey_level(x) for x in samples.inputs] == [20 + 20 * IMAGENETTE_ROWS.index(r) for r in rows]
    assert samples.description == "frgfm/imagenette 320px validation, 20 images in 10 classes"
    assert samples.source == {"dataset": "frgfm/imagenette", "config": "320px", "split": "validation",
                              "revision": COMMIT, "file": "320px/validation/0000.parquet", "column": "image",
                              "label_column": "label"}
    again = load_samples("hf-data/frgfm/imagenette:320px@validation", resnet, limit=20, seed=0)
    other = load_samples("hf-data/frgfm/imagenette:320px@validation", resnet, limit=20, seed=1)
    assert torch.equal(again.labels, samples.labels) and not torch.equal(other.labels, samples.labels)
    groups.clear()
    load_samples("hf-data/frgfm/imagenette:320px", resnet, limit=2, seed=0)  # the split found: validation
    assert len(groups) == 1 and len(groups[0]) <= 2  # of the 6 row groups, only those of the 2 rows


def test_wnid_labels_land_on_imagenet_rows_and_unknown_names_are_refused(hub, resnet):
    image_set(hub, "me/wnids", "default", "train", ["n01440764", "n03888257"], per_class=2)
    samples = load_samples("hf-data/me/wnids", resnet, seed=0)  # config default, split: the first there is
    assert sorted(samples.labels.tolist()) == [0, 0, 701, 701]
    image_set(hub, "me/odd", "default", "test", ["n01440764", "teapot", "crane"], per_class=1)
    # "crane" is two ImageNet rows (a bird, a machine): not one row, so not mapped
    with pytest.raises(UserError, match=r"^data 'hf-data/me/odd': 1 of its 3 class names \(crane\) are not rows of "
                                        r"timm/resnet18's 1000-class classifier$"):
        load_samples("hf-data/me/odd", resnet)
    assert rows_by_name(["Teapot", "golden_retriever", "n02099601"], resnet) == [849, 207, 207]


def test_a_classifier_that_does_not_name_its_rows_takes_the_dataset_ids_when_the_counts_agree(hub):
    conv = load_model(f"{TINY}:conv_net")  # 4 rows, no names
    image_set(hub, "me/four", "default", "validation", ["a", "b", "c", "d"], per_class=2)
    samples = load_samples("hf-data/me/four", conv, seed=0)
    assert sorted(samples.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert "labels as rows in the dataset's order" in samples.description
    put(hub, "me/four", "default", "test", {"image": [{"bytes": png(20), "path": None}] * 3, "label": [-1, 2, -1]},
        {"image": {"_type": "Image"}, "label": {"names": ["a", "b", "c", "d"], "_type": "ClassLabel"}})
    assert load_samples("hf-data/me/four@test", conv).labels.tolist() == [2]  # -1: no label, not the last row
    put(hub, "me/four", "default", "test", {"image": [{"bytes": png(20), "path": None}] * 2, "label": [-1, -1]},
        {"image": {"_type": "Image"}, "label": {"names": ["a", "b", "c", "d"], "_type": "ClassLabel"}})
    hidden = load_samples("hf-data/me/four@test", conv)
    assert hidden.labels is None and len(hidden) == 2 and "the split's labels are hidden" in hidden.description
    image_set(hub, "me/three", "default", "validation", ["a", "b", "c"], per_class=2)
    with pytest.raises(UserError, match="3 of its 3 class names"):
        load_samples("hf-data/me/three", conv)


def test_bad_references_and_missing_files_are_one_line(hub, resnet):
    for ref, message in (("hf-data/", "expected hf-data/<org>/<name>"),
                         ("hf-data/a/b/c", "expected hf-data/<org>/<name>"),
                         ("hf-data/me/none", r"^hf-data/me/none \(default, validation/test/train\) is not in the local "
                                             "cache and the Hugging Face Hub cannot be reached$"),
                         ("hf-data/me/none:x@dev", r"\(x, dev\) is not in the local cache")):
        with pytest.raises(UserError, match=message):
            load_samples(ref, resnet)
    put(hub, "me/words", "default", "test", {"text": ["a b"]}, {"text": {"_type": "Value", "dtype": "string"}})
    with pytest.raises(UserError, match=r"^data 'hf-data/me/words' has no image column for timm/resnet18 \(columns: text\)$"):
        load_samples("hf-data/me/words", resnet)


def with_tokenizer(config, folder: Path, **labels) -> str:
    """A tiny model of `config` saved with a WordPiece tokenizer of WORDS (id = position in WORDS)."""
    for key, value in labels.items():
        setattr(config, key, value)
    saved(config, folder)
    (folder / "vocab.txt").write_text("\n".join(WORDS))
    tf.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)  # vocab_file= is ignored by transformers 5
    return str(folder)


SENTENCES = ["the good branch", "the bad sites", "good good", "bad", "the residual branch aligns", "bad bad sites"]
SENTIMENT = [1, 0, 1, 0, 1, 0]


def sst2(cache: Path) -> None:
    put(cache, "nyu-mll/glue", "sst2", "validation",
        {"sentence": SENTENCES, "label": SENTIMENT, "idx": list(range(6))},
        {"sentence": {"_type": "Value", "dtype": "string"},
         "label": {"names": ["negative", "positive"], "_type": "ClassLabel"}, "idx": {"_type": "Value", "dtype": "int32"}})


def test_text_classifier_by_default_reads_sst2_sentences_through_its_tokenizer_with_its_labels(hub, tmp_path):
    sst2(hub)
    folder = with_tokenizer(hf_config("bert"), tmp_path / "bert", id2label={0: "NEGATIVE", 1: "POSITIVE"},
                            label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = load_model(folder)
    assert default_data(model) is SST2
    samples = load_samples(None, model, limit=4, seed=0)
    assert samples.reason == "the default for text encoders and classifiers" and samples.name == SST2.ref
    ids = samples.inputs["input_ids"]
    # each sentence through the tokenizer: [CLS] words [SEP], padded to the longest; its label with it
    for row, label in zip(ids.tolist(), samples.labels.tolist()):
        words = [WORDS[i] for i in row if i not in (0, 2, 3)]
        sentence = SENTENCES.index(" ".join(words))
        assert row[0] == 2 and label == SENTIMENT[sentence]
    assert sorted(samples.labels.tolist()) == [0, 0, 1, 1]
    # a classifier that names its two rows otherwise reads the sentences unlabelled, and is told why
    other = load_model(with_tokenizer(hf_config("bert"), tmp_path / "nli", id2label={0: "entail", 1: "contradict"},
                                      label2id={"entail": 0, "contradict": 1}))
    unlabelled = load_samples(None, other, limit=4)
    assert unlabelled.labels is None
    assert unlabelled.description == ("nyu-mll/glue sst2 validation, 4 texts (its labels unused: 2 of its 2 class names "
                                      "(negative, positive) are not rows of " + str(tmp_path / "nli") +
                                      "'s 2-class classifier)")


def test_causal_lm_by_default_reads_windows_of_wikitext(hub, tmp_path):
    paragraphs = ["", " = The residual = ", " the residual branch aligns the sites the residual branch aligns \n",
                  " = = Sites = = ", " good sites good sites good sites good sites \n", " bad \n"]
    put(hub, "Salesforce/wikitext", "wikitext-2-raw-v1", "test", {"text": paragraphs},
        {"text": {"_type": "Value", "dtype": "string"}})
    model = load_model(with_tokenizer(hf_config("gpt2"), tmp_path / "gpt2"))
    assert default_data(model) is WIKITEXT
    samples = load_samples(None, model, limit=8, seed=0)
    # 8 positions: windows of 8 tokens ([CLS] 6 words [SEP]), one a paragraph; headings and " bad " passed over
    windows = sorted(samples.inputs["input_ids"].tolist())
    assert windows == [[2, 5, 6, 7, 8, 5, 9, 3], [2, 10, 9, 10, 9, 10, 9, 3]]
    assert samples.inputs["attention_mask"].tolist() == [[1] * 8] * 2 and samples.labels is None
    assert samples.description == "Salesforce/wikitext wikitext-2-raw-v1 test, 2 windows of 8 tokens of running text"
    assert samples.reason == "the default for causal language models"


def test_the_domain_of_a_model_is_told_carefully(tmp_path):
    assert imagenet_1k(load_model("timm/resnet18", pretrained=False))  # tag a1_in1k, 1000 classes
    assert not imagenet_1k(_timm(num_classes=10))  # the same tag, another head
    vit = hf_config("vit")
    vit.num_labels = 1000  # unnamed rows (LABEL_n): ImageNet-1k's by count
    assert imagenet_1k(load_model(saved(vit, tmp_path / "vit1000")))
    vit.id2label = {i: f"kind {i}" for i in range(1000)}  # 1000 rows named otherwise: not ImageNet's
    vit.label2id = {v: k for k, v in vit.id2label.items()}
    assert not imagenet_1k(load_model(saved(vit, tmp_path / "other1000")))
    cifar10 = hf_config("vit")
    cifar10.id2label = dict(enumerate(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                       "truck"]))
    cifar10.label2id = {v: k for k, v in cifar10.id2label.items()}
    model = load_model(saved(cifar10, tmp_path / "c10"))
    assert cifar(model) == 10 and default_data(model) is CIFAR[10]
    assert default_data(load_model(saved(hf_config("vit"), tmp_path / "three"))) is None  # 3 unnamed rows
    assert default_data(load_model("timm/resnet18", pretrained=False)) is IMAGENETTE


def _timm(num_classes: int):
    import timm

    from ra_probe.load.preprocessing import module_loaded

    return module_loaded(timm.create_model("resnet18", num_classes=num_classes), "resnet18", "module")


def test_no_data_and_no_cached_default_offline_is_one_line_exit_2(cli, hub):
    code, out, err = cli("timm/resnet18", "--no-pretrained", "--input-shape", "3,16,16", "--samples", "2")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: hf-data/frgfm/imagenette (320px, validation) is not in the local cache and the "
                          "Hugging Face Hub cannot be reached (timm/resnet18's default data: the default for "
                          "ImageNet-1k classifiers); pass --data: ")
    code, _, err = cli(f"{TINY}:conv_net", "--samples", "2")  # a model of no known domain: no noise in silence
    assert code == 2 and err.startswith("error: no default data: ") and "pass --data" in err and err.count("\n") == 1


def test_an_imagenet_model_is_probed_by_default_on_imagenette_with_the_null_on_the_same_images(cli, hub):
    image_set(hub, "frgfm/imagenette", "320px", "validation", IMAGENETTE_NAMES, per_class=2)
    code, out, err = cli("timm/resnet18", "--no-pretrained", "--input-shape", "3,16,16", "--samples", "20", "--k", "2",
                         "--null-samples", "2", "--json", "r.json", "--no-cache")
    assert code == 0, err
    report = json.loads(Path("r.json").read_text())
    assert report["data"]["name"] == IMAGENETTE.ref and report["data"]["synthetic"] is False
    assert report["data"]["description"] == "frgfm/imagenette 320px validation, 20 images in 10 classes"
    assert report["data"]["reason"] == "the default for ImageNet-1k classifiers"
    assert report["data"]["source"]["revision"] == COMMIT
    assert "data: frgfm/imagenette 320px validation, 20 images in 10 classes: the default for ImageNet-1k" \
        in " ".join(out.split())  # the console wraps at its width
    assert report["metrics"]["nc"]["labels_from"] == "data" and report["metrics"]["nc"]["classes"] == 10
    assert "caveat" not in report["verdict"]["evidence"]["ra"]
    assert report["metrics"]["null"]["samples"] == 2 and out.rstrip().endswith("NC " + report["verdict"]["nc"])


def test_a_report_on_synthetic_inputs_says_in_its_verdict_it_is_a_smoke_test(cli):
    report = ra_probe.probe("bundled/fc-digits", "synthetic", samples=8, k=2, null="none")
    assert report["data"]["synthetic"] is True and report["data"]["description"] == "8 Gaussian inputs of shape (64,)"
    for key in ("ra", "nc"):
        assert report["verdict"]["evidence"][key]["caveat"].startswith("synthetic inputs (random, not data): a smoke "
                                                                       "test of the model, not a diagnosis")
    code, out, _ = cli("bundled/fc-digits", "--data", "synthetic", "--samples", "8", "--k", "2", "--null", "none")
    assert code == 0 and "caveat: synthetic inputs" in out
    assert out.rstrip().splitlines()[-1].endswith("(synthetic inputs: a smoke test, not a diagnosis)")
    real = ra_probe.probe("bundled/fc-digits", samples=8, k=2, null="none")
    assert "caveat" not in real["verdict"]["evidence"]["ra"] and real["data"]["synthetic"] is False
    assert real["data"]["reason"].startswith("the data the bundled model was trained on")


def test_sweep_files_and_the_library_take_a_dataset_reference(hub, tmp_path, resnet):
    (tmp_path / "sweep.toml").write_text('data = "hf-data/frgfm/imagenette:320px"\n[[run]]\nmodel = "timm/resnet18"\n')
    assert read_spec(tmp_path / "sweep.toml").runs[0].data == "hf-data/frgfm/imagenette:320px"  # not a local file
    image_set(hub, "frgfm/imagenette", "320px", "validation", IMAGENETTE_NAMES, per_class=1)
    report = ra_probe.probe(resnet, "hf-data/frgfm/imagenette:320px", samples=10, k=2, null="none")
    assert report["data"]["labelled"] and report["data"]["description"].endswith("10 images in 10 classes")


def test_the_report_says_what_the_samples_are_to_the_model():
    x = torch.zeros(2, 3)
    assert Samples(x, None, "synthetic").kind == "synthetic"
    assert Samples(x, None, "bundled/digits").kind == "held-out"  # the bundled models' test split
    assert Samples(x, None, "hf-data/a/b", source={"split": "validation"}).kind == "held-out"
    assert Samples(x, None, "hf-data/a/b", source={"split": "train"}).kind == "training"
    assert Samples(x, None, "images/").kind == "given"
