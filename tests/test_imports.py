"""The package's import structure: no import cycle, and the LSTM's input reaches its kernel
through at most three modules of ours without climbing back up."""

import ast
import inspect
from pathlib import Path

import torch

import sha_rnn_kernels
from sha_rnn_kernels import LSTM, reference

PACKAGE = Path(sha_rnn_kernels.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, top_level_only: bool) -> set:
    """The package modules ``name`` imports: when it is imported (statements outside functions
    and classes), or anywhere (a function-level import is a dependency of the design too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        if top_level_only and isinstance(node, functions):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sha_rnn_kernels"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("sha_rnn_kernels"):
                continue
            for alias in node.names:  # "from . import x" imports the submodule x
                sub = f"{base}.{alias.name}"
                where = PACKAGE.parent / sub.replace(".", "/")
                found.add(sub if where.with_suffix(".py").exists() or where.is_dir() else base)
        else:
            stack.extend(ast.iter_child_nodes(node))
    found.discard(name)
    return found


def _graph(top_level_only: bool) -> dict:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = _imports(path, name, top_level_only)
    return graph


def _assert_acyclic(graph: dict) -> None:
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_no_import_cycle():
    """No cycle among the imports a module runs when it is imported."""
    graph = _graph(top_level_only=True)
    assert graph["sha_rnn_kernels.functional"] == {"sha_rnn_kernels._backend",
                                                   "sha_rnn_kernels.dispatch"}  # fmt: skip
    _assert_acyclic(graph)


# The package's __init__ imports the public names of every layer; nothing imports it back (the
# graph holds only sha_rnn_kernels.* submodules), so it is left out of the check below.
ROOT_PACKAGE = "sha_rnn_kernels"


def test_no_cycle_even_inside_functions():
    """No cycle even counting imports inside functions (the old functional <-> _device_check
    cycle was one of those; so were modules -> generate -> evaluate -> train -> modules,
    modules <-> pretrained and train <-> evaluate, which the applications had)."""
    graph = {name: edges for name, edges in _graph(top_level_only=False).items()
             if name != ROOT_PACKAGE}  # fmt: skip
    _assert_acyclic(graph)


def test_functional_holds_no_policy():
    text = (PACKAGE / "functional.py").read_text()
    for name in ("_device_check", "_lstm_auto_pick", "_first_use_lstm", "_contained", "resolve("):
        assert name not in text, name


def test_lstm_input_reaches_its_kernel_through_three_modules(monkeypatch):
    """modules.LSTM -> functional.lstm -> dispatch.lstm -> the kernel, each module once."""
    seen = []

    def kernel(*args):
        for frame in inspect.stack()[1:]:
            module = frame.frame.f_globals.get("__name__", "")
            if module.startswith("sha_rnn_kernels") and (not seen or seen[-1] != module):
                seen.append(module)
        return original(*args)

    original = reference.lstm
    monkeypatch.setattr(reference, "lstm", kernel)
    LSTM(4, 6, backend="reference")(torch.randn(3, 2, 4))
    assert list(reversed(seen)) == [
        "sha_rnn_kernels.modules", "sha_rnn_kernels.functional", "sha_rnn_kernels.dispatch"]
