"""The load stage: what the user names or passes, turned into a module and samples.

models.py   model specs into an eval-mode module with what is known of it, through the sources
sources/    one module per source (bundled/, timm/, hf/, a folder, a checkpoint with its architecture, a
            factory) and registry.py: `Source`, `LoadingOptions`, `register_source`, installed sources
loaded.py   `LoadedModel`: a module ready to probe and what is known of its inputs
weights.py  state dicts from safetensors or torch files, loaded strictly
preprocessing.py  a model's data config, image processor or tokenizer; a bare module's input shape
audio_shape.py    a speech model's per-sample input shape
offline.py  the Hub out of reach: offline at once, and one line when something is not cached
offload.py  offloading, all of it: device maps, weights accelerate offloads made resident one block at
            a time, where a block computes, the state dict of an offloaded model
reinit.py   the same architecture at a seeded random init: the null model a probe is contrasted with
inputs.py   what the library takes (a module, a reference, tensors, an (x, y) pair, a dict, a DataLoader)
            into a loaded model and samples
data.py     `--data` references (bundled/digits, .npz, .txt, an image folder, hf-data/…, synthetic) into samples
defaults.py the data of a model's domain, taken when the user names none (Imagenette, CIFAR, WikiText-2, SST-2)
hub_data.py Hugging Face datasets (hf-data/<org>/<name>): a seeded, class-balanced slice of one parquet shard
classes.py  what a classifier's rows stand for (ImageNet-1k, CIFAR, its label names); class names onto rows
images.py   images (folders, a dataset's bytes), preprocessed with the model's own data config or image processor
text.py     text through the model's tokenizer: examples, or windows of running text
samples.py  the samples (inputs and labels) and their chunks for a forward
bundled/    the trained demo models, their weights and the digits they were trained on"""
