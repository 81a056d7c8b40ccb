"""The package's shape, enforced: stages import downward only (import-linter's contract in
pyproject.toml, which also sees imports inside functions), no import cycles, imports at the top
of each module except the heavy ones, no module past ~450 lines, private APIs of Ray and tf_keras
only in :mod:`xray_dist.infra.compat`, and a CLI that starts without TensorFlow or Ray."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xray_dist"
MODULES = sorted(PACKAGE.rglob("*.py"))
#: Libraries a module may import inside a function: each costs seconds (TensorFlow, Ray), pulls in a
#: GUI toolkit's worth of code (matplotlib) or is optional (MLflow, tqdm, dicomweb clients).
HEAVY = {"tensorflow", "tf_keras", "ray", "mlflow", "matplotlib", "h5py", "tqdm", "tensorboard"}
MAX_LINES = 450


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _lint_imports(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_stage_contract_holds():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_stage_contract_fails_on_a_forbidden_import(tmp_path):
    """The contract is not vacuous: a copy of the package whose data stage imports the training
    stage — lazily, inside a function, the way cycles used to hide — is refused, naming the edge."""
    shutil.copytree(PACKAGE, tmp_path / "xray_dist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "xray_dist" / "data" / "splits.py"
    planted.write_text(planted.read_text() + "\n\ndef _planted():\n    from xray_dist.training import driver\n"
                       "    return driver\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = _lint_imports(tmp_path, env)
    assert r.returncode != 0, r.stdout
    assert "xray_dist.data is not allowed to import xray_dist.training" in r.stdout, r.stdout
    assert "xray_dist.data.splits -> xray_dist.training.driver" in r.stdout, r.stdout


def _imports(tree: ast.AST, module: str, top_only: bool) -> list[tuple[str, ast.AST]]:
    """(imported module, node) for each import in ``tree``: at module level only, or all of them."""
    package = module if (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").is_file() else \
        module.rsplit(".", 1)[0]
    out = []
    nodes = ast.iter_child_nodes(tree) if top_only else ast.walk(tree)
    for node in nodes:
        if top_only and isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not imports at run time
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if _module_path(full) else base, node))
    return out


def _module_path(name: str) -> Path | None:
    if not name.startswith("xray_dist"):
        return None
    p = ROOT / Path(*name.split("."))
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else (p / "__init__.py" if p.is_dir() else None)


def _trees() -> dict[str, ast.AST]:
    return {_name(p): ast.parse(p.read_text(), str(p)) for p in MODULES}


def test_no_import_cycles():
    """Tarjan over every import between the package's modules, inside functions too."""
    trees = _trees()
    graph = {m: sorted({_name(_module_path(i)) for i, _ in _imports(t, m, top_only=False) if _module_path(i)} - {m})
             for m, t in trees.items()}
    assert len(graph) == len(MODULES) > 40
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_are_at_the_top_unless_heavy():
    """An import inside a function is allowed only for what is heavy (TensorFlow, Ray, MLflow,
    matplotlib…) or a package module that imports such a library at its top, directly or not."""
    trees = _trees()
    top = {m: [i for i, _ in _imports(t, m, top_only=True)] for m, t in trees.items()}
    heavy: dict[str, bool] = {}

    def is_heavy(mod: str, seen=()) -> bool:
        if mod in heavy:
            return heavy[mod]
        res = False
        for i in top.get(mod, []):
            if i.split(".")[0] in HEAVY:
                res = True
            elif _module_path(i) and _name(_module_path(i)) not in seen and _name(_module_path(i)) != mod:
                res = is_heavy(_name(_module_path(i)), (*seen, mod))
            if res:
                break
        heavy[mod] = res
        return res

    light = []
    for m, t in trees.items():
        lazy = set(_imports(t, m, top_only=False)) - set(_imports(t, m, top_only=True))
        for i, node in lazy:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            root = i.split(".")[0]
            if root in HEAVY:
                continue
            if _module_path(i) and is_heavy(_name(_module_path(i))):
                continue
            if root != "xray_dist" and root in sys.stdlib_module_names:
                light.append(f"{m}:{node.lineno} {i} (standard library)")
            else:
                light.append(f"{m}:{node.lineno} {i}")
    assert light == [], "\n".join(sorted(set(light)))


def test_no_module_is_past_the_size_limit():
    long = {_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_private_apis_only_in_compat():
    """Ray's ``_private``/``_internal``/``_common`` modules and tf_keras's private attributes are
    reached only from :mod:`xray_dist.infra.compat`."""
    pattern = re.compile(r"\bray(\.\w+)*\.(_private|_internal|_common)\b|_random_generator|_maybe_init|_time_attr"
                         r"|\._max_t\b|ENV_VARS_TO_PROPAGATE")
    found = [f"{_name(p)}:{n}" for p in MODULES if p.name != "compat.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
    assert pattern.search((PACKAGE / "infra" / "compat.py").read_text())  # the pattern sees what it looks for


def test_another_ray_version_is_refused_with_a_clear_error(monkeypatch):
    from xray_dist.infra import compat

    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    compat.check_ray_version(compat.RAY_VERSION)
    with pytest.raises(compat.CompatError, match=r"needs Ray 2\.60\.0 .* has Ray 2\.59\.1"):
        compat.check_ray_version("2.59.1")
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    compat.check_ray_version("2.59.1")


def test_the_cli_starts_without_tensorflow_or_ray():
    code = ("import sys, xray_dist.cli\nfrom xray_dist.cli import app\napp.build_parser().format_help()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tf_keras', 'ray', 'keras', "
            "'mlflow', 'matplotlib'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
