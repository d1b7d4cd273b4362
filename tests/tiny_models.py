"""Tiny residual models for the tests, loaded as factories (`tests/tiny_models.py:conv_net`)."""
import torch
from torch import nn


class ResidualConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.branch(x)


class ConvNet(nn.Module):
    """RGB 8×8 images → 4 classes: stem conv, two residual conv blocks, pooled linear head."""

    input_shape = (3, 8, 8)
    num_classes = 4

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(ResidualConv(width), ResidualConv(width))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.branch(x)


class Headless(nn.Module):
    """A feature extractor: residual MLP blocks and no classifier head."""

    input_shape = (16,)

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualMLP(16) for _ in range(3)))

    def forward(self, x):
        return self.blocks(x)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet()


def headless() -> nn.Module:
    torch.manual_seed(0)
    return Headless()


class FlatMLP(nn.Module):
    """Residual adds written in the model's own forward, no block module; one activation module serves
    both branches."""

    input_shape = (8,)

    def __init__(self):
        super().__init__()
        self.stem, self.head, self.act = nn.Linear(8, 16), nn.Linear(16, 3), nn.ReLU()
        self.f1, self.f2, self.g1, self.g2 = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        h = self.stem(x)
        h = h + self.f2(self.act(self.f1(h)))
        h = h + self.g2(self.act(self.g1(h)))
        return self.head(h)


class FlatChain(FlatMLP):
    """Adds chained directly, a functional activation, the last add the forward's last op."""

    def forward(self, x):
        h = self.stem(x)
        h = h + self.f2(torch.relu(self.f1(h)))
        return h + self.g2(torch.relu(self.g1(h)))


class FlatTied(FlatMLP):
    """One branch's weights applied three times: x + f(x) with the same f."""

    def forward(self, x):
        h = self.stem(x)
        for _ in range(3):
            h = h + self.f2(self.act(self.f1(h)))
        return self.head(h)


class FlatFunctionalNorm(FlatMLP):
    """Pre-norm branches through a functional layer norm: no module reads the sum of the first add."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        h = self.stem(x)
        h = h + self.f2(self.act(self.f1(nn.functional.layer_norm(h, (16,), self.scale))))
        h = h + self.g2(self.act(self.g1(nn.functional.layer_norm(h, (16,), self.scale))))
        return self.head(h)


class FlatGuarded(FlatMLP):
    """A test on values in the forward (as T5's clamp of float16 overflows): not traceable by torch.fx."""

    def forward(self, x):
        h = self.stem(x)
        h = h + self.f2(self.act(self.f1(h)))
        if torch.isinf(h).any():
            h = h.clamp(-1e4, 1e4)
        return self.head(h)


class SharedBlockNet(nn.Module):
    """One residual block applied three times (shared weights, as in ALBERT)."""

    input_shape = (8,)  # with the factory's linear stem

    def __init__(self, stem: nn.Module, block: nn.Module, head: nn.Module):
        super().__init__()
        self.stem, self.block, self.head = stem, block, head

    def forward(self, x):
        h = self.stem(x)
        for _ in range(3):
            h = self.block(h)
        return self.head(h)


def shared_block() -> nn.Module:
    torch.manual_seed(0)
    return SharedBlockNet(nn.Linear(8, 16), ResidualMLP(16), nn.Linear(16, 3))


def flat_guarded() -> nn.Module:
    torch.manual_seed(0)
    return FlatGuarded()


class FlatHidden(FlatMLP):
    """Not traceable by torch.fx, and its residual add's result is read by no module (it is doubled
    into a concatenation first): an add that is found but cannot be measured."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.f2(self.act(self.f1(h)))
        if torch.isinf(h).any():
            h = h.clamp(-1e4, 1e4)
        return self.head(torch.cat([h, h], dim=-1))


def flat_hidden() -> nn.Module:
    torch.manual_seed(0)
    return FlatHidden()


class FlashAttentionBlock(nn.Module):
    """A residual branch that calls the CPU flash-attention kernel itself, which has no forward-mode
    derivative."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q = self.proj(x).unsqueeze(1)
        return x + torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0].squeeze(1)


