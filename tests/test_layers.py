"""The import layers hold: no function body in ``seqjax/`` or ``pallas_kernels/`` imports a project module (an
import hidden in a function is how a cycle between layers hides), and only optional third-party packages are
imported lazily. The layer order itself is the import-linter contract in ``.importlinter`` (``lint-imports``)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = ("seqjax", "pallas_kernels")
# optional dependencies (extras), imported only where they are used
OPTIONAL = ("tensorboardX", "matplotlib", "sklearn", "mnist1d", "tensorflow_datasets", "grain", "orbax", "tqdm",
            "torch", "libtpu", "jax.experimental.topologies", "networkx")
FILES = sorted(p for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py"))


def _lazy_imports(tree):
    """``(line, module)`` of every import inside a function or lambda body."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    yield from ((node.lineno, a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = "." * node.level + (node.module or "")
                    yield from ((node.lineno, f"{base}.{a.name}" if node.module else base + a.name) for a in node.names)


def _allowed(module):
    return any(module == m or module.startswith(m + ".") for m in OPTIONAL)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_project_import_inside_a_function(path):
    found = sorted(set(_lazy_imports(ast.parse(path.read_text(), str(path)))))
    bad = [f"{path.relative_to(ROOT)}:{line} imports {m}" for line, m in found if not _allowed(m)]
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(bad)


def test_the_check_sees_lazy_imports():
    tree = ast.parse("def f():\n    from seqjax.mixers import gla\n    import tqdm\n    return lambda: __import__('x')\n")
    assert sorted(_lazy_imports(tree)) == [(2, "seqjax.mixers.gla"), (3, "tqdm")]
    assert not _allowed("seqjax.mixers.gla") and _allowed("tqdm") and not _allowed("tqdm_extra")


def test_import_linter_contracts_hold(monkeypatch):
    """``lint-imports`` with the repository's ``.importlinter``: the layers, no engine or kernel importing a layer,
    a core free of training-only packages, no cycle between the modules of a package."""
    cli = pytest.importorskip("importlinter.cli")
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    assert cli.lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True, no_logo=True) == 0
