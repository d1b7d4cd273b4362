"""The runtime strategy of the generic detector, for modules torch.fx cannot trace (`**kwargs`,
data-dependent Python, decorated transformers layers): the real forward runs once under a
TorchFunctionMode that records which values each operation computed from which (tensor provenance),
while module hooks say whose own forward is running. An add `a + b` in a module M's own forward is a
residual site when one operand s is a value the forward exposes (M's input, or a child's input or
output) and the other depends on s through a parametric operation and on M's input only through s; a
sum of s and several such branches written as several adds is one site, whose branch is their sum.

The branch F is recomputed by replaying M's real forward on its captured call with s replaced by the
new input and reading the add's other operand: no graph is extracted, so any Python the forward runs
is supported, as long as it takes the same path for the new input (same shapes)."""
from __future__ import annotations

import weakref
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from ra_probe.sites.detect.common import NORMS, name_sites, without_cache
from ra_probe.sites.records import Context, Site, Skipped, Tap, main_input, output_tensor, per_sample

ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
        torch.Tensor.__iadd__}


INPUT = object()  # where a recorded elementwise op took its input


def _is_add(func, args: tuple, kwargs: dict) -> bool:
    """An add of two tensors of the same shape (a residual add; not `x + 1`, not a broadcast bias)."""
    return (func in ADDS and len(args) == 2 and not kwargs and all(isinstance(a, torch.Tensor) for a in args)
            and args[0].shape == args[1].shape)


def _tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


@dataclass(eq=False)
class _Value:
    """One tensor value as the forward computed it (an in-place op makes a new value)."""
    seq: int
    parents: tuple[_Value, ...] = ()
    parametric: bool = False  # computed by an op that takes a parameter
    owner: str = ""  # the innermost module whose forward computed it
    op: str = ""
    call: tuple | None = None  # (op, args, kwargs) of a parameter-free op on one value, same shape, the value `INPUT`
    reads: int = 0  # how many operations, in any module, take it


@dataclass(eq=False)
class _Add:
    index: int  # the index-th add of M's own forward
    operands: tuple[_Value, _Value]
    result: _Value
    inplace: bool


@dataclass(eq=False)
class _Frame:
    """One call of a module: what its forward exposes and the adds it performs itself."""
    path: str
    module: nn.Module
    input: _Value | None
    exposed: dict[_Value, Tap] = field(default_factory=dict)
    consumers: dict[_Value, list[tuple[str, int]]] = field(default_factory=dict)  # value → children it enters
    calls: Counter = field(default_factory=Counter)
    adds: list[_Add] = field(default_factory=list)
    output: _Value | None = None
    side: dict[_Value, int | str] = field(default_factory=dict)  # side inputs: position in args[1:], or keyword
    outputs: dict[tuple[str, int], _Value] = field(default_factory=dict)  # children's outputs by call
    read: set[_Value] = field(default_factory=set)  # the values its own operations take


