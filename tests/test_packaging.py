"""One import namespace: every package folder is installed as `hotlora.<folder>`, and no code
imports the folders by their bare names (`import kernels` would be Hugging Face's package, and
`from server import ...` works only while the checkout root happens to be on sys.path)."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("server", "kernels", "adapters", "training")
CODE = (*FOLDERS, "tests", "load_tests")


def _python_files() -> list[Path]:
    return sorted(p for d in CODE for p in (REPO / d).rglob("*.py"))


def _bare_imports(path: Path) -> list[str]:
    """`import kernels...` / `from server... import` lines (relative imports are not bare)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names
                  if n.split(".")[0] in FOLDERS]  # fmt: skip
    return found


def test_no_code_imports_a_package_folder_by_its_bare_name() -> None:
    bad = [line for p in _python_files() for line in _bare_imports(p)]
    assert not bad, "import these as hotlora.<folder>...:\n" + "\n".join(bad)


def test_the_guard_sees_a_bare_import(tmp_path: Path) -> None:
    probe = REPO / "tests" / "_probe_bare_import.py"  # must sit under REPO for relative_to
    probe.write_text("import kernels.lora\nfrom server.engine import Engine\nfrom . import x\n")
    try:
        assert [s.split(": ")[1] for s in _bare_imports(probe)] == ["kernels.lora", "server.engine"]
    finally:
        probe.unlink()


# Module paths written as strings: `python -m server`, `serve run server.ray_app:app`, a
# RayService's import_path. Each must name the module as installed.
_MOD = r"(?<![\w./-])(?:server|kernels|adapters|training)(?:\.[a-z_]+)*"
_STRING_PATHS = re.compile(
    rf"-m\s+{_MOD}\b|\"-m\",\s*\"{_MOD}\"|import_path:\s*{_MOD}|serve run\s+{_MOD}"
    rf"|{_MOD}\.[a-z_]+:[a-z_]+"
)
TEXT_FILES = ("*.py", "*.sh", "*.yaml", "*.yml", "*.md", "*.toml", "Dockerfile", "run", "setup")


def test_module_paths_in_strings_and_docs_name_the_hotlora_namespace() -> None:
    paths = {p for pat in TEXT_FILES for p in REPO.rglob(pat)}
    bad = []
    for path in sorted(paths):
        rel = path.relative_to(REPO)
        skip = (".venv", ".git", "build", "site")
        if rel.parts[0] in skip or "egg-info" in str(rel) or path == Path(__file__).resolve():
            continue
        for m in _STRING_PATHS.finditer(path.read_text(encoding="utf-8", errors="replace")):
            line = m.string.count("\n", 0, m.start()) + 1
            bad.append(f"{rel}:{line}: {m.group(0).strip()}")
    assert not bad, "write these as hotlora.<module>:\n" + "\n".join(bad)


def test_the_package_list_names_every_package_folder() -> None:
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {f"hotlora.{f}": f for f in FOLDERS}
    assert tool["package-dir"] == mapped
    on_disk = {
        "hotlora." + ".".join(init.parent.relative_to(REPO).parts)
        for f in FOLDERS
        for init in (REPO / f).rglob("__init__.py")
    }
    assert set(tool["packages"]) == on_disk


@pytest.mark.parametrize("name", FOLDERS)
def test_each_folder_is_imported_from_the_checkout_as_hotlora(name: str) -> None:
    module = __import__(f"hotlora.{name}", fromlist=["_"])
    assert Path(module.__file__ or "").resolve() == REPO / name / "__init__.py"
