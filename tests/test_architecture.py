"""The package's shape, read from its source with `ast`: no private name crosses modules, the
layer and the export orchestration stay small, no function grows past one screen, and `export`
depends on `keras_bn`, never the reverse."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.joinpath("keras_bn").glob("*.py"), *ROOT.joinpath("export").glob("*.py")])
# Package modules by their import names: export/ installs as keras_bn.export.
MODULES = {
    (f"keras_bn.{p.stem}" if p.parent.name == "keras_bn" else f"keras_bn.export.{p.stem}"): p
    for p in SOURCES
}
MAX_LINES = {"keras_bn/layer.py": 450, "export/converter.py": 450}
MAX_BODY = 80  # statements of one function, its docstring not counted
LONG_ALLOWED = {("export/cli.py", "build_parser")}  # the CLI's argument table


def module_name(path):
    rel = path.relative_to(ROOT)
    return (".".join(rel.with_suffix("").parts)).replace("export.", "keras_bn.export.", 1)


def resolve(path, node):
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module_name(path).rsplit(".", node.level)[0]
    return f"{package}.{node.module}" if node.module else package


def private_crossings(path, text=None):
    """[(line, text)] where `path` uses a private name defined in another package module: `from
    keras_bn.x import _y` (a name, not a module), or `x._y` on an imported package module or on a
    name imported from one. A private module itself (`from keras_bn import _stats`) may be
    imported: its public names are the package's internal API. `_keras_internals` is the one
    home of private Keras APIs, its names are all public."""
    tree = ast.parse(path.read_text() if text is None else text)
    bound = {}  # local name -> module it is or comes from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(path, node)
            if not source.startswith("keras_bn"):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                is_module = target in MODULES
                if alias.name.startswith("_") and not is_module:
                    found.append((node.lineno, f"from {source} import {alias.name}"))
                bound[alias.asname or alias.name] = target if is_module else source
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keras_bn"):
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return sorted(found)


def test_the_sources_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"keras_bn/layer.py", "keras_bn/_stats.py", "export/converter.py"} <= names
    assert len(SOURCES) >= 30


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_private_name_crosses_modules(path):
    assert private_crossings(path) == []


def test_the_crossing_check_finds_crossings():
    # The negative case: each form the check refuses, as if in a module of the package.
    source = (
        "from keras_bn.fold import _plan\n"
        "from keras_bn import fold\n"
        "from keras_bn.layer import BatchNorm\n"
        "fold._apply(None)\n"
        "BatchNorm._update_moving\n"
        "from keras_bn import _stats\n"  # allowed: a private module
        "_stats.moments\n"
    )
    found = [text for _, text in private_crossings(ROOT / "keras_bn" / "probe.py", source)]
    assert found == ["from keras_bn.fold import _plan", "fold._apply", "BatchNorm._update_moving"]


def test_keras_bn_never_imports_export():
    for path in ROOT.joinpath("keras_bn").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "export" not in resolve(path, node).split("."), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("keras_bn.export") for a in node.names), path


@pytest.mark.parametrize("rel", sorted(MAX_LINES))
def test_layer_and_converter_stay_small(rel):
    lines = ROOT.joinpath(rel).read_text().count("\n")
    assert lines <= MAX_LINES[rel], f"{rel}: {lines} lines"


def body_lines(function):
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def long_functions():
    found = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if body_lines(node) > MAX_BODY and (rel, node.name) not in LONG_ALLOWED:
                    found.append((rel, node.name, body_lines(node)))
    return found


def test_no_function_body_is_over_80_lines():
    assert long_functions() == []


def test_body_lines_counts_statements_not_the_docstring():
    tree = ast.parse('def f():\n    """doc\n    more"""\n    a = 1\n\n    return a\n')
    assert body_lines(tree.body[0]) == 3