class _Recorder(TorchFunctionMode):
    """One forward of the model: provenance of every tensor and the adds of the modules in `targets`."""

    def __init__(self, model: nn.Module, targets: set[str]):
        super().__init__()
        self.model, self.targets = model, targets
        self.values: dict[int, _Value] = {}  # by id of a live tensor: its entry leaves when it dies
        # weak: a recorder that kept every tensor would hold all the weights an offloading hook streams in
        self.refs: list[weakref.ref] = []
        self.frames: list[_Frame] = []
        self.done: list[_Frame] = []
        self.paths = {module: path for path, module in model.named_modules()}
        self.seq = 0

    def value(self, tensor: torch.Tensor, parents=(), parametric=False, op="") -> _Value:
        self.seq += 1
        node = _Value(self.seq, tuple(parents), parametric, self.frames[-1].path if self.frames else "", op)
        self.values[id(tensor)] = node
        self.refs.append(weakref.ref(tensor, partial(self._forget, id(tensor))))
        return node

    def _forget(self, key: int, _dead: weakref.ref) -> None:
        self.values.pop(key, None)  # the tensor is gone: a later one may take its id

    def known(self, tensor: torch.Tensor) -> _Value:
        return self.values.get(id(tensor)) or self.value(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        parents = [self.values[id(t)] for t in inputs if id(t) in self.values]
        for parent in parents:
            parent.reads += 1
        frame = self.frames[-1] if self.frames else None
        operands = None
        if frame is not None and frame.path in self.targets:
            frame.read.update(parents)
        if frame is not None and frame.path in self.targets and _is_add(func, args, kwargs):
            operands = tuple(self.known(a) for a in args)
            parents = list(operands)
        versions = {id(t): t._version for t in inputs}
        out = func(*args, **kwargs)
        parametric = any(isinstance(t, nn.Parameter) for t in inputs)
        name = getattr(func, "__name__", "")
        # an op that hands back its input keeps its value (dropout in eval, contiguous()) unless it
        # wrote to it (add_, relu(inplace=True)), which makes a new value of the same tensor
        made = [self.values[id(t)] if id(t) in self.values and t._version == versions.get(id(t))
                else self.value(t, parents, parametric, name) for t in _tensors(out)]
        inplace = any(t._version != versions.get(id(t), t._version) for t in _tensors(out))
        if len(made) == 1 and len(inputs) == 1 and len(parents) == 1 and not parametric \
                and made[0] is not parents[0] and _tensors(out)[0].shape == inputs[0].shape:
            # an elementwise op a post-op may replay; not its input, whose memory a recorder holding every
            # op's would keep for the whole forward (at 2304 tokens 0.27 GB an attention block)
            made[0].call = (func, *tree_map(lambda a: INPUT if a is inputs[0] else a, (args, kwargs)))
        if operands is not None and made:
            frame.adds.append(_Add(len(frame.adds), operands, made[0], inplace))
        return out

    def pre_hook(self, module, args, kwargs):
        path = self.paths.get(module)
        if path is None:
            return
        x = main_input(args, kwargs)
        node = self.known(x) if isinstance(x, torch.Tensor) else None
        if self.frames:
            parent = self.frames[-1]
            call = parent.calls[path]
            parent.calls[path] += 1
            if node is not None:
                parent.exposed.setdefault(node, Tap(path, "input", call=call))
                parent.consumers.setdefault(node, []).append((path, call))
        frame = _Frame(path, module, node)
        if node is not None:
            frame.exposed[node] = Tap(path, "input")
        for key, value in [*enumerate(args[1:]), *kwargs.items()]:
            if isinstance(value, torch.Tensor) and value is not x:
                frame.side.setdefault(self.known(value), key)
        self.frames.append(frame)

    def post_hook(self, module, args, kwargs, output):
        if not self.frames or self.frames[-1].module is not module:
            return
        frame = self.frames.pop()
        y = output_tensor(output)
        frame.output = self.known(y) if isinstance(y, torch.Tensor) else None
        if self.frames and frame.output is not None:
            parent = self.frames[-1]
            parent.exposed.setdefault(frame.output, Tap(frame.path, "output", call=parent.calls[frame.path] - 1))
            parent.outputs[frame.path, parent.calls[frame.path] - 1] = frame.output
        if frame.path in self.targets and frame.adds:
            self.done.append(frame)


def record(model: nn.Module, run, targets: set[str]) -> list[_Frame]:
    """Run the forward (`run()`) once and return the calls of the modules in `targets` that add."""
    recorder = _Recorder(model, targets)
    with ExitStack() as stack:
        for module in model.modules():
            for handle in (module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True),
                           module.register_forward_hook(recorder.post_hook, with_kwargs=True)):
                stack.callback(handle.remove)
        with torch.no_grad(), recorder:
            run()
    return recorder.done


