"""mkdocs hook: put the few repository files the site shows into the build, from where they
live in the repository (so the site never holds a stale copy). Paths are relative to the
repository root (mkdocs.yml's directory); each lands at its key's place in the site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO_FILES = {
    "img/deu_shapes.png": "load_tests/results/deu_shapes.png",
}


def on_files(files: Files, config: Any, **_: Any) -> Files:
    root = Path(config.config_file_path).parent
    for dest, src in REPO_FILES.items():
        files.append(File.generated(config, dest, abs_src_path=str(root / src)))
    return files
