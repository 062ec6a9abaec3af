"""The shape of the production code: file and function sizes, and the package boundaries.

Production = the packages a wheel installs: logitstore (the store core and logitstore.toolkit),
teacher_dump, student_train, eval, student_export, distill_serve. Tests, benchmarks and the demo are not held to these rules.

* No file over MAX_FILE_LINES lines, no function or method over MAX_FUNCTION_LINES lines
  (from its `def`, or its first decorator, to its last line; nested functions count inside
  their parent and on their own). There is no allow-list: split what grows past them.
* The store core (logitstore.* outside logitstore.toolkit) imports neither torch, transformers
  nor datasets, checked by importing every core module in a fresh interpreter, and never
  imports logitstore.toolkit, checked on the source.
* The tools (teacher_dump, student_train, eval, student_export, distill_serve) share code only
  through logitstore: no module of one imports another of them, function-level imports
  included.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("logitstore", "teacher_dump", "student_train", "eval", "student_export",
              "distill_serve")
TOOLS = ("teacher_dump", "student_train", "eval", "student_export", "distill_serve")
HEAVY = ("torch", "transformers", "datasets")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def production_files() -> list[Path]:
    return sorted(p for package in PRODUCTION for p in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_core(module: str) -> bool:
    return module.split(".")[0] == "logitstore" and not module.startswith("logitstore.toolkit")


def long_functions(source: str, limit: int) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function or method over `limit` lines."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                lines = child.end_lineno - first + 1
                if lines > limit:
                    found.append((name[:-1], first, lines))
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module `module`'s source imports, at any depth (function bodies included),
    relative imports resolved; `from X import Y` counts as X and X.Y (Y may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(encoding="utf-8"), module_name(path),
                            path.name == "__init__.py")


# ----------------------------------------------------------------------------- the checkers

def test_the_checkers_catch_what_they_must():
    # A rule whose checker sees nothing would pass forever: show each one a violation.
    long = "@decorator\ndef f():\n" + "    x = 1\n" * 80 + "\nclass C:\n    def g(self):\n" + \
        "        def inner():\n" + "            y = 2\n" * 81
    assert [(name, lines) for name, _, lines in long_functions(long, 80)] == [
        ("f", 82), ("C.g", 83), ("C.g.inner", 82)]
    source = textwrap.dedent("""
        import torch.nn as nn
        from . import sibling
        from ..other import thing

        def late():
            from student_train.losses import IGNORE
    """)
    found = imported_modules(source, "eval.sub.mod", is_package=False)
    assert {"torch.nn", "eval.sub", "eval.sub.sibling", "eval.other", "eval.other.thing",
            "student_train.losses", "student_train.losses.IGNORE"} <= found


# ----------------------------------------------------------------------------- sizes

def test_no_production_file_is_too_long():
    files = production_files()
    assert len(files) > 30, f"found only {len(files)} production files under {ROOT}"
    too_long = {str(p.relative_to(ROOT)): n for p in files
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not too_long, (f"production files over {MAX_FILE_LINES} lines (split them by "
                          f"concept): {too_long}")


def test_no_production_function_is_too_long():
    too_long = [f"{p.relative_to(ROOT)}:{line} {name} ({lines} lines)"
                for p in production_files()
                for name, line, lines in long_functions(p.read_text(encoding="utf-8"),
                                                        MAX_FUNCTION_LINES)]
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines (split them into named "
                          f"steps): " + "; ".join(too_long))


# ----------------------------------------------------------------------------- boundaries

def core_modules() -> list[str]:
    return [module_name(p) for p in production_files()
            if is_core(module_name(p)) and p.name != "__main__.py"]


# The one exception: `logitstore decontaminate` needs evaluation data (lm-eval) and the
# store's tokenizer (transformers), so its command module imports this toolkit module
# inside the command; importing the core still loads no toolkit module (checked below).
CORE_TOOLKIT_GATEWAYS = {"logitstore.cli_decontaminate": {"logitstore.toolkit.eval_texts"},
                         "logitstore.cli_ops": {"logitstore.toolkit.add_text"}}


def test_the_store_core_never_imports_the_toolkit():
    def allowed(module: str, imported: str) -> bool:  # the gateway or a name inside it
        return any(imported == g or imported.startswith(g + ".")
                   for g in CORE_TOOLKIT_GATEWAYS.get(module, ()))

    offenders = {module_name(p): sorted(m for m in imports_of(p)
                                        if m.startswith("logitstore.toolkit")
                                        and not allowed(module_name(p), m))
                 for p in production_files() if is_core(module_name(p))}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, (f"store core modules import logitstore.toolkit (the core must "
                           f"work without the tools' helpers): {offenders}")


def test_importing_the_store_core_loads_no_torch_transformers_or_datasets():
    modules = core_modules()
    assert "logitstore.reader" in modules and "logitstore.cli" in modules, modules
    code = textwrap.dedent(f"""
        import importlib, json, sys
        for name in {modules!r}:
            importlib.import_module(name)
        print(json.dumps(sorted(m for m in sys.modules
                                if m in {HEAVY!r} or m.startswith("logitstore.toolkit"))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], (f"importing the store core ({len(modules)} modules) loaded {loaded}: "
                          f"import them inside the functions of logitstore.toolkit or the tools "
                          f"(and the toolkit inside the functions of CORE_TOOLKIT_GATEWAYS)")


@pytest.mark.parametrize("tool", TOOLS)
def test_no_tool_imports_another_tool(tool):
    others = [t for t in TOOLS if t != tool]
    offenders = {}
    for path in (ROOT / tool).rglob("*.py"):
        bad = sorted(m for m in imports_of(path) if m.split(".")[0] in others)
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, (f"{tool} imports another tool (shared code belongs in "
                           f"logitstore.toolkit): {offenders}")