def _flags(skip: _Value, branch: _Value, x: _Value | None) -> tuple[bool, bool, bool]:
    """Whether `branch` depends on `skip`, through a parametric op, and on `x` other than through `skip`."""
    reach, param, other = {skip: True}, {skip: False}, {skip: False}
    if x is not None and x is not skip:
        other[x] = True
    pending = [branch]
    order: list[_Value] = []
    seen = set()
    while pending:  # the values `branch` is computed from, back to `skip`
        node = pending.pop()
        if node in seen or node is skip or node.seq < min(skip.seq, x.seq if x is not None else skip.seq):
            continue
        seen.add(node)
        order.append(node)
        if node is not x:  # what the block's input was computed from lies outside the block
            pending.extend(node.parents)
    for node in sorted(order, key=lambda n: n.seq):
        reach[node] = node is not x and any(reach.get(p, False) for p in node.parents)
        param[node] = reach[node] and (node.parametric or any(param.get(p, False) for p in node.parents))
        other[node] = other.get(node, False) or any(other.get(p, False) for p in node.parents)
    return reach.get(branch, False), param.get(branch, False), other.get(branch, False)


RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "view_as", "reshape_as"}


def _reshaped(node: _Value, result: _Value) -> bool:
    """Whether `node` is `result` with only its shape changed (tokens flattened with the batch...)."""
    while node is not result:
        if node.op not in RESHAPES or len(node.parents) != 1:
            return False
        node = node.parents[0]
    return True


def _child(frame: _Frame, path: str) -> nn.Module:
    return frame.module.get_submodule(path[len(frame.path) + 1:] if frame.path else path)


def _elementwise(node: _Value, result: _Value) -> list[_Value] | None:
    """The parameter-free elementwise ops that make `node` from `result` (relu, a scale...), in order;
    None when `node` is not made that way."""
    chain = []
    while node is not result:
        if node.call is None:
            return None
        chain.append(node)
        node = node.parents[0]
    return chain[::-1]


def _replayed(chain: list[_Value]):
    """The post-op that applies the recorded ops of `chain` to a new value."""
    def post(t: torch.Tensor) -> torch.Tensor:
        for node in chain:
            func, args, kwargs = node.call
            swap = lambda a: t if a is INPUT else a  # noqa: B023, E731
            t = func(*tree_map(swap, args), **tree_map(swap, kwargs))
        return t
    return post


def _exit(frame: _Frame, result: _Value) -> tuple[Tap | None, Any, str | None]:
    """Where the add's result is read (its value, or it reshaped: a `rows` tap), and the post-op (a
    norm or parameter-free child that takes the result alone, or elementwise ops up to the block's
    output) with its name, if any."""
    consumers = frame.consumers.get(result, [])
    # a norm is the post-op only when nothing else reads the sum (pre-norm layers add it again later)
    if len(consumers) == 1 and result is not frame.output and result not in frame.read:
        path, call = consumers[0]
        child = _child(frame, path)
        if isinstance(child, NORMS) or not any(True for _ in child.parameters()):
            return Tap(path, "output", call=call), child, type(child).__name__.lower()
    if result is frame.output:
        return Tap(frame.path, "output"), None, None
    if consumers:
        return Tap(consumers[0][0], "input", call=consumers[0][1]), None, None
    chain = _elementwise(frame.output, result) if frame.output is not None else None
    if chain:
        return Tap(frame.path, "output"), _replayed(chain), "+".join(node.op for node in chain)
    if frame.output is not None and _reshaped(frame.output, result):
        return Tap(frame.path, "output", rows=True), None, None
    for node, (path, call), in ((n, c[0]) for n, c in frame.consumers.items()):
        if _reshaped(node, result):
            return Tap(path, "input", call=call, rows=True), None, None
    return None, None, None


def _roles(frame: _Frame, add: _Add) -> tuple[_Value, _Value, int | str | None] | None:
    """(site input, branch operand, where the caller passes the skip or None) of a residual add, None
    for any other add. The skip is a value the forward exposes, or a side input of the call (the
    skip some blocks get from their caller)."""
    pairs = (add.operands, add.operands[::-1])
    for skip, branch in pairs:
        reach, param, other = _flags(skip, branch, frame.input)
        if reach and param and not other and skip in frame.exposed:
            return skip, branch, None
    for skip, branch in pairs:
        if skip in frame.side and frame.input is not None and all(_flags(frame.input, branch, None)[:2]) \
                and not _flags(skip, branch, frame.input)[0]:
            return frame.input, branch, frame.side[skip]
    return None


