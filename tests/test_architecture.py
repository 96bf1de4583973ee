"""Imports point one way: dspost (core, with dspost/data) -> rollout, rewards -> model -> kernels.

Read with `ast` from the source folders (pyproject.toml's package-dir: `dspost.rollout` is `rollout/`, ...), so an
import inside a function counts as much as one at the top of a module, and relative imports count as what they
resolve to. rollout and rewards are siblings: neither may import the other (a critic that needs an engine is
handed one by its caller in dspost)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (installed package, layer); a layer may import its own and lower layers only.
LAYERS = {"dspost": ("dspost", 3), "rollout": ("dspost.rollout", 2), "rewards": ("dspost.rewards", 2),
          "model": ("dspost.model", 1), "kernels": ("dspost.kernels", 0)}


def folder_of(module: str) -> str | None:
    """The source folder an absolute module name lives in (None: not ours). `dspost.models` is core, not model."""
    if module != "dspost" and not module.startswith("dspost."):
        return None
    for folder, (package, _) in LAYERS.items():
        if folder != "dspost" and (module == package or module.startswith(package + ".")):
            return folder
    return "dspost"


def module_of(rel: Path) -> str:
    """The installed name of a source file (relative to the repository root): rollout/pool.py ->
    dspost.rollout.pool, dspost/data/__init__.py -> dspost.data."""
    parts = [*LAYERS[rel.parts[0]][0].split("."), *rel.parts[1:-1]]
    return ".".join(parts if rel.stem == "__init__" else [*parts, rel.stem])


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, str]]:
    """(line, absolute module, statement) of every import in `tree`, at any depth. `from A import b` yields `A.b`
    (`from dspost import rollout` is an import of dspost.rollout; `A.b` of a function b maps to A's folder)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, ast.unparse(node)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(node.lineno, f"{base}.{a.name}", ast.unparse(node)) for a in node.names]
    return found


def allowed(src: str, dst: str) -> bool:
    return src == dst or LAYERS[dst][1] < LAYERS[src][1]


def violations(root: Path = ROOT) -> list[str]:
    """'file:line: `import statement` (src -> dst)' for every import that points up or sideways."""
    out = []
    for folder in LAYERS:
        for path in sorted((root / folder).rglob("*.py")):
            module = module_of(path.relative_to(root))
            tree = ast.parse(path.read_text(), str(path))
            for line, target, statement in imported_modules(tree, module, path.stem == "__init__"):
                dst = folder_of(target)
                if dst is not None and not allowed(folder, dst):
                    out.append(f"{path.relative_to(root)}:{line}: `{statement}` ({folder} -> {dst})")
    return out


def test_imports_point_one_way():
    bad = violations()
    assert not bad, ("imports must point dspost -> rollout, rewards -> model -> kernels:\n" + "\n".join(bad))


def test_every_source_folder_is_scanned():
    """A folder renamed or moved out of the scan would make the test above pass vacuously."""
    for folder in LAYERS:
        assert list((ROOT / folder).rglob("*.py")), f"{folder}/ has no Python files: is LAYERS out of date?"


@pytest.mark.parametrize("folder,source,edge", [
    ("rewards", "import dspost.rollout\n", "rewards -> rollout"),
    ("rewards", "def f():\n    from dspost.rollout.engine import VLLMEngine\n", "rewards -> rollout"),
    ("rewards", "from ..rollout import engine\n", "rewards -> rollout"),
    ("rollout", "from dspost import rewards\n", "rollout -> rewards"),
    ("model", "from dspost.grpo import run_grpo\n", "model -> dspost"),
    ("kernels", "from .. import model\n", "kernels -> model"),
])
def test_an_upward_or_sideways_import_is_named(tmp_path, folder, source, edge):
    """The checker itself: each planted edge is reported with its file, line and direction."""
    for f in LAYERS:
        (tmp_path / f).mkdir()
    (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / folder / "planted.py").write_text("import os\n" + source)
    (tmp_path / "model" / "ok.py").write_text("from dspost.kernels import reference\nfrom dspost import kernels\n")
    (tmp_path / "dspost" / "models.py").write_text("from dspost.rollout.engine import VLLMEngine\n")
    [bad] = violations(tmp_path)
    assert bad.startswith(f"{folder}/planted.py:") and bad.endswith(f"({edge})")


def test_a_judge_is_handed_its_engine(tmp_path):
    """rewards/ starts no engine: `make_critic("judge:DIR")` builds the judge on the engine its caller's factory
    returns, and without one says so."""
    from dspost.rewards.critics import make_critic

    with pytest.raises(ValueError, match="a judge needs an engine"):
        make_critic(f"judge:{tmp_path}")