class FlashNet(nn.Module):
    input_shape = (4, 8)

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(FlashAttentionBlock(8), FlashAttentionBlock(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x).mean(dim=1))


def flash_net() -> nn.Module:
    torch.manual_seed(0)
    return FlashNet()


class DeepMLP(nn.Module):
    """A stem, `depth` residual MLP blocks of width 8 in one chain, a head: a deep report."""

    input_shape = (6,)

    def __init__(self, depth: int = 60):
        super().__init__()
        self.stem, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.blocks = nn.Sequential(*(ResidualMLP(8) for _ in range(depth)))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))

class PairOut(nn.Module):
    """A block that returns (output, attention-like weights), as attention layers do."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x):
        h = self.f(x)
        return x + h, h.softmax(-1)


class DictOut(PairOut):
    def forward(self, x):
        return {"hidden_states": x + self.f(x)}


class PairIn(PairOut):
    """A block that takes a tuple (features, gate) and adds its skip inside."""

    def forward(self, pair):
        x, gate = pair
        return x + self.f(x) * gate


class OutputShapes(nn.Module):
    """Blocks returning a tuple, a dict, and one taking a tuple."""

    input_shape = (8,)

    def __init__(self):
        super().__init__()
        self.pair, self.dict, self.pair_in = PairOut(), DictOut(), PairIn()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.pair(x)
        h = self.dict(h)["hidden_states"]
        return self.head(self.pair_in((h, torch.sigmoid(h))))


class WindowAttention(nn.Module):
    """Pre-norm self-attention within windows: (B·windows, tokens, C) in and out."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return x + self.proj((q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1) @ v)


class Windowed(nn.Module):
    """4×4 feature maps cut into four 2×2 windows whose tokens attend to each other: every tensor inside
    the window blocks holds four rows per sample (as Swin, HaloNet, SAM's ViT do)."""

    input_shape = (4, 4, 4)

    def __init__(self, width: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(WindowAttention(width), WindowAttention(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        b, c, h, w = x.shape
        windows = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, 4, c)
        return self.head(self.blocks(windows).reshape(b, 16, c).mean(1))


class ShortcutBlock(nn.Module):
    """A block whose skip its caller computes and passes in (as DLA's trees do)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(cin, cout), nn.Tanh(), nn.Linear(cout, cout))

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        out = self.f(x)
        out += shortcut
        return torch.relu(out)


class ShortcutTree(nn.Module):
    input_shape = (6,)

    def __init__(self):
        super().__init__()
        self.project = nn.Linear(6, 8)
        self.tree1, self.tree2 = ShortcutBlock(6, 8), ShortcutBlock(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.tree2(self.tree1(x, self.project(x))))


HF_TEXT = {"vocab_size": 40, "max_position_embeddings": 8}
HF_LAYERS = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def hf_config(family: str):
    """The config of a tiny transformers model of `family` (bert, gpt2, llama, vit, resnet), two layers."""
    import transformers as tf

    return {
        "bert": lambda: tf.BertConfig(**HF_TEXT, **HF_LAYERS, architectures=["BertForSequenceClassification"]),
        "gpt2": lambda: tf.GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                      eos_token_id=0, architectures=["GPT2LMHeadModel"]),
        "llama": lambda: tf.LlamaConfig(**HF_TEXT, **HF_LAYERS, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                                        architectures=["LlamaForCausalLM"]),
        "vit": lambda: tf.ViTConfig(image_size=8, patch_size=4, num_channels=1, **HF_LAYERS, num_labels=3,
                                    architectures=["ViTForImageClassification"]),
        "resnet": lambda: tf.ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1],
                                          layer_type="basic", num_labels=3,
                                          architectures=["ResNetForImageClassification"]),
    }[family]()


def saved(config, folder) -> str:
    """A model of `config`'s first architecture, seeded, saved to `folder` (a local Hugging Face folder)."""
    import transformers as tf

    torch.manual_seed(0)
    getattr(tf, config.architectures[0])(config).save_pretrained(folder)
    return str(folder)
