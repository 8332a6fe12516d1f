"""kernels/ has no import circle, each shared helper is defined once, and the op's arguments are
checked once per call (by the dispatcher, never again by a Triton launcher).

Static: every module of kernels/ is parsed with ast, never imported, so the walk sees imports
inside functions too (a lazy import that closes a circle is a circle all the same, only a
hidden one) and costs no triton import.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "hotlora.kernels"


def kernels_dir() -> Path:
    """The folder imported as hotlora.kernels (found without executing any of its modules)."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{PACKAGE} not found"
    return Path(next(iter(spec.submodule_search_locations)))


def parse_modules(root: Path) -> dict[str, tuple[ast.Module, bool]]:
    """Dotted module name -> (syntax tree, is the package's __init__) for every .py in root."""
    modules = {}
    for path in sorted(root.glob("*.py")):
        is_package = path.stem == "__init__"
        name = PACKAGE if is_package else f"{PACKAGE}.{path.stem}"
        modules[name] = (ast.parse(path.read_text(), filename=str(path)), is_package)
    return modules


def _imported(node: ast.Import | ast.ImportFrom, package: str, known: set[str]) -> set[str]:
    """The modules of `known` that one import statement runs, written in module `package`."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names} & known
    if node.level:  # relative: `from . import x`, `from .x import y`, `from .. import z`
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    # `from P import n` runs P.n when n is a module, and P itself for any other name.
    subs = {f"{source}.{a.name}" for a in node.names} & known
    return subs if len(subs) == len(node.names) else subs | ({source} & known)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the kernels modules it imports anywhere in its body (functions included)."""
    modules = parse_modules(root)
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, (tree, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _imported(node, package, known)
        graph[name] = edges - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per back edge of a depth-first search."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def _format(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(m.removeprefix(f"{PACKAGE}.") for m in c) for c in cycles)


def test_no_import_circle() -> None:
    cycles = find_cycles(import_graph(kernels_dir()))
    assert not cycles, f"import circles in kernels/:\n{_format(cycles)}"


def test_walk_sees_lazy_imports() -> None:
    """The dispatchers import their Triton launcher inside a function: the walk must see it."""
    graph = import_graph(kernels_dir())
    for op in ("lora", "deu", "attention"):
        assert f"{PACKAGE}.triton_{op}" in graph[f"{PACKAGE}.{op}"], op


def test_walk_finds_circles(tmp_path: Path) -> None:
    """Every import form the walk handles closes a circle it reports (so a pass means none)."""
    sources = {
        "__init__.py": "from hotlora.kernels.a import f\nfrom hotlora.kernels.g import op\n",
        "a.py": "def f():\n    from hotlora.kernels.b import g\n    return g\n",  # lazy
        "b.py": "from hotlora.kernels import c\ng = 1\n",  # a submodule: not __init__
        "c.py": "from . import d\n",
        "d.py": "import hotlora.kernels.e\n",
        "e.py": "from .a import f\n",
        "g.py": "from hotlora.kernels import f\nop = f\n",  # a re-export: runs __init__
    }
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph[f"{PACKAGE}.b"] == {f"{PACKAGE}.c"} and graph[f"{PACKAGE}.g"] == {PACKAGE}
    cycles = find_cycles(graph)
    short = {tuple(m.removeprefix(f"{PACKAGE}.") for m in c) for c in cycles}
    assert short == {("a", "b", "c", "d", "e", "a"), (PACKAGE, "g", PACKAGE)}, _format(cycles)


def _trees() -> Iterator[tuple[str, ast.Module]]:
    for name, (tree, _) in parse_modules(kernels_dir()).items():
        yield name, tree


_POW2_NAME = re.compile(r"pow2|pow_2|power_of_two|next_power", re.IGNORECASE)


def test_one_power_of_two_helper() -> None:
    """One helper computes powers of two; nobody inlines the bit tricks instead of calling it."""
    helpers = [
        f"{name}.{node.name}"
        for name, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and _POW2_NAME.search(node.name)
    ]
    assert helpers == [f"{PACKAGE}._common.next_pow2"], helpers
    inlined = [
        f"{name}.{fn.name}:{node.lineno}"
        for name, tree in _trees()
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef) and fn.name != "next_pow2"
        for node in ast.walk(fn)
        if isinstance(node, ast.expr) and _is_pow2_arithmetic(node)
    ]
    assert not inlined, f"power-of-two arithmetic outside next_pow2: {inlined}"


def _is_pow2_arithmetic(node: ast.expr) -> bool:
    """n.bit_length() (next_pow2's own trick) or n & (n - 1) (the is-a-power-of-two idiom)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr == "bit_length"
    return (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.BitAnd)
        and isinstance(node.right, ast.BinOp)
        and isinstance(node.right.op, ast.Sub)
    )


_TRITON_SET = {"float16", "bfloat16", "float32"}


def test_one_supported_dtype_tuple() -> None:
    """One literal lists the Triton dtypes; every other module imports it."""
    found = []
    for name, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Tuple | ast.List | ast.Set):
                continue
            attrs = {
                e.attr
                for e in node.elts
                if isinstance(e, ast.Attribute)
                and isinstance(e.value, ast.Name)
                and e.value.id == "torch"
            }
            if attrs == _TRITON_SET and len(node.elts) == len(_TRITON_SET):
                found.append(f"{name}:{node.lineno}")
    assert len(found) == 1 and found[0].startswith(f"{PACKAGE}._common:"), found


# A launcher checks nothing but its own block-size keywords (check_block).
_CHECK = re.compile(r"^_?check_(?!block$)")


def _names(tree: ast.AST) -> set[str]:
    """Every identifier a tree reads or imports."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.alias):
            out.add(node.asname or node.name.rpartition(".")[2])
    return out


def test_launchers_do_not_recheck() -> None:
    """The Triton launchers trust their dispatcher's check: one check per call, not two (only
    the block sizes, which the dispatchers never pass, are the launchers' own to check)."""
    for name, tree in _trees():
        if name.startswith(f"{PACKAGE}.triton_"):
            rechecks = sorted(n for n in _names(tree) if _CHECK.match(n))
            assert not rechecks, f"{name} re-checks the op's arguments: {rechecks}"


@pytest.mark.parametrize(
    "module,op,check",
    [
        ("lora", "lora_apply", "check_lora_args"),
        ("deu", "deu_apply", "check_deu_args"),
        ("attention", "decode_attention", "check_decode_attention_args"),
    ],
)
def test_dispatcher_checks_once(module: str, op: str, check: str) -> None:
    tree = parse_modules(kernels_dir())[f"{PACKAGE}.{module}"][0]
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == op)
    calls = [
        n
        for n in ast.walk(fn)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == check
    ]
    assert len(calls) == 1, f"{op} calls {check} {len(calls)} times"
