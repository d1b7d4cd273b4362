"""Offloading, all of it: models placed across devices with a `device_map` and whose weights accelerate
offloads ("disk", or "cpu" beside a GPU). Such a weight stands on the `meta` device and lives in its
module's hook's `weights_map` (CPU memory or files); the hook streams it onto the execution device for
each forward and back to meta after it. torch.func cannot transform that streaming (the hook reads
storage pointers of tensors that have none under a transform), so while a site's Jacobian products run
its block's weights are made resident and its hooks stop streaming; after, they stand on meta again:
one block's weights at a time. `offloading(model)` answers what a probe asks of a model (whether it is
offloaded, a site's block resident, the largest such block, the bytes on its devices, its whole state
dict); `block_device` says where a block computes. accelerate is imported only for a model it offloaded."""
from __future__ import annotations

import gc
import json
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ra_probe.errors import UserError, first_line


def parsed_device_map(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """A device map as `from_pretrained` takes it: a strategy name, or a {module: device} map (given as
    a dict or as JSON text); accelerate must be installed."""
    from importlib.util import find_spec

    if find_spec("accelerate") is None:
        raise UserError("device_map needs accelerate: pip install 'ra-probe[big]'")
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise UserError(f"device_map is not a JSON map of module to device: {first_line(exc)}") from None
    if isinstance(value, dict):
        if not all(isinstance(k, str) and isinstance(v, (str, int, torch.device)) for k, v in value.items()):
            raise UserError("device_map must map module names to devices (\"cpu\", 0, \"cuda:1\"…)")
        return value
    if value not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise UserError(f"device_map must be auto, balanced, balanced_low_0, sequential or a JSON map, got {value!r}")
    return value


def offload_folder() -> str:
    """A new temporary folder for the weights accelerate writes when it offloads to disk ones it cannot
    read from the model's own safetensors files (other formats, converted weights); under $TMPDIR."""
    return tempfile.mkdtemp(prefix="ra-probe-offload-")


def keep_while_used(folder: str, module: nn.Module) -> None:
    """`folder` removed at once when nothing was written to it, else when `module` is collected (or
    at exit): its hooks read offloaded weights from it."""
    if not any(Path(folder).iterdir()):
        Path(folder).rmdir()
    else:
        weakref.finalize(module, shutil.rmtree, folder, ignore_errors=True)


def _hooks(module: nn.Module) -> tuple[Any, ...]:
    """The accelerate hooks of `module` itself (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    return () if hook is None else tuple(getattr(hook, "hooks", (hook,)))


def _own_streaming_hooks(module: nn.Module) -> list[Any]:
    return [hook for hook in _hooks(module)
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None]


def streaming_hooks(module: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(module, hook) for every module under `module` whose accelerate hook streams offloaded weights."""
    return [(sub, hook) for sub in module.modules() for hook in _own_streaming_hooks(sub)]


def offloaded(model: nn.Module) -> bool:
    """Whether some of `model`'s weights are offloaded (on meta, streamed in by accelerate's hooks)."""
    return bool(streaming_hooks(model))


def dispatched(model: nn.Module) -> bool:
    """Whether accelerate dispatched `model` across devices (its forward moves activations between them)."""
    return hasattr(model, "_hf_hook")


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate's hooks run `module` (or the first of its submodules that has one) on."""
    for sub in module.modules():
        for hook in _hooks(sub):
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
    return None


@dataclass(frozen=True)
class Streamed:
    """One tensor an accelerate hook streams: `name` as in the hook's `weights_map`, held in
    `slots[leaf]` (a module's `_parameters` or `_buffers`) of the submodule at `path`."""

    path: str
    hook: Any
    name: str
    slots: dict[str, Any]
    leaf: str


def _streamed(module: nn.Module) -> Iterator[Streamed]:
    """Every tensor the accelerate hooks of `module` and its submodules stream (as their pre_forward
    takes them)."""
    for path, sub in module.named_modules():
        for hook in _own_streaming_hooks(sub):
            # only accelerate puts streaming hooks on a model: a model without them never needs it installed
            from accelerate.utils import named_module_tensors

            for name, _ in named_module_tensors(sub, include_buffers=hook.offload_buffers,
                                                recurse=hook.place_submodules, remove_non_persistent=True):
                owner_path, _, leaf = name.rpartition(".")
                owner = sub.get_submodule(owner_path)
                slots = owner._parameters if leaf in owner._parameters else owner._buffers
                yield Streamed(path, hook, name, slots, leaf)


@contextmanager
def resident(model: nn.Module, paths: list[str]) -> Iterator[None]:
    """Within: the offloaded weights of the modules at `paths` stand on their execution device, in the
    dtype of their meta placeholders (the probe's), and their hooks do not stream; on exit the
    placeholders and the hooks are as they were."""
    streamed = [tensor for path in paths for tensor in _streamed(model.get_submodule(path))]
    swapped: list[tuple[Streamed, Any]] = []
    try:
        for tensor in streamed:
            placeholder = tensor.slots[tensor.leaf]
            value = tensor.hook.weights_map[tensor.name].to(device=tensor.hook.execution_device,
                                                            dtype=placeholder.dtype)
            swapped.append((tensor, placeholder))
            tensor.slots[tensor.leaf] = nn.Parameter(value, requires_grad=False) \
                if isinstance(placeholder, nn.Parameter) else value
            tensor.hook.offload = False
        yield
    finally:
        for tensor, placeholder in reversed(swapped):
            tensor.slots[tensor.leaf] = placeholder
        for tensor in streamed:
            tensor.hook.offload = True
        if swapped:  # what held the weights (traced fx programs) is cyclic garbage: freed now, not later
            gc.collect()


def streamed_bytes(model: nn.Module, paths: list[str], itemsize: int) -> int:
    """Bytes the offloaded weights of the modules at `paths` take when resident, at `itemsize`."""
    return itemsize * sum(t.slots[t.leaf].numel() for path in paths for t in _streamed(model.get_submodule(path)))


def resident_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers that stand on a device (not offloaded)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


class FullState(Mapping):
    """`model`'s state dict with each offloaded tensor read from its hook's `weights_map` when it is
    looked up, one at a time (for a digest of weights that never all fit in memory at once)."""

    def __init__(self, model: nn.Module):
        self.state = model.state_dict(keep_vars=True)
        self.offloaded = {f"{t.path}.{t.name}".lstrip("."): t for t in _streamed(model)}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.offloaded:  # in the dtype of its placeholder, as the model's own tensors
            tensor = self.offloaded[key]
            return tensor.hook.weights_map[tensor.name].to(self.state[key].dtype)
        return self.state[key].detach()

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


class Placed(Protocol):
    """What offloading needs of a site: its name, its block's path and the module whose side inputs it
    takes (the sites' records have these)."""

    name: str
    module_path: str
    ctx_module: str | None


def block_paths(site: Placed) -> list[str]:
    """The modules a site's branch computes with: its block, and the module whose side inputs it takes."""
    return [path for path in dict.fromkeys((site.module_path, site.ctx_module)) if path is not None]


def block_device(module: nn.Module) -> torch.device | None:
    """Where a block computes: the device of its parameters (None for a block without any), or for a
    block whose weights are offloaded (on meta), the device accelerate's hooks stream them to."""
    first = next(module.parameters(), None)
    if first is not None and first.device.type == "meta":
        return execution_device(module) or first.device
    return None if first is None else first.device


class Offloading:
    """A model's offloaded weights as a probe meets them; for a model without any, each answer is the
    plain one (nothing to make resident, its state dict as it is)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.offloaded = offloaded(model)  # some weights stand on meta, streamed in by accelerate's hooks

    def resident(self, site: Placed) -> AbstractContextManager:
        """Within: the offloaded weights of `site`'s block resident on its device (nothing to do when the
        model has none)."""
        return self._resident_site(site) if self.offloaded else nullcontext()

    @contextmanager
    def _resident_site(self, site: Placed) -> Iterator[None]:
        """A branch that computes with offloaded weights outside its block has them streamed under
        torch.func, which cannot be: one line says so."""
        with resident(self.model, block_paths(site)):
            try:
                yield
            except RuntimeError as exc:
                if "doesn't have storage" not in str(exc):
                    raise
                raise UserError(f"site {site.name}: its branch computes with offloaded weights outside its block "
                                f"{site.module_path}; place those on a device in device_map") from None

    def largest_block(self, sites: list[Placed], itemsize: int) -> int:
        """Bytes of the most offloaded weights any site makes resident at once, at `itemsize`."""
        if not self.offloaded:
            return 0
        return max((streamed_bytes(self.model, block_paths(site), itemsize) for site in sites), default=0)

    def device_bytes(self) -> int:
        """Bytes of the model's parameters and buffers that stand on a device (not offloaded)."""
        return resident_bytes(self.model)

    def state_dict(self) -> Mapping[str, torch.Tensor]:
        """The model's whole state dict, an offloaded tensor read from its hook when it is looked up."""
        return FullState(self.model)


def offloading(model: nn.Module) -> Offloading:
    """What a probe needs to know of `model`'s offloaded weights (see `Offloading`)."""
    return Offloading(model)


def held(hold: Offloading | None, site: Placed) -> AbstractContextManager:
    """Within: `site`'s offloaded weights resident, where `hold` says how (nothing to do without)."""
    return nullcontext() if hold is None else hold.resident(site)
