"""The torch.fx strategy of the generic detector: each module's own forward is traced with torch.fx, its
children kept as leaves (and timm's untraceable helpers wrapped), so an add belongs to the innermost
module that performs it. In the graph of the values computed from the module's main input x, an add
`a + b` is a residual site when both operands depend on x: its immediate dominator d (the last value
every path from x to the add goes through) is the site input, the operand reached through fewer
parametric ops is the skip (identity when it is d itself, a projection when it has parameters), the
other the branch F, which must hold a parametric op; a sum of x and several branches written as several
adds (`x + a(h) + b(h)`, each inner sum read by the next add alone) is one site whose branch is the
branches' sum. The chain of parameter-free ops (or norms) that follows the add alone is the post-op.
Branch, skip and post are extracted as fx GraphModules; the branch takes the module's other arguments
(masks, embeddings) as side inputs from its captured call. The site input and output are read where the
forward exposes them: the module's input or output, or the input or output of a child at the right call
when the child is called several times; a value no module exposes is recomputed from the module's input."""
from __future__ import annotations

import inspect
import operator
from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from ra_probe.sites.detect.common import NORMS, name_sites, without_cache
from ra_probe.sites.records import Site, Skipped, Tap

ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}


class _ChildrenAsLeaves(fx.Tracer):
    def __init__(self):
        try:
            from timm.layers import get_notrace_functions

            wrapped = tuple(get_notrace_functions())
        except ImportError:
            wrapped = ()
        super().__init__(autowrap_functions=wrapped)

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return True


