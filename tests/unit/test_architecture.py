"""The import graph of Phalanx, read from the source (ast; imports inside functions included): no circles, imports
point down the layers, and an import inside a function says why it is there.

The layers, top to bottom (docs/architecture.md draws them):
    commands -> tools -> train -> parallel, data, observe -> runtime, models -> config, durable, paths -> errors
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "phalanx"

LAYERS = {"errors": 0, "config": 1, "durable": 1, "paths": 1, "runtime": 2, "models": 2, "parallel": 3, "data": 3,
          "observe": 3, "train": 4, "tools": 5, "commands": 6, "__main__": 7, "__init__": 7}
"""Layer of each top-level module or package of phalanx: an import may point to its own layer or below."""

ALLOWED_UP = {
    # The one import that points up: the rank entry is handed to the launcher as a dotted name by the command,
    # never imported by runtime itself (see test_the_launcher_never_imports_the_commands); none today.
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The Phalanx module an import names (a module of a package named by `from package import module`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported Phalanx module, line, inside a function) for each import in `path`."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(fn) if n is not fn)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "phalanx" and (target := _resolve(name)) and target != "phalanx":
                out.append((target, node.lineno, id(node) in inside))
    return out


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, _, _ in imports(path):
            if target != mod:
                g[mod].add(target)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or with a self-loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in g[v]:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer(mod: str) -> int:
    top = mod.split(".")[1] if "." in mod else "__init__"
    return LAYERS[top]


def test_every_module_has_a_layer():
    assert {m.split(".")[1] for m in MODULES if "." in m} <= set(LAYERS), sorted(MODULES)


def test_the_import_graph_has_no_circles():
    assert cycles(graph()) == []


def test_imports_point_down_the_layers():
    up = sorted(f"{mod} -> {target}" for mod, targets in graph().items() for target in targets
                if layer(target) > layer(mod))
    assert set(up) <= set(ALLOWED_UP), up


def test_config_imports_nothing_of_phalanx_but_errors():
    assert graph()["phalanx.config"] <= {"phalanx.errors"}


def test_the_launcher_never_imports_the_commands():
    assert not any(t.startswith("phalanx.commands") for t in graph()["phalanx.runtime.launch"])


def test_an_import_of_phalanx_inside_a_function_says_why():
    """Inside a function only for an optional dependency or a measured start-up cost: a comment on the line
    or the line above says which."""
    silent = []
    for mod, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, lineno, inside in imports(path):
            if inside and "#" not in lines[lineno - 1] and "#" not in lines[lineno - 2]:
                silent.append(f"{path.relative_to(SRC)}:{lineno} imports {target}")
    assert silent == []


def test_the_checker_finds_a_circle_and_an_upward_import():
    """The checks above would fail on a real circle: the same functions on a small made-up graph."""
    g = {"phalanx.train.a": {"phalanx.parallel.b"}, "phalanx.parallel.b": {"phalanx.train.a"}, "phalanx.errors": set()}
    assert cycles(g) == [["phalanx.parallel.b", "phalanx.train.a"]]
    assert layer("phalanx.train.a") > layer("phalanx.parallel.b")


DEVICE_KINDS = {"cuda", "xla", "mps"}


def device_kind_mentions(path: Path) -> list[str]:
    """Code (not docstrings) that names a device kind: `torch.cuda.…`, `torch_xla`, or a comparison with a
    kind's name (`device.type == "cuda"`)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch" \
                and node.attr in DEVICE_KINDS:
            out.append(f"{node.lineno}: torch.{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
            if any(n.split(".")[0] == "torch_xla" for n in names):
                out.append(f"{node.lineno}: imports torch_xla")
        elif isinstance(node, ast.Compare):
            consts = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
            if any(c in DEVICE_KINDS for c in consts):
                out.append(f"{node.lineno}: compares with {consts}")
    return out


def test_only_runtime_names_a_device_kind():
    """Everything else asks the accelerator (runtime.accelerator(), runtime.of(device)) what a device can do."""
    # config.py checks the --device option's value itself (it imports nothing of Phalanx but errors).
    named = {str(p.relative_to(SRC)): m for mod, p in MODULES.items()
             if not mod.startswith("phalanx.runtime") and mod != "phalanx.config" and (m := device_kind_mentions(p))}
    assert named == {}


def test_the_device_kind_check_sees_a_cuda_call(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('import torch\n"""torch.cuda in a docstring is fine"""\nif x.type == "cuda":\n'
                 '    torch.cuda.synchronize()\n')
    assert device_kind_mentions(f) == ["3: compares with ['cuda']", "4: torch.cuda"]
