"""README.md and docs/quickstart.md, executed: every shell block runs against a real server and
its output is checked (the convention: tests/docs/executed_docs.py, docs/development.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.docs.executed_docs import ROOT, DocError, DocRunner, blocks, commands, doc_session

EXECUTED = [ROOT / "README.md", ROOT / "docs" / "quickstart.md"]
LOG_DOC = ROOT / "docs" / "tenants-and-security.md"


@pytest.mark.parametrize("page", EXECUTED, ids=lambda p: p.name)
def test_every_shell_block_is_executed_or_excused(page: Path) -> None:
    found = blocks(page)
    assert found, f"{page.name} has no shell blocks"
    for block in found:
        if block.skip_reason is None:
            commands(block)  # raises on a command without a check


def _json_lines(text: str, kind: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and f'"log":"{kind}"' in line:
            out.append(json.loads(line))
    return out


def test_readme(tmp_path: Path) -> None:
    with doc_session(tmp_path) as runner:
        assert runner.run_page(EXECUTED[0]) >= 5


def test_quickstart_and_log_examples(tmp_path: Path) -> None:
    with doc_session(tmp_path) as runner:
        assert runner.run_page(EXECUTED[1]) >= 20
    # The access and audit line examples in the docs have the fields, in order, of the lines
    # the quickstart's servers wrote.
    written = "\n".join(p.read_text() for p in tmp_path.glob("serve-*.log"))
    shown = LOG_DOC.read_text()
    for kind in ("access", "audit"):
        real = _json_lines(written, kind)
        example = _json_lines(shown, kind)
        assert real, f"no {kind} line in the servers' logs"
        assert len(example) == 1, f"{LOG_DOC.name} should show one {kind} line"
        assert list(example[0]) == list(real[0]), f"the {kind} example's fields are stale"


# --- the convention itself: a page that is not true, or not checked, fails ---


def _page(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "page.md"
    p.write_text(text)
    return p


def _run(tmp_path: Path, text: str) -> int:
    with doc_session(tmp_path) as runner:
        return runner.run_page(_page(tmp_path, text))


def test_a_true_page_passes(tmp_path: Path) -> None:
    text = (
        "```bash\necho hello \\\n  world\n# => hello world\nprintf 'a1\\nb22\\n'\n"
        "# =~ ^b[0-9]{2}$\n# a comment\n```\n\n```python\nraise SystemExit(1)\n```\n"
        "<!-- not executed: shows a failure -->\n\n```sh\nexit 1\n```\n"
    )
    assert _run(tmp_path, text) == 2


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("```bash\necho hello\n# => goodbye\n```\n", "does not contain 'goodbye'"),
        ("```bash\necho hello\n# =~ ^bye\n```\n", "does not match '^bye'"),
        ("```bash\necho hello\n```\n", "no '# => ...' or '# =~ ...' check"),
        ("```console\necho one\n# => one\necho two\n```\n", "check after 'echo two'"),
        ("```bash\nfalse\n# => x\n```\n", "exit status 1"),
        ("```bash\necho x | grep y | cat\n# => x\n```\n", "exit status 1"),
        ("<!-- not executed: -->\n```bash\necho x\n# => x\n```\n", "needs a reason"),
        ("```bash\n.venv/bin/pytest -q\n# => passed\n```\n", "the test command"),
        ("```bash\n# => x\necho x\n```\n", "a check before any command"),
    ],
    ids=["contains", "regex", "unchecked", "one-unchecked", "exit", "pipefail", "reason",
         "pytest", "orphan-check"],
)
def test_a_false_or_unchecked_page_fails(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(DocError, match=re.escape(error)):
        _run(tmp_path, text)


def test_serve_lines_start_the_real_server(tmp_path: Path) -> None:
    """`hotlora serve` becomes the test's own server (free port, fresh store) and later
    commands' localhost:8000 reaches it; a wrong start-up check fails."""
    runner = DocRunner(tmp_path)
    assert runner.rewrite("curl localhost:8000/x") == "curl localhost:8000/x"  # no server yet
    text = (
        "```bash\nbash .ci/setup && HOTLORA_SERVED_MODEL_NAME=docs-demo .venv/bin/hotlora serve "
        "--port 8000 &\n# => docs-demo\n```\n\n"
        "```bash\ncurl -s localhost:8000/ready\n# => \"model\":\"docs-demo\"\n```\n"
        "```bash\n.venv/bin/hotlora serve\n# => no such line\n```\n"
    )
    with pytest.raises(DocError, match="does not contain 'no such line'"):
        _run(tmp_path, text)
    assert len(list(tmp_path.glob("serve-*.log"))) == 2