def _trace(module: nn.Module) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The module's forward as a graph, and the optional arguments fixed to their defaults to get it:
    none when it traces as it is, else all of them (the forward branches on them, `if mask is not
    None`), and the graph holds only for calls that leave them so. Raises the tracer's error when
    neither traces (control flow on values, unsupported ops...)."""
    defaults = {name: p.default for name, p in list(inspect.signature(module.forward).parameters.items())[1:]
                if p.default is not inspect.Parameter.empty}
    try:
        return _one_read(fx.GraphModule(module, _ChildrenAsLeaves().trace(module))), {}
    except Exception:
        return _one_read(fx.GraphModule(module, _ChildrenAsLeaves().trace(module, concrete_args=defaults))), defaults


def _one_read(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph with each item of a tuple read once: `out[0]` written twice (ALBERT's layer reads its
    attention's output for the FFN and again for the skip) is one value, whose users all see it."""
    first: dict[tuple[fx.Node, int | str], fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and isinstance(node.args[1], (int, str)):
            key = (node.args[0], node.args[1])
            if key in first:
                node.replace_all_uses_with(first[key])
                gm.graph.erase_node(node)
            else:
                first[key] = node
    gm.recompile()
    return gm


def _ancestors(node: fx.Node, stop: fx.Node | None = None) -> set[fx.Node]:
    """The values `node` is computed from, not looking past `stop`."""
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                if parent is not stop:
                    stack.append(parent)
    return seen


class _Graph:
    """One traced module: the values computed from its main input x and their dominators."""

    def __init__(self, path: str, gm: fx.GraphModule):
        self.path, self.gm = path, gm
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.x = placeholders[0]
        self.output = _main_output(next(n for n in self.nodes if n.op == "output").args[0])
        self.call_index: dict[fx.Node, int] = {}  # a child's call: its first, second... in the forward
        calls = Counter()
        for node in self.nodes:
            if node.op == "call_module":
                self.call_index[node], calls[node.target] = calls[node.target], calls[node.target] + 1
        self.dom: dict[fx.Node, set[fx.Node]] = {self.x: {self.x}}
        for node in self.nodes:  # topological order: dom(n) = {n} ∪ ⋂ dom(inputs from x)
            inputs = [p for p in node.all_input_nodes if p in self.dom]
            if node is not self.x and inputs and node.op != "output":
                self.dom[node] = {node} | set.intersection(*(self.dom[p] for p in inputs))
        # the values computed from x's values, not only from its shape (a position embedding sized to x)
        self.values = {self.x}
        for node in self.nodes:
            if not _metadata(node) and any(p in self.values for p in node.all_input_nodes):
                self.values.add(node)

    def idom(self, node: fx.Node) -> fx.Node:
        return max(self.dom[node] - {node}, key=self.order.__getitem__)

    def between(self, start: fx.Node, end: fx.Node) -> set[fx.Node]:
        """The values on paths from `start` to `end`, `start` excluded."""
        return {n for n in _ancestors(end) | {end} if n in self.dom and start in self.dom[n] and n is not start}

    def parametric(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return any(True for _ in self.gm.get_submodule(node.target).parameters())
        return any(p.op == "get_attr" for p in node.all_input_nodes)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def exposed(self, node: fx.Node) -> Tap | None:
        """Where the forward exposes `node`: the module's input or output, or the output or first input
        of a child (at that call of the child, for a child called more than once)."""
        if node is self.x:
            return Tap(self.path, "input")
        if self.output is node:
            return Tap(self.path, "output")
        child = lambda target: f"{self.path}.{target}" if self.path else target  # noqa: E731
        if node.op == "call_module":
            return Tap(child(node.target), "output", call=self.call_index[node])
        for user in node.users:
            if user.op == "call_module" and user.args and user.args[0] is node:
                return Tap(child(user.target), "input", call=self.call_index[user])
        return None

    def tap(self, node: fx.Node) -> Tap | None:
        """Where `node` can be read: where the forward exposes it, else recomputed from the module's
        input (None when that needs the module's side inputs)."""
        exposed = self.exposed(node)
        if exposed is not None:
            return exposed
        prefix, side = self.extract(self.x, node)
        return None if side else Tap(self.path, "input", prefix)

    def extract(self, start: fx.Node, end: fx.Node | list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
        """A GraphModule computing `end` (or the sum of the values `end` lists) from `start` and the
        module's side inputs it needs, which it takes as further arguments (returned in order)."""
        ends = end if isinstance(end, list) else [end]
        graph, side = fx.Graph(), []
        env = {start: graph.placeholder("x")}
        # values before `start` reach the ends only through it
        needed = set(ends).union(*(_ancestors(node, stop=start) for node in ends))
        for node in self.nodes:
            if node is start or node not in needed:
                continue
            if node.op == "placeholder":
                side.append(node)
            env[node] = graph.node_copy(node, lambda n: env[n])
        total = env[ends[0]]
        for node in ends[1:]:
            total = graph.call_function(operator.add, (total, env[node]))
        graph.output(total)
        return fx.GraphModule(self.gm, graph), side


def _main_output(value: Any) -> Any:
    """The value the block's output stands for, as capture reads it (`output_tensor`): what the forward
    returns, or the first item of a returned tuple, list or dict, also one built as `(y,) + rest`."""
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target is operator.add \
            and isinstance(value.args[0], (tuple, list)):
        value = value.args[0]
    if isinstance(value, (tuple, list)) and value:
        return value[0]
    return next(iter(value.values())) if isinstance(value, dict) and value else value


def _metadata(node: fx.Node) -> bool:
    """A read of x's shape, dtype or device: what follows from it (a position embedding resized to the
    input) does not depend on x's values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device",
                                                                                      "ndim")


def _is_add(node: fx.Node) -> bool:
    return (node.op in ("call_function", "call_method") and node.target in ADD_TARGETS and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args))


def _side_values(module: nn.Module, side: list[fx.Node], ctx) -> list:
    """The side inputs' values in the captured call of `module`, by parameter name; a key/value cache
    is left at its default (replayed, it would grow at every call)."""
    if not side:
        return []
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(None, *ctx.get("args", ()), **ctx.get("kwargs", {}))
    bound.apply_defaults()
    # the cache's positions are not state: T5 reads its query length from them
    kept = {**without_cache(bound.arguments), **{k: v for k, v in bound.arguments.items() if k == "cache_position"}}
    return [kept[node.target] if node.target in kept else _default(signature, node.target) for node in side]


def _default(signature: inspect.Signature, name: str) -> Any:
    default = signature.parameters[name].default
    return None if default is inspect.Parameter.empty else default


class _Rejected(Exception):
    """A residual add whose site cannot be extracted; the message says why."""


def _site(g: _Graph, module: nn.Module, add: fx.Node) -> Site | None:
    """The site of one add, None when the add is not residual (see the module docstring)."""
    a, b = add.args
    if (a in g.dom) != (b in g.dom) and any(n.op == "placeholder" for n in (a, b)):
        raise Untraceable("an add takes a side input (a skip passed in by the caller?)")
    if a not in g.values or b not in g.values:
        return None  # an operand does not depend on x's values (a position embedding, a bias)
    d = g.idom(add)
    if d.users and all(u.op == "call_function" and u.target is operator.getitem for u in d.users):
        if d is g.x:
            raise _Rejected("the block's input is a tuple, not one tensor: no Jacobian of one tensor to measure")
        return None  # operands taken from a tuple of chunks (Res2Net's, FocalNet's hierarchical sums)
    paths = {n: g.between(d, n) for n in (a, b)}
    weight = {n: sum(map(g.parametric, paths[n])) for n in (a, b)}
    skip_node, branch_node = (a, b) if a is d or (b is not d and weight[a] < weight[b]) else (b, a)
    if weight[branch_node] == 0 or weight[branch_node] == weight[skip_node] > 0:
        return None  # arithmetic on x (a GELU polynomial...), or two alike branches summed (an average of heads)
    if any(sum(p is d or p in paths[skip_node] for p in n.all_input_nodes) > 1 for n in paths[skip_node]):
        return None  # the "skip" multiplies values of x together (attention scores plus a position bias)
    skip, kind = None, "identity"
    if skip_node is not d and not all(isinstance(g.module(n), nn.Identity) for n in paths[skip_node]):
        skip, skip_side = g.extract(d, skip_node)
        if skip_side:
            raise _Rejected("the skip path needs side inputs")
        kind = "projection" if weight[skip_node] else "scaled"
    return _made(g, module, add, d, [branch_node], paths[branch_node], skip, kind)


def _summed(add: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The terms of the sum `add` completes, and the inner adds it takes them from: an operand that is an
    add only this add reads stands for its terms (`x + a + b` is `(x + a) + b`)."""
    terms, inner = [], []
    for operand in add.args:
        if _is_add(operand) and len(operand.users) == 1:
            more, deeper = _summed(operand)
            terms, inner = terms + more, inner + [operand, *deeper]
        else:
            terms.append(operand)
    return terms, inner


def _sum_site(g: _Graph, module: nn.Module, add: fx.Node, terms: list[fx.Node]) -> Site | None:
    """The site of a sum of the skip and several branches written as several adds, `x + a(h) + b(h)`
    (parallel attention and MLP): one term is the sum's dominator d itself, every other term is computed
    from d's values through a parametric op. None for any other sum."""
    d = g.idom(add)
    branches = [term for term in terms if term is not d]
    if len(terms) < 3 or len(branches) != len(terms) - 1:
        return None
    paths = set()
    for term in branches:
        if term not in g.values or term not in g.dom or d not in g.dom[term]:
            return None
        between = g.between(d, term)
        if not any(map(g.parametric, between)):
            return None
        paths |= between
    return _made(g, module, add, d, branches, paths, None, "identity")


def _made(g: _Graph, module: nn.Module, add: fx.Node, d: fx.Node, branches: list[fx.Node], paths: set[fx.Node],
          skip: fx.GraphModule | None, kind: str) -> Site:
    """The site of `add` with input d, branch the sum of `branches` (computed by the nodes `paths`), and
    the extracted `skip` (None: identity), read where the forward exposes d and the add's result."""
    branch_gm, side = g.extract(d, branches)
    end, post_nodes = _post_chain(g, add)
    post = g.extract(add, end)[0] if post_nodes else None
    entry, exit = g.tap(d), g.tap(end)
    if entry is None:
        raise _Rejected("the site input is an intermediate value computed with side inputs")
    if exit is None:
        raise _Rejected("the add's result is an intermediate value computed with side inputs")
    largest = max((n for n in g.nodes if n in paths and n.op == "call_module"), default=None,
                  key=lambda n: sum(p.numel() for p in g.module(n).parameters()))  # ties: the first called
    return Site(name=largest.target if largest is not None else add.name, module_path=g.path,
                branch=lambda x, ctx, f=branch_gm: f.forward(x, *_side_values(module, side, ctx)),
                input_tap=entry, output_tap=exit, kind=kind, skip=None if skip is None else skip.forward,
                post=None if post is None else post.forward,
                post_name="+".join(_op_name(g, n) for n in post_nodes) or None,
                ctx_module=g.path if side else None)


def _post_chain(g: _Graph, add: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The ops that follow the add alone, one input each, parameter-free or norms, up to the last one
    whose value the forward exposes (see `_Graph.exposed`); returns that end and the ops."""
    chain, node = [], add
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or user.all_input_nodes != [node]:
            break
        if g.parametric(user) and not isinstance(g.module(user), NORMS):
            break
        chain.append(user)
        node = user
    while chain and g.exposed(chain[-1]) is None:
        chain.pop()
    return (chain[-1] if chain else add), chain


def _op_name(g: _Graph, node: fx.Node) -> str:
    module = g.module(node)
    return type(module).__name__.lower() if module is not None else getattr(node.target, "__name__", str(node.target))


class Untraceable(Exception):
    """torch.fx cannot trace a module's forward; the message says why, in one line."""


def sites_in(path: str, module: nn.Module) -> tuple[list[Site], list[Skipped], dict[str, Any]]:
    """The residual sites of one module's own forward (its children are leaves), those found but not
    extractable, and the arguments the graph fixed to their defaults (see `_trace`). Raises
    Untraceable when torch.fx cannot trace the forward."""
    if type(module).__module__.startswith("torch.nn"):
        return [], [], {}  # torch's own layers, containers and activations hold no residual add
    try:
        gm, fixed = _trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracer failure: another strategy looks at it
        raise Untraceable(f"{type(exc).__name__}: {exc}".splitlines()[0].split(". ")[0]) from None
    if not any(n.op == "placeholder" for n in gm.graph.nodes):
        return [], [], {}
    g = _Graph(path, gm)
    sites, skipped = [], []
    inside = set()  # the inner adds of a sum of branches, whose last add makes its site
    for add in reversed([n for n in g.nodes if _is_add(n) and n in g.dom]):  # a sum's last add first
        if add in inside:
            continue
        terms, inner = _summed(add)
        try:
            site = _sum_site(g, module, add, terms)
            if site is None:
                site = _site(g, module, add)
            else:
                inside.update(inner)
        except _Rejected as why:
            skipped.insert(0, Skipped(f"{path or 'model'}:{add.name}", str(why)))
            continue
        if site is not None:
            sites.insert(0, site)
    return name_sites(path, sites), skipped, fixed
