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

import operator
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import fx
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

    def tangent_of(t: torch.Tensor) -> torch.Tensor:
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent

    traced = make_fx(tangent_of)(x.new_empty(()).expand_as(x))
    program = _specialize(traced)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype).to(x.device)
    expected, got = traced(probe), program(probe)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())):
        raise Unsupported("the rewritten program disagrees with the traced one")
    return program


def _is_inplace(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _shape_dtype(node: fx.Node):
    val = node.meta.get("val")
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else (None, None)


def _specialize(traced: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    root = torch.nn.Module()
    constants: dict[fx.Node, object] = {}  # nodes that do not depend on the tangent, with their values
    emitted: dict[fx.Node, fx.Node] = {}  # nodes that do, with their node in the new graph
    held: dict[object, fx.Node] = {}  # a constant tensor's get_attr in the new graph, by id (or node)
    seen: dict[tuple, fx.Node] = {}  # emitted pure operations, by what they compute
    order = {node: i for i, node in enumerate(traced.graph.nodes)}
    # copy_(dst, src) into a tensor of its own that nothing reads afterwards: its value is src's
    overwrites = {node for node in traced.graph.nodes if node.target is aten.copy_.default
                  and node.args[0].target in FRESH and _shape_dtype(node.args[0]) == _shape_dtype(node.args[1])
                  and all(order[user] <= order[node] for user in node.args[0].users)}
    mutated = {node.args[0] for node in traced.graph.nodes if _is_inplace(node) and node not in overwrites}

    def hold(value, key=None) -> fx.Node | object:
        if not isinstance(value, torch.Tensor):
            return value
        key = id(value) if key is None else key
        if key not in held:
            name = f"c{len(held)}"
            root.register_buffer(name, value)
            held[key] = graph.get_attr(name)
        return held[key]

    def new(node: fx.Node):  # the node's input to the new graph
        if node in emitted:
            return emitted[node]
        if _written_through(node, mutated):  # written in place later on: its value as of now
            return hold(constants[node].clone(), key=node)
        return hold(constants[node])

    def emit(node: fx.Node, target, args, kwargs) -> None:  # args and kwargs in the new graph's terms
        pure = not _is_inplace(node) and node not in mutated
        key = (target, repr(args), repr(kwargs))
        if pure and key in seen:
            emitted[node] = seen[key]
            return
        emitted[node] = graph.call_function(target, tuple(args), dict(kwargs))
        emitted[node].meta = dict(node.meta)
        if pure:
            seen[key] = emitted[node]

    def constant(arg) -> bool:
        return not isinstance(arg, fx.Node) or arg in constants

    def zero(arg) -> bool:
        value = constants.get(arg) if isinstance(arg, fx.Node) else arg
        return isinstance(value, torch.Tensor) and value.device.type != "meta" and not bool(value.any())

    def same_as(node: fx.Node, arg) -> bool:  # arg is dynamic and already has node's shape and dtype
        return isinstance(arg, fx.Node) and arg in emitted and _shape_dtype(arg) == _shape_dtype(node) \
            and _shape_dtype(node)[0] is not None

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            emitted[node] = graph.placeholder(node.name)
            emitted[node].meta = dict(node.meta)
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(traced)  # the caller's tensors: the model's weights, x
            written = isinstance(value, torch.Tensor) and _written_through(node, mutated)
            constants[node] = value.clone() if written else value
        elif node.op == "output":
            graph.output(fx.map_arg(node.args[0], new))
        elif node.op != "call_function":
            raise Unsupported(node.op)
        elif node in overwrites:
            emitted[node] = new(node.args[1])
        elif all(constant(a) for a in node.all_input_nodes):
            args, kwargs = fx.map_arg(node.args, constants.get), fx.map_arg(node.kwargs, constants.get)
            constants[node] = node.target(*args, **kwargs)
        elif _is_inplace(node) and node.args[0] in constants:
            raise Unsupported(f"{node.target} writes what depends on the tangent into a constant")
        else:
            args = node.args
            if node.target in COPIES and node not in mutated and args[0] not in mutated and same_as(node, args[0]) \
                    and node.kwargs.get("device", None) in (None, _device(args[0])) \
                    and node.kwargs.get("memory_format", None) is None:
                emitted[node] = emitted[args[0]]
            elif node.target in ZERO_IF_ANY_ZERO and any(zero(a) for a in args[:2]) \
                    and not (node.target is aten.convolution.default and not zero(args[2]) and args[2] is not None):
                shape, dtype = _shape_dtype(node)
                if shape is None:
                    raise Unsupported(f"{node.target} without a shape")
                constants[node] = torch.zeros(shape, dtype=dtype, device=node.meta["val"].device)
            elif node.target in ADDS | SUBS and zero(args[1]) and same_as(node, args[0]):
                emitted[node] = emitted[args[0]]
            elif node.target in ADDS and zero(args[0]) and same_as(node, args[1]):
                emitted[node] = emitted[args[1]]
            elif node.target in LINEAR_IN_GRAD and args[0] in emitted and all(constant(a) for a in args[1:]):
                at = fx.map_arg(args[1:], constants.get)
                factor = node.target(torch.ones_like(at[0]), *at, **fx.map_arg(node.kwargs, constants.get))
                emit(node, aten.mul.Tensor, (emitted[args[0]], hold(factor)), {})
            else:  # a view may meet a batched tangent whose strides it cannot view: reshape copies then
                target = aten.reshape.default if node.target is aten.view.default else node.target
                emit(node, target, fx.map_arg(node.args, new), fx.map_arg(node.kwargs, new))
    graph.eliminate_dead_code()
    return fx.GraphModule(root, graph)


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
