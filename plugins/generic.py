"""The generic detector (spec §5), the fallback for models no family adapter claims.

Each module's own forward is traced with torch.fx, its children kept as leaves, so an add belongs to
the innermost module that performs it. A site is an add whose two operands both depend on the
module's input x and whose operand paths meet only at x (their common dominator): the operand
reached through parametric ops only is the branch F, the other is the skip (identity when it is x
itself, a projection when it has parameters). What follows the add up to the module's output must be
a chain of single-input ops: the post-op. Branch, skip and post are extracted as fx GraphModules."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ra_probe.sites import Site, Tap

ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return True


def _trace(module: nn.Module) -> fx.GraphModule | None:
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:  # control flow on values, unsupported ops...: not traceable, not a site
        return None
    return fx.GraphModule(module, graph)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _has_params(gm: fx.GraphModule, nodes) -> bool:
    for node in nodes:
        if node.op == "call_module" and any(True for _ in gm.get_submodule(node.target).parameters()):
            return True
        if node.op == "get_attr":
            return True
    return False


def _extract(gm: fx.GraphModule, start: fx.Node, end: fx.Node) -> fx.GraphModule:
    """A GraphModule computing `end` from `start` (the only input); other placeholders are not allowed."""
    graph, env = fx.Graph(), {}
    env[start] = graph.placeholder("x")
    needed = _ancestors(end) | {end}
    for node in gm.graph.nodes:
        if node is start or node not in needed:
            continue
        if node.op == "placeholder":
            raise ValueError("the path needs a side input")
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[end])
    return fx.GraphModule(gm, graph)


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in ADD_TARGETS and len(node.args) == 2 \
        and all(isinstance(a, fx.Node) for a in node.args)


def _sites_in(path: str, module: nn.Module) -> list[Site]:
    gm = _trace(module)
    if gm is None:
        return []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    adds = [n for n in gm.graph.nodes if _is_add(n)]
    if len(placeholders) != 1 or len(adds) != 1:
        return []
    x, add = placeholders[0], adds[0]
    a, b = add.args
    paths = {n: _ancestors(n) | {n} for n in (a, b)}
    if not all(x in p for p in paths.values()):
        return []
    # the two paths may share only x: their meeting point is the module input
    if (paths[a] - {x}) & (paths[b] - {x}):
        return []
    if a is x or not _has_params(gm, paths[b] - {x}):
        skip_node, branch_node = a, b
    else:
        skip_node, branch_node = b, a
    if not _has_params(gm, paths[branch_node] - {x}):
        return []
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(output, fx.Node) or not _single_chain(add, output):
        return []
    branch_gm = _extract(gm, x, branch_node)
    skip = None if skip_node is x else _extract(gm, x, skip_node)
    post = None if output is add else _extract(gm, add, output)
    kind = "identity" if skip is None else ("projection" if _has_params(gm, paths[skip_node]) else "scaled")
    return [Site(name=path or "model", module_path=path, branch=lambda x, ctx, f=branch_gm: f(x),
                 input_tap=Tap(path, "input"), output_tap=Tap(path, "output"), kind=kind, skip=skip, post=post,
                 post_name=None if post is None else _describe_post(gm, add, output))]


def _single_chain(start: fx.Node, end: fx.Node) -> bool:
    """Every node from `start` to `end` takes exactly one node input, the previous one."""
    node = end
    while node is not start:
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return True


def _describe_post(gm: fx.GraphModule, start: fx.Node, end: fx.Node) -> str:
    names, node = [], end
    while node is not start:
        names.append(type(gm.get_submodule(node.target)).__name__.lower() if node.op == "call_module"
                     else getattr(node.target, "__name__", str(node.target)))
        node = node.all_input_nodes[0]
    return "+".join(reversed(names))


class GenericDetector:
    name = "generic"
    description = "fallback: adds of x and a parametric branch of x, found by tracing each module (torch.fx)"
    fallback = True

    def find(self, model: nn.Module) -> list[Site]:
        sites = []
        for path, module in model.named_modules():
            sites.extend(_sites_in(path, module))
        return sites


ADAPTER = GenericDetector()
