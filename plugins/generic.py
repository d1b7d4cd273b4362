"""The generic detector, the fallback for models no family adapter claims.

Each module's own forward is traced with torch.fx, its children kept as leaves (and timm's
untraceable helpers wrapped), so an add belongs to the innermost module that performs it. In the
graph of the values computed from the module's main input x, an add `a + b` is a residual site when
both operands depend on x: its immediate dominator d (the last value every path from x to the add
goes through) is the site input, the operand reached through fewer parametric ops is the skip
(identity when it is d itself, a projection when it has parameters), the other the branch F, which
must hold a parametric op. The chain of parameter-free ops (or norms) that follows the add alone is
the post-op. Branch, skip and post are extracted as fx GraphModules; the branch takes the module's
other arguments (masks, embeddings) as side inputs from its captured call. The site input and
output are read where the forward exposes them: the module's input or output, or the input or
output of a child at the right call when the child is called several times; a value no module
exposes is recomputed from the module's input."""
from __future__ import annotations

import inspect
import operator
from collections import Counter

import torch
from torch import fx, nn

from ra_probe.sites import Site, SiteReport, Skipped, Tap

ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", nn.LayerNorm))


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


def _trace(module: nn.Module) -> fx.GraphModule:
    """The module's forward as a graph; optional arguments are fixed to their defaults when the
    forward branches on them (`if mask is not None`). Raises the tracer's error when neither traces
    (control flow on values, unsupported ops...)."""
    defaults = {name: p.default for name, p in list(inspect.signature(module.forward).parameters.items())[1:]
                if p.default is not inspect.Parameter.empty}
    try:
        return fx.GraphModule(module, _ChildrenAsLeaves().trace(module))
    except Exception:
        return fx.GraphModule(module, _ChildrenAsLeaves().trace(module, concrete_args=defaults))


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
        self.output = next(n for n in self.nodes if n.op == "output")
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
        if self.output.args[0] is node:
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

    def extract(self, start: fx.Node, end: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
        """A GraphModule computing `end` from `start` and the module's side inputs it needs, which it
        takes as further arguments (returned in order)."""
        graph, side = fx.Graph(), []
        env = {start: graph.placeholder("x")}
        needed = _ancestors(end, stop=start) | {end}  # values before `start` reach `end` only through it
        for node in self.nodes:
            if node is start or node not in needed:
                continue
            if node.op == "placeholder":
                side.append(node)
            env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(env[end])
        return fx.GraphModule(self.gm, graph), side


def _is_add(node: fx.Node) -> bool:
    return (node.op in ("call_function", "call_method") and node.target in ADD_TARGETS and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args))


def _side_values(module: nn.Module, side: list[fx.Node], ctx) -> list:
    """The side inputs' values in the captured call of `module`, by parameter name."""
    if not side:
        return []
    bound = inspect.signature(module.forward).bind_partial(None, *ctx.get("args", ()), **ctx.get("kwargs", {}))
    bound.apply_defaults()
    return [bound.arguments[node.target] for node in side]


class _Rejected(Exception):
    """A residual add whose site cannot be extracted; the message says why."""


def _site(g: _Graph, module: nn.Module, add: fx.Node) -> Site | None:
    """The site of one add, None when the add is not residual (see the module docstring)."""
    a, b = add.args
    if a not in g.dom or b not in g.dom:
        return None  # an operand does not depend on x (a position embedding, a bias)
    d = g.idom(add)
    paths = {n: g.between(d, n) for n in (a, b)}
    weight = {n: sum(map(g.parametric, paths[n])) for n in (a, b)}
    skip_node, branch_node = (a, b) if a is d or (b is not d and weight[a] < weight[b]) else (b, a)
    if weight[branch_node] == 0:
        return None  # arithmetic on x (a GELU polynomial...), not a residual branch
    branch_gm, side = g.extract(d, branch_node)
    skip, kind = None, "identity"
    if skip_node is not d and not all(isinstance(g.module(n), nn.Identity) for n in paths[skip_node]):
        skip, skip_side = g.extract(d, skip_node)
        if skip_side:
            raise _Rejected("the skip path needs side inputs")
        kind = "projection" if weight[skip_node] else "scaled"
    end, post_nodes = _post_chain(g, add)
    post = g.extract(add, end)[0] if post_nodes else None
    entry, exit = g.tap(d), g.tap(end)
    if entry is None:
        raise _Rejected("the site input is an intermediate value computed with side inputs")
    if exit is None:
        raise _Rejected("the add's result is an intermediate value computed with side inputs")
    largest = max((n for n in g.nodes if n in paths[branch_node] and n.op == "call_module"), default=None,
                  key=lambda n: sum(p.numel() for p in g.module(n).parameters()))  # ties: the first called
    return Site(name=largest.target if largest is not None else add.name, module_path=g.path,
                branch=lambda x, ctx, f=branch_gm: f(x, *_side_values(module, side, ctx)),
                input_tap=entry, output_tap=exit, kind=kind, skip=skip, post=post,
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


def sites_in(path: str, module: nn.Module) -> tuple[list[Site], list[Skipped]]:
    """The residual sites of one module's own forward (its children are leaves), and those found but
    not extractable."""
    if type(module).__module__.startswith("torch.nn"):
        return [], []  # torch's own layers, containers and activations hold no residual add
    try:
        gm = _trace(module)
    except Exception as exc:  # its adds cannot be seen: say so rather than report no residual connection
        why = f"{type(exc).__name__}: {exc}".splitlines()[0].split(". ")[0]  # torch.fx's hints are long
        return [], [Skipped(path or "model", f"forward not traceable by torch.fx, its residual adds not looked for "
                                             f"({why})")]
    if not any(n.op == "placeholder" for n in gm.graph.nodes):
        return [], []
    g = _Graph(path, gm)
    sites, skipped = [], []
    for add in [n for n in g.nodes if _is_add(n) and n in g.dom]:
        try:
            site = _site(g, module, add)
        except _Rejected as why:
            skipped.append(Skipped(f"{path or 'model'}:{add.name}", str(why)))
            continue
        if site is not None:
            sites.append(site)
    # one site: the module's path; several: path.<branch's main child>, numbered @1, @2... where
    # branches share that child (weights applied several times in one forward)
    uses, seen = Counter(s.name for s in sites), Counter()
    for site in sites:
        seen[site.name] += 1
        suffix = f"@{seen[site.name]}" if uses[site.name] > 1 else ""
        site.name = (path or "model") if len(sites) == 1 else ".".join(filter(None, (path, site.name))) + suffix
    return sites, skipped


class GenericDetector:
    name = "generic"
    description = "fallback: adds of x and a parametric branch of x, found by tracing each module (torch.fx)"
    fallback = True

    def find(self, model: nn.Module) -> SiteReport:
        report = SiteReport(self.name, [])
        for path, module in model.named_modules():
            sites, skipped = sites_in(path, module)
            report.sites.extend(sites)
            report.skipped.extend(skipped)
        return report


ADAPTER = GenericDetector()