def _side_skip(key: int | str):
    def skip(ctx: Context) -> torch.Tensor:
        return ctx["args"][key] if isinstance(key, int) else ctx["kwargs"][key]
    return skip


def _terms(add: _Add, inner: dict[_Value, _Add]) -> list[tuple[_Add, int]]:
    """The terms of the sum `add` completes, as (add, operand position): an operand that is the result of
    an `inner` add (one that only this add reads: `x + a + b` is `(x + a) + b`) stands for its terms."""
    terms = []
    for position, operand in enumerate(add.operands):
        terms.extend(_terms(inner[operand], inner) if operand in inner else [(add, position)])
    return terms


def _sum_roles(frame: _Frame, terms: list[tuple[_Add, int]]) -> tuple[_Value, list[tuple[_Add, int]]] | None:
    """(site input, branch terms) of a sum of a skip and several branches, `x + a(h) + b(h)` (parallel
    attention and MLP), where the skip is a value the forward exposes and every other term depends on
    it through a parametric op, and on the block's input only through it; None for any other sum."""
    values = [add.operands[position] for add, position in terms]
    for skip in (value for value in values if value in frame.exposed):
        branches = [term for term, value in zip(terms, values) if value is not skip]
        if len(branches) == len(terms) - 1 and all(
                reach and param and not other for reach, param, other in
                (_flags(skip, value, frame.input) for value in values if value is not skip)):
            return skip, branches
    return None


def _sums(frame: _Frame) -> dict[_Add, tuple[_Value, list[tuple[_Add, int]]]]:
    """The sums of a skip and several branches written as several adds, by their last add: (site input,
    branch terms) (see `_sum_roles`). A last add that is a residual add as it is (`x + (a + b)`) is not
    one: its branch operand is the sum already."""
    inner = {add.result: add for add in frame.adds if add.result.reads == 1 and add.result is not frame.output
             and add.result not in frame.exposed}
    sums, inside = {}, set()
    for add in reversed(frame.adds):  # the last add of a sum comes after its inner ones
        terms = [] if add in inside or _roles(frame, add) is not None else _terms(add, inner)
        roles = _sum_roles(frame, terms) if len(terms) > 2 else None
        if roles is not None:
            sums[add] = roles
            inside.update(term for term, _ in terms)
    return sums


def sites_of(frame: _Frame) -> tuple[list[Site], list[Skipped]]:
    """The residual sites of one recorded call, and the residual adds found but not usable. A sum of the
    skip and several branches (`x + a(h) + b(h)`) is one site, whose branch is the branches' sum."""
    sites, skipped = [], []
    sums = _sums(frame)
    inner = {term for _, terms in sums.values() for term, _ in terms} - set(sums)
    for add in frame.adds:
        if add in sums:
            (entry, terms), side = sums[add], None
        elif add in inner or (roles := _roles(frame, add)) is None:
            continue
        else:
            entry, branch, side = roles
            terms = [(add, add.operands.index(branch))]
        exit, post, post_name = _exit(frame, add.result)
        if side is not None and (exit is None or exit.module != frame.path and
                                 frame.outputs.get((exit.module, exit.call)) is not frame.output):
            continue  # a side input added inside (a position bias on attention scores): not a skip
        if exit is None:
            skipped.append(Skipped(f"{frame.path or 'model'}:add{add.index}", "a residual add whose result the "
                                   "forward exposes nowhere (no module takes or returns it)"))
            continue
        tap = replace(frame.exposed[entry], rows=exit.rows)
        sites.append(Site(name=_branch_owner(frame, entry, [term.operands[i] for term, i in terms]),
                          module_path=frame.path,
                          branch=replay(frame.module, tap, frame.path, [(t.index, i, t.inplace) for t, i in terms]),
                          input_tap=tap, output_tap=exit, post=post, post_name=post_name, ctx_module=frame.path,
                          kind="identity" if side is None else "projection",
                          side_skip=None if side is None else _side_skip(side)))
    return name_sites(frame.path, sites), skipped


