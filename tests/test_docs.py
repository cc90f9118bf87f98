"""The documentation a user meets: the README as a landing page, docstrings about the API (no
machine diaries), an API reference entry for every public name, and benchmark results as data.
`mkdocs build --strict` itself runs in .ci/run (a broken link or a missing snippet fails CI)."""

import ast
import importlib
import os
import re

import keras_bn
from keras_bn import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


# What belongs in benchmark results, not in a docstring: machine models, dates, timings.
DIARY = re.compile(
    r"Xeon|EPYC|Zen ?\d|Ryzen|Graviton|\b[AHV]100\b|\bH200\b|\b20\d\d-\d\d-\d\d\b|\bUTC\b"
    r"|\(measured|\bMeasured\b|measured:|\d(?:\.\d+)? ?(?:ms|µs)\b|\d+\.\d+ s\b"
    r"|\b\d+ (?:CPU )?cores\b|\bTried\b|tried and"
)


def diary_entries(source, name):
    """(where, text) for every docstring of `source` that reads like a lab notebook."""
    tree = ast.parse(source)
    found = []
    for node in [tree, *ast.walk(tree)]:
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=False) or ""
        found += [
            (f"{name}:{getattr(node, 'name', '<module>')}", m.group(0)) for m in DIARY.finditer(doc)
        ]
    return found


def test_no_docstring_names_a_machine_a_date_or_a_timing():
    found = []
    for folder in ("keras_bn", "export"):
        for file in sorted(os.listdir(os.path.join(ROOT, folder))):
            if file.endswith(".py"):
                found += diary_entries(read(folder, file), f"{folder}/{file}")
    assert found == []
    # The check finds what it looks for.
    sample = 'def f():\n    """Fast (measured on a Xeon, 2026-12-03: 3.2 ms on 2 cores)."""\n'
    assert [text for _, text in diary_entries(sample, "sample")] == [
        "(measured",
        "Xeon",
        "2026-12-03",
        "3.2 ms",
        "2 cores",
    ]


def test_the_readme_is_a_landing_page():
    text = read("README.md")
    lines = text.splitlines()
    assert len(lines) <= 250, len(lines)
    first = "\n".join(lines[:120])
    for example in ("pip install", "fold_bn(", "recalibrate(", "to_onnx(", 'precision="int8"'):
        assert example in first, example
    assert not DIARY.search(text), DIARY.search(text)
    # The Quickstart's two commands; the second is .ci/run's.
    commands = re.findall(r"^(pip install .+)$", text, re.M)
    assert commands[0] == 'pip install ".[demo]" && keras-bn demo', commands
    ci = read(".ci", "run").strip().splitlines()[-1]
    assert commands[1] in ci, (commands[1], ci)
    # Every relative link and image points to a file of the checkout.
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert os.path.exists(os.path.join(ROOT, target)), target


def reference_entries():
    """{identifier: object} for every `::: identifier` in docs/reference/*.md, resolved by
    importing it (the top-level `export` folder installs as `keras_bn.export`)."""
    entries = {}
    folder = os.path.join(ROOT, "docs", "reference")
    for page in sorted(os.listdir(folder)):
        for identifier in re.findall(r"^::: (\S+)$", read("docs", "reference", page), re.M):
            dotted = "keras_bn." + identifier if identifier.startswith("export.") else identifier
            parts = dotted.split(".")
            for split in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:split]))
                except ImportError:
                    continue
                for part in parts[split:]:
                    obj = getattr(obj, part)
                break
            entries[identifier] = obj
    return entries


def test_every_public_name_has_a_reference_entry():
    entries = reference_entries()
    documented = {id(obj) for obj in entries.values()}
    for module in (keras_bn, export):
        missing = [n for n in module.__all__ if id(getattr(module, n)) not in documented]
        assert missing == [], f"{module.__name__}: {missing}"
    for public_module in ("keras_bn.fold_math", "keras_bn.verification"):
        assert public_module in entries, public_module
    # An entry resolves to a real object; a name nobody documented is found missing.
    assert entries["keras_bn.fold_bn"] is keras_bn.fold_bn
    assert id(keras_bn.conventions.check_momentum) not in documented


def test_benchmark_results_are_data_the_docs_include():
    folder = os.path.join(ROOT, "benchmarks", "results")
    page = read("docs", "benchmarks.md")
    included = set(re.findall(r'^--8<-- "benchmarks/results/([\w.]+)"$', page, re.M))
    results = {f for f in os.listdir(folder) if f.endswith(".md")}
    assert results and included == results, (included, results)
    for name in results:
        text = read("benchmarks", "results", name)
        for field in ("- machine: ", "- date: ", "- versions: ", "- command: "):
            assert field in text, (name, field)
        assert "|---" in text, name  # a table of figures
    scripts = [f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.startswith("bench_")]
    for script in scripts:
        assert "results.recorded(" in read("benchmarks", script), script


def test_the_command_line_page_lists_every_exit_code():
    text = read("docs", "guide", "cli.md")
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 70 |", "| 130 / 143 |"):
        assert code in text, code
