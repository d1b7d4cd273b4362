"""The data a model is measured on when the user names none: real data of its domain, a slice of a
Hugging Face dataset read through load/hub_data.py. Models of no known domain have none (the probe
stops and asks for `--data`): noise is never measured in silence."""
from __future__ import annotations

from dataclasses import dataclass

from ra_probe.load.classes import cifar, imagenet_1k
from ra_probe.load.loaded import LoadedModel


@dataclass(frozen=True)
class DefaultData:
    """A default: the data reference, why it fits the model, the conversion's commit it is read at (None:
    the newest), whether its labels must map onto the classifier's rows, and whether text is cut into
    windows of running text."""

    ref: str
    why: str
    revision: str | None = None
    labels_required: bool = True
    windows_of_text: bool = False


# Imagenette's 10 classes are ImageNet-1k rows 0, 217, 482, 491, 497, 566, 569, 571, 574, 701; its
# labels are class names ("tench", "English springer"…), mapped onto those rows by load/classes.py.
IMAGENETTE = DefaultData("hf-data/frgfm/imagenette:320px@validation", "the default for ImageNet-1k classifiers")
CIFAR = {10: DefaultData("hf-data/uoft-cs/cifar10:plain_text@test", "the default for CIFAR-10 classifiers"),
         100: DefaultData("hf-data/uoft-cs/cifar100:cifar100@test", "the default for CIFAR-100 classifiers")}
WIKITEXT = DefaultData("hf-data/Salesforce/wikitext:wikitext-2-raw-v1@test", "the default for causal language models",
                       windows_of_text=True)
# labels only where the classifier's own names are SST-2's (negative, positive): other classifiers read the
# sentences as real text of their domain, unlabelled
SST2 = DefaultData("hf-data/nyu-mll/glue:sst2@validation", "the default for text encoders and classifiers",
                   labels_required=False)
CAUSAL_LM = ("ForCausalLM", "LMHeadModel")  # transformers' class names of causal language models end so


def default_data(model: LoadedModel) -> DefaultData | None:
    """The default data of `model`'s domain: Imagenette for ImageNet-1k classifiers, the CIFAR test sets
    for CIFAR classifiers, WikiText-2 for causal language models, SST-2's sentences for other text models;
    None when its domain is not known."""
    if model.modality == "image":
        if imagenet_1k(model):
            return IMAGENETTE
        classes = cifar(model)
        return CIFAR[classes] if classes else None
    if model.modality == "text":
        return WIKITEXT if type(model.module).__name__.endswith(CAUSAL_LM) else SST2
    return None


def domain_unknown(model: LoadedModel) -> str:
    """Why `model` has no default data, in words."""
    if model.modality == "image":
        classes = f"{model.num_classes}-class" if model.num_classes else "headless"
        return (f"{model.name} is a {classes} image model, neither an ImageNet-1k classifier (by its timm tag or "
                "label names) nor a CIFAR one")
    return f"no real data is known for {model.name} ({model.modality} inputs)"
