"""Habits that keep the code honest, run with the tests: lint, the layering contracts, and every
benchmark the docs show starting the way they say to run it."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = sorted(p for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text(encoding="utf-8"))
PACKAGES = ("console", "scheduler", "gpu", "server", "themes", "cluster", "client")


def _tool(name: str) -> str:
    """A console script of this interpreter's environment (the venv the tests run in)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_ruff_finds_nothing():
    run = subprocess.run([_tool("ruff"), "check", "--no-cache", str(ROOT)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_import_contracts_are_kept(tmp_path):
    """pyproject.toml's import-linter contracts (the console's UI apart from torch and the engine,
    the client apart from torch and the engine but for ``Model(config=)``, the engine apart from
    textual and aiohttp, the layers in order).  The editable install maps
    the folders into ``modelconsole.*`` with an import hook that import-linter cannot walk, so the
    same mapping is laid out here as symlinks."""
    pkg = tmp_path / "modelconsole"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in PACKAGES:
        (pkg / name).symlink_to(ROOT / name, target_is_directory=True)
    run = subprocess.run([_tool("lint-imports"), "--config", str(ROOT / "pyproject.toml")], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"Contracts: \d+ kept, 0 broken", run.stdout), run.stdout[-2000:]


# Strict types: the pure modules (decisions, formats between processes) and the public client
TYPED_STRICT = ("modelconsole.scheduler.policy", "modelconsole.scheduler.routing", "modelconsole.scheduler.rows",
                "modelconsole.scheduler.stats", "modelconsole.scheduler.wire", "modelconsole.gpu.budget",
                "modelconsole.server.ipc", "modelconsole.server.codec", "modelconsole.client.model",
                "modelconsole.client.inprocess", "modelconsole.scheduler.running", "modelconsole.console.picture",
                "modelconsole.console.keys")


def _package_tree(tmp_path: Path) -> Path:
    """``modelconsole.*`` laid out as symlinks (the editable install's import hook is invisible to
    import-linter and mypy)."""
    pkg = tmp_path / "modelconsole"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in PACKAGES:
        (pkg / name).symlink_to(ROOT / name, target_is_directory=True)
    return tmp_path


def _mypy(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    tree = _package_tree(tmp_path)
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                          "--no-incremental", *args], capture_output=True, text=True, cwd=tree, timeout=900)
    if "No module named mypy" in run.stderr:
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    return run


def test_the_pure_modules_and_the_client_type_check_strictly(tmp_path):
    run = _mypy(tmp_path, "--strict", *(a for m in TYPED_STRICT for a in ("-m", m)))
    assert run.returncode == 0 and "Success" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


def test_the_whole_package_type_checks(tmp_path):
    run = _mypy(tmp_path, "-p", "modelconsole")
    assert run.returncode == 0 and "Success" in run.stdout, run.stdout[-6000:] + run.stderr[-2000:]


def _runtime_imports(path: Path, module: str) -> set[str]:
    """The package modules ``module`` imports when it runs: at the top and inside functions
    (a lazy import is still an edge), not under ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_cycles() -> list[list[str]]:
    """Groups of package modules that import each other, directly or around a loop (Tarjan's
    strongly connected components over the runtime imports)."""
    modules: dict[str, Path] = {}
    for name in PACKAGES:
        for f in (ROOT / name).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mod = "modelconsole." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[mod] = f
    graph = {m: sorted(t for t in _runtime_imports(f, m) if t in modules and t != m) for m, f in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in index:
            connect(v)
    return cycles


def test_no_module_imports_itself_around_a_loop():
    """A loop of imports (even a lazy one that makes it work) means a module does two jobs: what
    the modules share belongs in a module below them (the server's ``web.py``)."""
    assert import_cycles() == []


def test_every_documented_bench_script_is_tested():
    documented = set()
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        documented |= set(re.findall(r"python (bench/\w+\.py)", doc.read_text(encoding="utf-8")))
    assert documented <= {str(p.relative_to(ROOT)) for p in BENCH}, documented


@pytest.mark.parametrize("script", BENCH, ids=lambda p: p.name)
def test_bench_script_starts_as_documented(script):
    """``python bench/X.py --help`` from the repository root, as the docs run them (bench/http.py
    must not shadow the standard library's http for any of them)."""
    run = subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "usage:" in run.stdout


USER_DOCS = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.toml")]
SOURCES = [p for pkg in (*PACKAGES, "bench") for p in (ROOT / pkg).rglob("*.py")]


def test_the_readme_opens_with_its_title_and_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# modelconsole"
    block = lines[lines.index("```") + 1:]
    block = block[:block.index("```")]
    assert block == ["pip install -e . && modelconsole --demo", "pip install -e '.[test]' && python -m pytest -q"]


@pytest.mark.parametrize("pattern", [r"\b[Ii]ssues? \d", r"\bthis issue\b", r"\.\./shared/|shared/reference|DESIGN\.md"])
def test_user_documents_and_code_say_what_exists_not_when_it_came(pattern):
    """Users read what the product does: no internal issue numbers, no files outside the repository."""
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in USER_DOCS + SOURCES
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if re.search(pattern, line)]
    assert not found, "\n".join(found[:20])


def test_no_module_reaches_into_the_engines_private_members():
    """versions.py (and every other module) sees the engine through a public or typed face
    (versions.VersionHost): ``engine._x`` outside engine.py is a layering break.  enginehost.py
    is that face, the engine's own adapter: the one other place its privates are named."""
    pattern = re.compile(r"\bengine\._[a-z]|\._engine\._[a-z]")
    found = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for pkg in ("scheduler", "server", "cluster", "console", "client")
             for p in (ROOT / pkg).rglob("*.py") if p.name not in ("engine.py", "enginehost.py")
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)


MAX_MODULE_LINES = 900


def test_no_module_of_the_package_is_over_900_lines():
    """A module past this does more than one job: split it by concern (docs/architecture.md)."""
    long = [f"{p.relative_to(ROOT)}: {n} lines" for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, "\n".join(long)
