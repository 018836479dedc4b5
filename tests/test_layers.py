"""The package's import structure (issue 22): layers only import downward, no import circle,
and no private name (``_name``) taken from another file.  Read from the source with ``ast``:
every ``import`` counts, also those inside functions.

Layers, lowest first (docs/architecture.md):

0. core — options, validation, reduction, the float64 reference, the chunk loops
   (``softxent._*``);
1. kernels — ``softxent.cpu``, ``softxent.gpu``;
2. frontends — ``softxent.numpy_*``, ``softxent.torch``, ``softxent.jax``;
3. integrations — ``softxent.transformers`` (and ``softxent.torch.distributed``, which sits in
   the torch package but never imports its public functions);
4. tools — ``softxent.bench``, ``softxent.cli``.

Inside ``softxent.torch``: public functions and modules → ops → shared helpers → backends.
"""

from __future__ import annotations

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

TORCH_LAYERS = {
    "public": {"functional", "linear", "distill", "modules", "distributed"},
    "ops": {"ops"},
    "helpers": {"checks", "training", "saved_gradient", "linear_arrays", "linear_options", "distill_composite",
                "higher_order", "eager_calls"},
    "backends": {
        "backends", "cpu_bridge", "fallback", "distill_rows", "cpu_buffers", "openmp_threads",
        "deferred_checks", "target_counts", "widening_gemm", "chunk_streams",
    },
}  # fmt: skip
TORCH_ORDER = ["backends", "helpers", "ops", "public"]


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(modules):
    """({module: imported softxent modules}, [private names taken from another file])."""
    edges, private = {}, []
    for module, (path, is_package) in modules.items():
        tree, aliases, targets = ast.parse(path.read_text()), {}, set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(module, is_package, node.level, node.module)
                if not source.startswith("softxent"):
                    continue
                for alias in node.names:
                    child = f"{source}.{alias.name}"
                    if child in modules:
                        targets.add(child)
                        aliases[alias.asname or alias.name] = child
                        continue
                    targets.add(source)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{module}: from {source} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("softxent"):
                        targets.add(alias.name)
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in modules:
                    if f"{aliases[node.value.id]}.{node.attr}" not in modules:
                        private.append(f"{module}: {node.value.id}.{node.attr}")
        # a module's own package (its __init__ runs first anyway) is not an edge
        edges[module] = {t for t in targets if t in modules and t != module and not module.startswith(t + ".")}
    return edges, private


MODULES = _modules()
EDGES, PRIVATE = _imports(MODULES)


def _cycles(edges) -> list[list[str]]:
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int:
    name = module.removeprefix("softxent.")
    if name.startswith(("bench", "cli")) or name == "__main__":
        return 4
    if name == "transformers" or name == "torch.distributed":
        return 3
    if name.startswith(("torch", "jax", "numpy_")) or name == "softxent":
        return 2
    if name.startswith(("cpu", "gpu")):
        return 1
    return 0


def test_there_is_no_import_circle():
    assert _cycles(EDGES) == []


def test_no_private_name_is_imported_from_another_file():
    assert PRIVATE == []


def test_layers_only_import_downward():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in EDGES.items()
        for target in targets
        if module != "softxent" and _layer(target) > _layer(module) and not target.startswith("softxent.torch.")
    ]
    assert upward == []


def test_torch_layers_only_import_downward():
    rank = {name: TORCH_ORDER.index(layer) for layer, names in TORCH_LAYERS.items() for name in names}
    torch_modules = {m.removeprefix("softxent.torch.") for m in MODULES if m.startswith("softxent.torch.")}
    assert torch_modules <= set(rank), f"place every torch module in a layer: {sorted(torch_modules - set(rank))}"
    upward = []
    for module, targets in EDGES.items():
        if not module.startswith("softxent.torch."):
            continue
        here = module.removeprefix("softxent.torch.")
        for target in targets:
            there = target.removeprefix("softxent.torch.")
            if target.startswith("softxent.torch.") and rank[there] > rank[here]:
                upward.append(f"{here} ({TORCH_ORDER[rank[here]]}) imports {there} ({TORCH_ORDER[rank[there]]})")
    assert upward == []


def test_distributed_never_imports_the_public_functions():
    assert not EDGES["softxent.torch.distributed"] & {"softxent.torch.functional", "softxent.torch.linear"}


def test_the_checker_sees_a_circle_and_a_private_import():
    """The checks above can fail: a made-up circle and private import are found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _layer("softxent.bench.runner") > _layer("softxent.torch.ops") > _layer("softxent._options")