def _branch_owner(frame: _Frame, skip: _Value, branches: list[_Value]) -> str:
    """The child of the block that holds most parameters among those computing the branch (its terms)."""
    prefix = f"{frame.path}." if frame.path else ""
    owners, pending, seen = set(), list(branches), set()
    while pending:
        node = pending.pop()
        if node in seen or node is skip or node.seq < skip.seq:
            continue
        seen.add(node)
        if node.owner.startswith(prefix) and node.owner != frame.path:
            owners.add(node.owner[len(prefix):].split(".")[0])
        pending.extend(node.parents)
    size = {name: sum(p.numel() for p in frame.module.get_submodule(name).parameters()) for name in owners}
    return max(sorted(owners), key=size.__getitem__, default="add")


class _Grab(TorchFunctionMode):
    """During a replay: the sum of the branch terms, each the operand `position` of the `index`-th add of
    the block's own forward (`terms`: (index, position, whether that add is in place))."""

    def __init__(self, terms: list[tuple[int, int, bool]]):
        super().__init__()
        self.terms = {index: (set(), inplace) for index, _, inplace in terms}
        for index, position, _ in terms:
            self.terms[index][0].add(position)
        self.depth, self.adds, self.value, self.found = 0, 0, None, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0 and _is_add(func, args, kwargs):
            positions, inplace = self.terms.get(self.adds, ((), False))
            for position in sorted(positions):
                operand = args[position].clone() if inplace else args[position]  # the add may overwrite it
                self.value = operand if self.value is None else self.value + operand
                self.found += 1
            self.adds += 1
        return func(*args, **kwargs)

    def enter(self, *_):
        self.depth += 1

    def leave(self, *_):
        self.depth -= 1


def _substitute(tap: Tap, v: torch.Tensor):
    """Hooks that put `v` in place of the value `tap` reads, at the tap's call."""
    seen = [0]

    def pre_hook(module, args, kwargs):
        seen[0] += 1
        if seen[0] - 1 != tap.call:
            return None
        if args:
            return (v.reshape(args[0].shape), *args[1:]), kwargs
        key = _first_key(kwargs)
        return args, {**kwargs, key: v.reshape(kwargs[key].shape)}

    def post_hook(module, args, output):
        seen[0] += 1
        if seen[0] - 1 != tap.call:
            return None
        if isinstance(output, torch.Tensor):
            return v.reshape(output.shape)
        return type(output)((v.reshape(output[0].shape), *output[1:])) if isinstance(output, tuple) else output
    return pre_hook if tap.where == "input" else post_hook


def _first_key(kwargs: dict) -> str:
    return next(key for key, value in kwargs.items() if isinstance(value, torch.Tensor))


def replay(block: nn.Module, entry: Tap, path: str, terms: list[tuple[int, int, bool]]):
    """F(v, ctx): the block's forward run on its captured call with the value at `entry` replaced by v,
    returning the branch: the operand `position` of its `index`-th add, or the sum of several such terms
    (`terms`: (index, position, whether that add is in place))."""
    target = block if entry.module == path else block.get_submodule(entry.module[len(path) + 1:] if path
                                                                    else entry.module)

    def branch(v: torch.Tensor, ctx: Context) -> torch.Tensor:
        grab = _Grab(terms)
        with ExitStack() as stack:
            hook = _substitute(Tap(entry.module, entry.where, call=entry.call if target is not block else 0), v)
            handle = (target.register_forward_pre_hook(hook, with_kwargs=True) if entry.where == "input"
                      else target.register_forward_hook(hook))
            stack.callback(handle.remove)
            for module in block.modules():
                if module is not block:
                    for h in (module.register_forward_pre_hook(grab.enter), module.register_forward_hook(grab.leave)):
                        stack.callback(h.remove)
            with grab:
                args = ((ctx["input"],) if "input" in ctx else ()) + tuple(ctx.get("args", ()))
                block(*args, **without_cache(ctx.get("kwargs", {})))
        if grab.found != len(terms):
            raise RuntimeError("the replayed forward took another path: the add was not reached")
        return per_sample(grab.value, len(v))
    return branch
