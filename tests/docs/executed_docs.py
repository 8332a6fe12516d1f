"""Executed documentation: the shell blocks of a Markdown file, run in order against a real
server, each command's output checked against what the page says it prints.

The convention (docs/development.md, "Executed docs", explains it to writers):

- Every fenced block whose language is ``bash``, ``sh``, ``shell`` or ``console`` is executed,
  unless the line before it (blank lines aside) is ``<!-- not executed: <reason> -->``; the
  reason must not be empty.
- A command is a line, plus the lines a trailing backslash continues it onto. Other lines that
  start with ``#`` are comments, except the checks:
  ``# => TEXT``  the command's output (stdout and stderr together) contains TEXT;
  ``# =~ REGEX`` it matches REGEX (``re.search``, multiline).
  Every command needs at least one check, and must exit 0. A heredoc (``<<'EOF'``) belongs to
  its command up to the terminator line.
- Three commands are recognised instead of run as written:
  ``bash .ci/setup`` and ``bash .ci/setup test`` (followed by ``&&``) are dropped: the tests run
  inside the venv that command made;
  ``[NAME=value ...] .venv/bin/hotlora serve [ARGS]`` (a trailing ``&`` allowed) stops the
  server this page started before, if any, and starts the real command on a free port with a
  fresh adapter store (unless ARGS name one); its checks are read in the server's log;
  the test command (``.venv/bin/pytest`` or ``python -m pytest``) is refused: a page marks its
  block ``not executed`` instead, so the suite does not run itself.
- ``localhost:8000`` and ``127.0.0.1:8000`` become the test server's address, and ``.venv/bin/``
  the directory of the Python running the tests. Commands run with bash (``-o pipefail``) in the
  repository root; ``HOTLORA_*`` variables of the caller's environment are removed.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
DOC_PORT = 8000
SKIP_MARK = re.compile(r"^<!--\s*not executed:(.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
SETUP = re.compile(r"^bash \.ci/setup(?: test)?\s*&&\s*")
SERVE = re.compile(
    r"^(?P<env>(?:[A-Z][A-Z0-9_]*=\S*\s+)*)\.venv/bin/hotlora serve(?P<args>(?:\s.*?)?)\s*&?\s*$"
)
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<end>\w+)\1")
PYTEST = re.compile(r"(^|[\s/])(pytest|python3? -m pytest)(\s|$)")


class DocError(AssertionError):
    """A page breaks the convention, or a command does not do what the page says."""


@dataclass
class Command:
    line: int  # 1-based line of the command's first line in its file
    text: str
    contains: list[str] = field(default_factory=list)
    matches: list[str] = field(default_factory=list)

    @property
    def checked(self) -> bool:
        return bool(self.contains or self.matches)


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: list[str]
    skip_reason: str | None  # None: executed

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced shell block of a Markdown file, with the reason it is not executed, if any."""
    out: list[Block] = []
    text = path.read_text().splitlines()
    i = 0
    while i < len(text):
        m = FENCE.match(text[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        start, body = i, []
        i += 1
        while i < len(text) and not text[i].strip().startswith(fence):
            body.append(text[i][indent:] if text[i][:indent].isspace() else text[i].lstrip())
            i += 1
        i += 1
        lang = m["lang"].lower()
        if lang not in SHELL_LANGS:
            continue
        prev = start - 1
        while prev >= 0 and not text[prev].strip():
            prev -= 1
        skip = SKIP_MARK.match(text[prev].strip()) if prev >= 0 else None
        reason = skip[1].strip() if skip else None
        if skip and not reason:
            raise DocError(f"{path.name}:{start + 1}: 'not executed' needs a reason")
        out.append(Block(path, start + 1, lang, body, reason))
    return out


def commands(block: Block) -> list[Command]:
    """A block's commands with their checks; a command without a check is an error."""
    cmds: list[Command] = []
    lines = block.lines
    i = 0
    while i < len(lines):
        raw = lines[i].strip()
        lineno = block.line + 1 + i
        i += 1
        if not raw:
            continue
        if raw.startswith("# =>") or raw.startswith("# =~"):
            if not cmds:
                raise DocError(f"{block.path.name}:{lineno}: a check before any command")
            expected = raw[4:].strip()
            if not expected:
                raise DocError(f"{block.path.name}:{lineno}: an empty check")
            (cmds[-1].contains if raw.startswith("# =>") else cmds[-1].matches).append(expected)
            continue
        if raw.startswith("#"):
            continue
        if raw.startswith("$ "):  # console blocks may show a prompt
            raw = raw[2:]
        parts = [raw]
        while parts[-1].endswith("\\") and i < len(lines):
            parts.append(lines[i].strip())
            i += 1
        heredoc = HEREDOC.search(parts[-1])
        if heredoc:  # the body, as written, up to its terminator line
            while i < len(lines):
                parts.append(lines[i])
                i += 1
                if parts[-1].strip() == heredoc["end"]:
                    break
            else:
                raise DocError(f"{block.path.name}:{lineno}: no {heredoc['end']!r} line ends it")
        cmds.append(Command(lineno, "\n".join(parts)))
    for c in cmds:
        if not c.checked:
            raise DocError(
                f"{block.path.name}:{c.line}: no '# => ...' or '# =~ ...' check after "
                f"{c.text.splitlines()[0]!r} (or mark the block '<!-- not executed: why -->')"
            )
    if not cmds:
        raise DocError(f"{block.where}: an executed block without commands")
    return cmds


def check_output(cmd: Command, output: str, where: str) -> None:
    missing = [f"does not contain {s!r}" for s in cmd.contains if s not in output]
    missing += [f"does not match {r!r}" for r in cmd.matches if not re.search(r, output, re.M)]
    if missing:
        raise DocError(
            f"{where}: the output of\n    {cmd.text}\n{'; '.join(missing)}; it was:\n"
            + output[-3000:]
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class DocServer:
    """The server a page's ``hotlora serve`` line starts: the real command, on a free port."""

    def __init__(self, env_prefix: str, args: str, workdir: Path, bindir: Path) -> None:
        self.port = free_port()
        argv = shlex.split(args)
        if "--port" in argv:  # the page's port becomes the free one
            j = argv.index("--port")
            del argv[j : j + 2]
        argv = [a for a in argv if not a.startswith("--port=")]
        if "--adapter-store" not in argv:
            argv += ["--adapter-store", str(Path(tempfile.mkdtemp(dir=workdir)) / "store")]
        env = clean_env()
        for assignment in shlex.split(env_prefix):
            name, _, value = assignment.partition("=")
            env[name] = value
        self.log = workdir / f"serve-{self.port}.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [str(bindir / "hotlora"), "serve", "--port", str(self.port), *argv],
            cwd=ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the engine process too
        )
        try:
            self._wait_ready()
        except BaseException:  # never leave a server behind the failing test
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DocError(f"hotlora serve exited ({self.proc.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.25)
        raise DocError(f"hotlora serve was not ready in {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()


@contextmanager
def doc_session(workdir: Path) -> Iterator[DocRunner]:
    runner = DocRunner(workdir)
    try:
        yield runner
    finally:
        runner.stop_server()


class DocRunner:
    """Runs the executed blocks of one or more pages in order, one server at a time."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.bindir = Path(sys.executable).parent
        self.server: DocServer | None = None
        self.ran = 0

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def rewrite(self, text: str) -> str:
        text = text.replace(".venv/bin/", f"{self.bindir}/")
        if self.server is not None:
            for host in ("localhost", "127.0.0.1"):
                text = text.replace(f"{host}:{DOC_PORT}", f"127.0.0.1:{self.server.port}")
        return text

    def run_page(self, path: Path) -> int:
        """Executes every executed block of `path`; returns how many commands ran."""
        before = self.ran
        for block in blocks(path):
            if block.skip_reason is None:
                self.run_block(block)
        return self.ran - before

    def run_block(self, block: Block) -> None:
        for cmd in commands(block):
            self.run_command(cmd, f"{block.path.name}:{cmd.line}")

    def run_command(self, cmd: Command, where: str) -> None:
        text = SETUP.sub("", cmd.text)
        if PYTEST.search(text):
            raise DocError(f"{where}: the test command is not executed here; mark its block "
                           "'<!-- not executed: ... -->'")
        serve = SERVE.match(text.replace("\\\n", " "))
        if serve:
            self.stop_server()
            self.server = DocServer(serve["env"], serve["args"], self.workdir, self.bindir)
            deadline = time.monotonic() + 10  # a start-up line may follow /ready by a moment
            while True:
                try:
                    check_output(cmd, self.server.output(), where)
                    break
                except DocError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.25)
        else:
            proc = subprocess.run(
                ["bash", "-o", "pipefail", "-c", self.rewrite(text)],
                cwd=ROOT,
                env=clean_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=300,
            )
            if proc.returncode != 0:
                raise DocError(
                    f"{where}: exit status {proc.returncode} from\n    {cmd.text}\n{proc.stdout}"
                )
            check_output(cmd, proc.stdout, where)
        self.ran += 1
