"""The documentation says what the code is: the OpenAPI copy, every endpoint, field, module,
metric, setting and PEFT field named, every repository path and module real."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.docs.executed_docs import ROOT
from tests.docs.make_openapi import OPENAPI_JSON, openapi, openapi_text

DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
PACKAGES = ("server", "kernels", "adapters", "training")


def page(name: str) -> str:
    return (DOCS / name).read_text()


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 200


def test_committed_openapi_is_current() -> None:
    assert OPENAPI_JSON.read_text() == openapi_text(), (
        "docs/openapi.json is stale: run .venv/bin/python tests/docs/make_openapi.py"
    )


def test_api_page_names_every_operation_and_field() -> None:
    spec = openapi()
    text = page("api.md")
    names = backticked(text)
    missing = [
        f"{method.upper()} {path}"
        for path, ops in spec["paths"].items()
        for method in ops
        if f"`{method.upper()} {path}`" not in text
    ]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            missing += [
                f"{method.upper()} {path} parameter {p['name']}"
                for p in op.get("parameters", [])
                if p["name"] not in names
            ]
    for schema, body in spec["components"]["schemas"].items():
        if not schema.startswith("Body_") and schema not in names:
            missing.append(f"schema {schema}")
        missing += [
            f"{schema}.{field}" for field in body.get("properties", {}) if field not in names
        ]
    assert not missing, f"api.md does not name: {missing}"


def test_module_map_is_complete() -> None:
    text = page("architecture.md")
    modules = sorted(
        str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
    )
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"architecture.md's module map lacks {missing}"


def test_metrics_page_names_every_metric() -> None:
    from hotlora.server.metrics import CoreMetrics, Metrics

    text = page("metrics.md")
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for registry in (Metrics().registry, CoreMetrics(max_lora=4).registry)
        for family in registry.collect()
    }
    assert names
    missing = sorted(n for n in names if not re.search(rf"`{n}(\{{|`)", text))
    assert not missing, f"metrics.md does not list {missing}"


def test_deployment_page_names_every_setting() -> None:
    from hotlora.server.config import Settings

    text = page("deployment.md")
    missing = [n for n in Settings.model_fields if f"`HOTLORA_{n.upper()}`" not in text]
    assert not missing, f"deployment.md's settings table lacks {missing}"


def test_models_page_names_every_peft_field() -> None:
    from hotlora.adapters import lora_config as lc

    text = page("models-and-adapters.md")
    known = (
        set(lc._HANDLED) | set(lc._IGNORED) | set(lc._MUST_BE_FALSE) | set(lc._MUST_BE_EMPTY)
        | set(lc._MUST_BE_NULL)
    )
    missing = sorted(k for k in known if f"`{k}`" not in text)
    assert not missing, f"models-and-adapters.md does not say what happens to {missing}"


REPO_PATH = re.compile(
    r"^(?:\.ci|server|kernels|adapters|training|load_tests|docker|tests|docs)/[\w./-]*$"
)


@pytest.mark.parametrize("doc", [README, *PAGES], ids=lambda p: p.name)
def test_named_paths_and_modules_exist(doc: Path) -> None:
    text = doc.read_text()
    missing = []
    for token in backticked(text) | set(re.findall(r"\]\(((?:\.\./)?[\w./-]+)\)", text)):
        for word in token.split():
            word = word.rstrip(".,;:)").removeprefix("../")
            if "*" in word or "<" in word or not REPO_PATH.match(word):
                continue
            base = DOCS if doc.parent == DOCS and not word.startswith("docs/") else ROOT
            if not ((ROOT / word).exists() or (base / word).exists()):
                missing.append(word)
    for module in re.findall(r"-m (hotlora(?:\.\w+)+)", text):
        if importlib.util.find_spec(module) is None:
            missing.append(module)
    assert not missing, f"{doc.name} names what does not exist: {sorted(set(missing))}"


def test_every_page_is_in_the_nav() -> None:
    nav = re.findall(r"^\s+- [^:]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert sorted(nav) == sorted(p.name for p in PAGES)


def test_no_old_import_paths() -> None:
    """The namespace move: modules are hotlora.server..., never server... on their own. (Module
    paths in commands, `-m` and `serve run`, are checked in every file by
    tests/test_packaging.py; this adds the docs' import lines.)"""
    old = re.compile(r"(?<![\w./])(?:from |import )(server|training|adapters|kernels)\b")
    bad = [
        f"{doc.name}: {m.group(0)}"
        for doc in [README, *PAGES]
        for m in old.finditer(doc.read_text())
    ]
    assert not bad, bad
