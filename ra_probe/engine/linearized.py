"""J·v of a function at a fixed point as a traced program of the tangent alone.

`torch.func.linearize` traces the forward-mode product and folds what does not depend on the tangent,
but its program still does work whose result is known: products with the zero tangents of the weights
(a convolution of the primal with a zero kernel, the additions of its result), copies of tensors to
their own dtype, the input copied into zeros, activation derivatives evaluated anew on every call, and
a normalization's statistics computed twice. On a conv block a third of its convolutions, on a
transformer MLP a quarter of its time. `linearize` traces the same product and builds the program from
what is left: everything that does not depend on the tangent is computed once (zeros included, so
whatever they multiply drops out), an activation's derivative becomes a factor the tangent is
multiplied by, and identical operations run once."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import fx
from torch.fx.experimental import const_fold
from torch.fx.experimental.proxy_tensor import make_fx

aten, prims = torch.ops.aten, torch.ops.prims

# derivative(grad, *at) of an elementwise function: grad times a factor that depends on `at` only
LINEAR_IN_GRAD = {aten.gelu_backward.default, aten.silu_backward.default, aten.sigmoid_backward.default,
                  aten.tanh_backward.default}
ADDS = {aten.add.Tensor, prims.add.default}
SUBS = {aten.sub.Tensor, prims.sub.default}
MULS = {aten.mul.Tensor, prims.mul.default}
ZERO_IF_ANY_ZERO = MULS | {aten.convolution.default, aten.mm.default, aten.bmm.default, aten.matmul.default}
COPIES = {aten._to_copy.default, aten.clone.default, aten.alias.default, aten.expand.default}
FRESH = {aten._to_copy.default, aten.clone.default, aten._new_zeros_with_same_feature_meta.default,
         aten.zeros.default, aten.zeros_like.default, aten.empty.memory_format, aten.empty_like.default}


class Unsupported(Exception):
    """A traced program this builder does not rewrite (the caller keeps torch's)."""


def linearize(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The program t ↦ J·t for J = ∂f/∂x at x (t shaped like x). Raises `Unsupported` for a trace it
    cannot rewrite, and any error of the tracer."""
    return specialize(trace(f, x), x)


def trace(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> fx.GraphModule:
    """The forward-mode product t ↦ J·t of f at x as torch traces it (most of `linearize`'s time). Its
    values are fake tensors: it holds no activations, only x and the weights f reads, so a caller may
    keep it to build the program again (`specialize`) after dropping the program."""

    def tangent_of(t: torch.Tensor) -> torch.Tensor:
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent

    return _detached(make_fx(tangent_of)(x.new_empty(()).expand_as(x)))


def specialize(traced: fx.GraphModule, x: torch.Tensor) -> fx.GraphModule:
    """The program of `trace(f, x)`'s tangent alone: what does not depend on the tangent computed once,
    checked against the traced product on a random tangent. Raises `Unsupported` as `linearize` does."""
    program = _Specializer(traced).build()
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype).to(x.device)
    expected, got = traced(probe), program(probe)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())):
        raise Unsupported("the rewritten program disagrees with the traced one")
    return program


def folded(traced: fx.GraphModule) -> fx.GraphModule:
    """torch's rewrite of `trace(f, x)` (what `torch.func.linearize` builds: the subgraphs that do not
    depend on the tangent computed once, on first call), for a trace `specialize` gives up on; freed as
    soon as its operator drops it, as `specialize`'s program is (torch's own held it in reference cycles)."""
    program = const_fold.split_const_subgraphs(traced)
    for module in program.modules():
        if isinstance(module, fx.GraphModule):
            _detached(module)
    return program


def _detached(module: fx.GraphModule) -> fx.GraphModule:
    """`module` without its graph's reference back to it (its graph is final): the module and its
    constants (an attention's program holds 0.5 GB a sample at 2304 tokens, a trace x) go as soon as their
    operator drops them, not when Python's cycle collector next runs, which a probe outran site after site."""
    module.graph.owning_module = None
    return module


def _is_inplace(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _shape_dtype(node: fx.Node):
    val = node.meta.get("val")
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else (None, None)


@dataclass(frozen=True)
class _Dynamic:
    """A value that depends on the tangent: its node in the new graph."""

    node: fx.Node


_NOT_APPLIED = object()  # what a rule returns when it does not apply


class _Specializer(fx.Interpreter):
    """Walks the traced J·t program once and writes the new one: a node that does not depend on the
    tangent is evaluated (its value is the environment's entry), one that does is rewritten by the
    first rule of `call_function` that applies (its entry is a `_Dynamic`). `build` returns the program."""

    def __init__(self, traced: fx.GraphModule):
        super().__init__(traced, garbage_collect_values=False)
        self.extra_traceback = False
        self.program, self.root = fx.Graph(), torch.nn.Module()
        self.held: dict[object, fx.Node] = {}  # a constant tensor's get_attr in the new graph, by id (or node)
        self.seen: dict[tuple, fx.Node] = {}  # emitted pure operations, by what they compute
        nodes = list(traced.graph.nodes)
        order = {node: i for i, node in enumerate(nodes)}
        # copy_(dst, src) into a tensor of its own that nothing reads afterwards: its value is src's
        self.overwrites = {node for node in nodes if node.target is aten.copy_.default
                           and node.args[0].target in FRESH
                           and _shape_dtype(node.args[0]) == _shape_dtype(node.args[1])
                           and all(order[user] <= order[node] for user in node.args[0].users)}
        self.mutated = {node.args[0] for node in nodes if _is_inplace(node) and node not in self.overwrites}

    def build(self) -> fx.GraphModule:
        self.run(*(None for node in self.module.graph.nodes if node.op == "placeholder"),
                 enable_io_processing=False)
        self.program.eliminate_dead_code()
        return _detached(fx.GraphModule(self.root, self.program))

    def run_node(self, n: fx.Node):
        self.node = n  # the rules read the traced node as well as its arguments' values
        return super().run_node(n)

    # ---- the new graph's inputs and outputs

    def placeholder(self, target, args, kwargs):
        emitted = self.program.placeholder(self.node.name)
        emitted.meta = dict(self.node.meta)
        return _Dynamic(emitted)

    def get_attr(self, target, args, kwargs):
        value = self.fetch_attr(target)  # the caller's tensors: the model's weights, x
        written = isinstance(value, torch.Tensor) and _written_through(self.node, self.mutated)
        return value.clone() if written else value

    def output(self, target, args, kwargs):
        self.program.output(fx.map_arg(self.node.args[0], self._new))

    def call_method(self, target, args, kwargs):
        raise Unsupported("call_method")

    def call_module(self, target, args, kwargs):
        raise Unsupported("call_module")

    # ---- operations: the first rule that applies

    def call_function(self, target, args, kwargs):
        for rule in (self._overwrite, self._fold, self._copy, self._zero_product, self._zero_addend,
                     self._linear_in_grad):
            value = rule(target, args, kwargs)
            if value is not _NOT_APPLIED:
                return value
        # a view may meet a batched tangent whose strides it cannot view: reshape copies then
        target = aten.reshape.default if target is aten.view.default else target
        return self._emit(target, fx.map_arg(self.node.args, self._new), fx.map_arg(self.node.kwargs, self._new))

    def _overwrite(self, target, args, kwargs):
        """copy_ into a fresh tensor nothing reads before: the source itself."""
        if self.node in self.overwrites:
            return _Dynamic(self._new(self.node.args[1]))
        return _NOT_APPLIED

    def _fold(self, target, args, kwargs):
        """An operation of values that do not depend on the tangent: computed now, once."""
        if all(not isinstance(self.env[a], _Dynamic) for a in self.node.all_input_nodes):
            return target(*args, **kwargs)
        if _is_inplace(self.node) and not isinstance(args[0], _Dynamic):
            raise Unsupported(f"{target} writes what depends on the tangent into a constant")
        return _NOT_APPLIED

    def _copy(self, target, args, kwargs):
        """A copy of the tangent's value to its own shape, dtype and device: the value itself."""
        node = self.node
        if target in COPIES and node not in self.mutated and node.args[0] not in self.mutated \
                and self._same_as(node.args[0]) and kwargs.get("device", None) in (None, _device(node.args[0])) \
                and kwargs.get("memory_format", None) is None:
            return args[0]
        return _NOT_APPLIED

    def _zero_product(self, target, args, kwargs):
        """A product with a zero factor (a convolution without a bias, or a zero one): zeros."""
        if target in ZERO_IF_ANY_ZERO and any(_zero(a) for a in args[:2]) \
                and not (target is aten.convolution.default and not _zero(args[2]) and args[2] is not None):
            shape, dtype = _shape_dtype(self.node)
            if shape is None:
                raise Unsupported(f"{target} without a shape")
            return torch.zeros(shape, dtype=dtype, device=self.node.meta["val"].device)
        return _NOT_APPLIED

    def _zero_addend(self, target, args, kwargs):
        """x + 0, x − 0, 0 + x, with x of the result's shape and dtype: x."""
        if target in ADDS | SUBS and _zero(args[1]) and self._same_as(self.node.args[0]):
            return args[0]
        if target in ADDS and _zero(args[0]) and self._same_as(self.node.args[1]):
            return args[1]
        return _NOT_APPLIED

    def _linear_in_grad(self, target, args, kwargs):
        """An activation's derivative: the tangent times a factor computed once."""
        if target in LINEAR_IN_GRAD and isinstance(args[0], _Dynamic) \
                and not any(isinstance(a, _Dynamic) for a in args[1:]):
            factor = target(torch.ones_like(args[1]), *args[1:], **kwargs)
            return self._emit(aten.mul.Tensor, (args[0].node, self._hold(factor)), {})
        return _NOT_APPLIED

    # ---- helpers

    def _same_as(self, arg) -> bool:
        """The traced argument `arg` depends on the tangent and has the traced node's shape and dtype."""
        return isinstance(arg, fx.Node) and isinstance(self.env[arg], _Dynamic) \
            and _shape_dtype(arg) == _shape_dtype(self.node) and _shape_dtype(self.node)[0] is not None

    def _emit(self, target, args, kwargs) -> _Dynamic:
        """The operation in the new graph (args and kwargs in its terms); a pure one computed before is
        reused."""
        pure = not _is_inplace(self.node) and self.node not in self.mutated
        key = (target, repr(args), repr(kwargs))
        if pure and key in self.seen:
            return _Dynamic(self.seen[key])
        emitted = self.program.call_function(target, tuple(args), dict(kwargs))
        emitted.meta = dict(self.node.meta)
        if pure:
            self.seen[key] = emitted
        return _Dynamic(emitted)

    def _new(self, node: fx.Node) -> fx.Node | object:
        """A traced node's input to the new graph: its node there, or its value held as a buffer."""
        value = self.env[node]
        if isinstance(value, _Dynamic):
            return value.node
        if _written_through(node, self.mutated):  # written in place later on: its value as of now
            return self._hold(value.clone(), key=node)
        return self._hold(value)

    def _hold(self, value, key=None) -> fx.Node | object:
        if not isinstance(value, torch.Tensor):
            return value
        key = id(value) if key is None else key
        if key not in self.held:
            name = f"c{len(self.held)}"
            self.root.register_buffer(name, value)
            self.held[key] = self.program.get_attr(name)
        return self.held[key]


def _zero(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta" and not bool(value.any())


def _written_through(node: fx.Node, mutated: set[fx.Node]) -> bool:
    """Whether an in-place operation writes into `node`'s storage: into the tensor it views (if it is
    a view), itself, or any view of them."""
    while node.op == "call_function" and _is_view(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    views, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in mutated:
            return True
        for user in current.users:
            if user not in views and user.op == "call_function" and _is_view(user):
                views.add(user)
                stack.append(user)
    return False


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and not a.alias_info.is_write
                                      for a in schema.arguments[:1]) and bool(schema.returns) \
        and schema.returns[0].alias_info is not None


def _device(node: fx.Node):
    val = node.meta.get("val")
    return getattr(val, "device", None)
