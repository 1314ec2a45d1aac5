"""The package's size rules (a reader sees a function, a module and a docstring whole) and the
design notes the module docstrings link to.

In ``sha_rnn_kernels/``: no Python function over 120 lines outside ``@triton.jit`` kernels, no
module over 900 lines, no module docstring over 60 lines.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sha_rnn_kernels"
MAX_FUNCTION_LINES = 120
MAX_MODULE_LINES = 900
MAX_DOCSTRING_LINES = 60
# Modules allowed to break the rules while they are being split, as paths inside
# sha_rnn_kernels/: none now, every module of the package follows the rules.
ALLOWED: set = set()
DESIGN_NOTES = ["attention", "boom", "decode", "lstm"]


def _modules():
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in ALLOWED
    )


def _is_triton_kernel(node) -> bool:
    """Decorated with ``triton.jit`` (called or not) or ``triton.autotune``/``heuristics``."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "triton"
            and target.attr in ("jit", "autotune", "heuristics")
        ):
            return True
    return False


def _long_functions(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        functions = (ast.FunctionDef, ast.AsyncFunctionDef)
        if isinstance(node, functions) and not _is_triton_kernel(node):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - start + 1
            if length > MAX_FUNCTION_LINES:
                where = path.relative_to(ROOT) if ROOT in path.parents else path
                yield f"{where}:{node.lineno} {node.name}: {length} lines"


def test_the_rules_see_every_module():
    # A rule over an empty list passes whatever the code looks like.
    names = {p.name for p in _modules()}
    assert {"modules.py", "reference.py", "attention.py", "lstm.py", "boom.py"} <= names, names


def test_no_function_over_the_limit():
    long = [line for path in _modules() for line in _long_functions(path)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them by meaning):\n" + (
        "\n".join(long)
    )


def test_no_module_over_the_limit():
    long = []
    for path in _modules():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_module_docstring_over_the_limit():
    long = []
    for path in _modules():
        docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        if docstring is not None and len(docstring.splitlines()) > MAX_DOCSTRING_LINES:
            long.append(f"{path.relative_to(ROOT)}: {len(docstring.splitlines())} lines")
    assert not long, (
        f"module docstrings over {MAX_DOCSTRING_LINES} lines (move the derivation to "
        "docs/design/<op>.md):\n" + "\n".join(long)
    )


def test_the_rules_catch_what_they_forbid(tmp_path):
    # A long plain function is reported; a long Triton kernel (called decorator or not) is not.
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "long.py"
    source.write_text(
        f"def too_long():\n{body}\n\n\n@triton.jit\ndef kernel():\n{body}\n\n\n"
        f"@triton.jit(do_not_specialize=['t'])\ndef step_kernel(t):\n{body}\n"
    )
    found = list(_long_functions(source))
    assert len(found) == 1 and "too_long" in found[0], found


NOTES = [f"docs/design/{op}.md" for op in DESIGN_NOTES] + ["docs/architecture.md"]


@pytest.mark.parametrize("note", NOTES)
def test_design_notes_exist(note):
    path = ROOT / note
    assert path.is_file(), f"{note} is missing"
    assert path.read_text().startswith("# "), f"{note} has no title"


@pytest.mark.parametrize("op", DESIGN_NOTES)
def test_op_docstrings_link_their_note(op):
    docstring = ast.get_docstring(ast.parse((PACKAGE / "ops" / f"{op}.py").read_text()))
    assert f"docs/design/{op}.md" in docstring, f"ops/{op}.py's docstring does not link its note"
