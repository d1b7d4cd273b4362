"""The load stage: what the user names or passes, turned into a module and samples.

models.py   model references (bundled/, timm/, hf/, a folder, a checkpoint with its architecture, a
            factory) into an eval-mode module with what is known of it (`LoadedModel`)
offload.py  weights accelerate offloads (device_map "disk"): made resident one block at a time
reinit.py   the same architecture at a seeded random init: the null model a probe is contrasted with
inputs.py   what the library takes (a module, a reference, tensors, an (x, y) pair, a dict, a DataLoader)
            into a loaded model and samples
data.py     `--data` references (bundled/digits, .npz, .txt through the tokenizer, synthetic) into samples
images.py   image folders, preprocessed with the model's own data config or image processor
samples.py  the samples (inputs and labels) and their chunks for a forward
bundled/    the trained demo models, their weights and the digits they were trained on"""
