"""Model sources, one module each, asked in this order for a model spec (registry.py: the `Source`
record, `LoadingOptions`, `register_source`, sources installed through an entry-point group).

bundled.py      bundled/<name>: the trained demo models shipped with ra-probe
timm_models.py  timm/<name>: timm's models, pretrained or at random init
huggingface.py  hf/<org>/<name>: transformers models from the Hub, split across devices with device_map
folder.py       a local Hugging Face or timm model folder
checkpoint.py   a checkpoint file loaded into the architecture --arch names
factory.py      file.py:fn or package.module:fn, a function that returns a module"""
from ra_probe.load.sources import bundled, checkpoint, factory, folder, huggingface, timm_models
from ra_probe.load.sources.registry import BUILT_IN, LoadingOptions, Source, load, register_source

BUILT_IN[:] = [m.SOURCE for m in (bundled, timm_models, huggingface, folder, checkpoint, factory)]

__all__ = ["LoadingOptions", "Source", "load", "register_source"]
