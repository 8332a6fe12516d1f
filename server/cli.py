"""The `hotlora` command line: `serve`, `demo`, `generate`, `--version`.

A mistake ends in one line on stderr, `hotlora: error: <what>; <what to do>`, and an exit code
(2 usage, 3 model or store, 4 address; the list is in server/cli_errors.py and `--help`); `-v`
adds the traceback. `hotlora serve`'s flags are generated from the Settings fields, each with
its HOTLORA_* variable and default, so `--help` cannot drift from what the server reads.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import sys
import textwrap
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hotlora.adapters.demo_tasks import DEMO_MODEL, TASKS, demo_adapters, prompt_for
from hotlora.server.cli_errors import (
    EXIT_BUG,
    EXIT_CODES,
    EXIT_LOAD,
    HELP_HINT,
    UsageError,
    classify,
    one_line,
    settings_error,
    unexpected,
)
from hotlora.server.config import Settings

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

log = logging.getLogger("hotlora")
EXIT_INTERRUPTED = 130  # Ctrl-C before the server ran (128 + SIGINT, as shells report it)


def _demo(args: argparse.Namespace) -> int:
    """One mixed batch on a demo model: every word through the base and every demo adapter."""
    from hotlora.server.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(args.model, EngineConfig(max_batch=64))
    names = []
    shipped = demo_adapters(args.model)
    for adapter, (path, _) in shipped.items():
        if path.is_dir():
            engine.add_adapter(adapter, path)
            names.append(adapter)
    task = {n: TASKS[t] for n, (_, t) in shipped.items()}
    words = args.words or ["hotlora", "adapter", "4719", "serving", "80512"]
    rows = [(w, n) for w in words for n in [None, *names] if n is None or task[n].accepts(w)]
    outs = engine.generate(
        [prompt_for(w) for w, _ in rows],
        [name for _, name in rows],
        SamplingParams(max_tokens=24, temperature=0.0),
    )
    width = max(len(n) for n in ["base", *names])
    print(
        f"{len(rows)} prompts over {len(names) + 1} models in one mixed batch on {engine.device}:"
    )
    for (word, name), out in zip(rows, outs, strict=True):
        label = name or "base"
        check = ""
        if name is not None:
            ok = out.text.strip() == task[name].answer(word)
            check = "ok" if ok else f"expected {task[name].answer(word)!r}"
        print(f"  {label:<{width}}  in: {word:<10} out:{out.text!r:<22} {check}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from hotlora.server.engine import Engine, SamplingParams

    engine = Engine.from_pretrained(args.model)
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        engine.add_adapter(name, path)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    adapters = args.use or [None]
    outs = engine.generate([args.prompt] * len(adapters), adapters, params)
    for name, out in zip(adapters, outs, strict=True):
        print(f"[{name or 'base'}] {out.text!r} ({out.finish_reason})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from hotlora.server import preflight

    flags = {n: v for n in Settings.model_fields if (v := getattr(args, n, None)) is not None}
    try:
        settings = Settings(**flags)
    except ValidationError as e:
        raise settings_error(e, flags, SECRET_FIELDS) from e
    except SettingsError as e:  # a HOTLORA_* value pydantic-settings could not even decode
        raise UsageError(f"{one_line(str(e))}; fix the variable it names ({HELP_HINT})") from e
    # The checks log nothing at the default level, so a mistake stays the one line it is.
    if settings.replicas is not None:
        preflight.check_ray()
    preflight.check_usage(settings, set(flags))
    if settings.replicas is not None:
        # Joining a cluster (--ray-address), the proxy, the model and the store are the
        # cluster's, on its machines: nothing to check here.
        if settings.ray_address is None:
            preflight.check_address(settings.host, settings.port)  # Ray Serve's proxy binds it
            preflight.check_model(settings)
        _set_log_level(settings)
        from hotlora.server.ray_app import serve_forever

        try:
            code = serve_forever(settings)
        except Exception as e:
            code = report(e, bool(args.verbose))
        # Everything of the run is stopped: Ray's exit hooks would only shut it down again,
        # waiting on a cluster that is gone (seconds, then maybe its core worker's exit 1).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sockets = preflight.bind(settings.host, settings.port)  # held: nothing takes it meanwhile
    try:
        preflight.check_model(settings)
        _set_log_level(settings)
        return _serve_here(settings, sockets)
    finally:
        for sock in sockets:
            sock.close()


def _set_log_level(settings: Settings) -> None:
    import uvicorn.config  # noqa: F401  # names the TRACE level (5) that log_level may be

    logging.getLogger().setLevel(settings.log_level.upper())


def _serve_here(settings: Settings, sockets: list[socket.socket]) -> int:
    """One process: uvicorn on `sockets`, the app of server/main.py, SIGTERM drains."""
    import uvicorn

    from hotlora.server.lifecycle import GracefulServer, StartupGuard, lifecycle_of
    from hotlora.server.main import create_app

    app = create_app(settings)
    guarded = StartupGuard(app)
    config = uvicorn.Config(
        guarded,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # hotlora.access writes the one line per request
        # bounds SIGINT's shutdown too (uvicorn takes whole seconds)
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
    )
    _json_log_lines()  # after uvicorn.Config, which applies uvicorn's logging config
    # A failed start-up is hotlora's one line (below), not uvicorn's line besides it.
    logging.getLogger("uvicorn.error").addFilter(_not_startup_failed)
    server = GracefulServer(config, lifecycle_of(app), settings.shutdown_timeout_s)
    try:
        # uvicorn re-raises a SIGINT it shut down for: not an error here (as in uvicorn.run)
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=sockets)
    except SystemExit:  # uvicorn's exit when the app's start-up failed
        if guarded.error is None:
            raise
    if guarded.error is not None:
        raise guarded.error  # cli.main reports it in one line (-v: with its traceback)
    return 0 if server.started else EXIT_LOAD


def _not_startup_failed(record: logging.LogRecord) -> bool:
    return record.getMessage() != "Application startup failed. Exiting."


def _json_log_lines() -> None:
    """The access and audit logs on stderr, each record its JSON line alone, whatever the root
    logger's format and level are (uvicorn's config and --log-level leave them alone)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("hotlora.access", "hotlora.audit"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False  # not twice through the root's handler


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is the one-line UsageError of every other mistake (not
    argparse's usage block and its own exit)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help")


def _secret(annotation: Any) -> bool:
    from pydantic import SecretStr

    return annotation is SecretStr or any(_secret(a) for a in typing.get_args(annotation))


SECRET_FIELDS = frozenset(n for n, f in Settings.model_fields.items() if _secret(f.annotation))
_METAVARS = {"model": "DIR", "adapter_store": "DIR", "chat_template": "FILE",
             "tenants_file": "FILE", "allowed_adapter_dirs": "DIRS", "host": "HOST",
             "port": "PORT", "replicas": "N", "ray_address": "ADDR", "device": "DEVICE",
             "dtype": "DTYPE", "log_level": "LEVEL", "served_model_name": "NAME"}  # fmt: skip


def _default(field: FieldInfo) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None or value == []:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()  # as HOTLORA_* takes it
    return str(value)


def _setting_help(name: str, field: FieldInfo) -> str:
    what = field.description or name.replace("_", " ")
    return f"{what} [env: HOTLORA_{name.upper()}, default: {_default(field)}]".replace("%", "%%")


def _settings_flags(serve: argparse.ArgumentParser) -> None:
    """A flag per Settings field (the secrets: environment only, in the epilog). Values go to
    Settings as given, so pydantic validates a flag exactly as its HOTLORA_* variable."""
    group = serve.add_argument_group("settings (each also from its HOTLORA_* variable)")
    for name, field in Settings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = _setting_help(name, field)
        if field.annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kind = next((t for t in (int, float) if field.annotation in (t, t | None)), None)
        metavar = _METAVARS.get(name) or {int: "N", float: "X"}.get(kind, "VALUE")  # type: ignore[arg-type]
        group.add_argument(flag, metavar=metavar, help=help_text)


def _secrets_epilog() -> str:
    lines = ["environment only (a flag's value would show in `ps`):"]
    for name in sorted(SECRET_FIELDS):
        field = Settings.model_fields[name]
        text = f"HOTLORA_{name.upper()}: {field.description} [default: {_default(field)}]"
        lines += textwrap.wrap(text, 78, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hotlora")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # keeps the epilogs' lines
    ap = _Parser(
        prog="hotlora", description="Serve many LoRA adapters on one base.", epilog=EXIT_CODES,
        formatter_class=raw,
    )
    ap.add_argument("--version", action="version", version=f"hotlora {_version()}")
    verbose_help = "on an error, print its traceback too; log at info level"
    ap.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # also after the command (`hotlora serve -v`); SUPPRESS keeps the one given before it
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=verbose_help)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser(
        "demo", help="generate from the demo model with all demo adapters at once",
        parents=[common],
    )
    demo.add_argument(
        "--model", type=Path, default=DEMO_MODEL,
        help="a demo model (default: the GPT-2 demo; adapters/demo/hotlora-llama-demo: Llama)",
    )
    demo.add_argument("words", nargs="*", help="inputs for the demo tasks")
    demo.set_defaults(func=_demo)
    serve = sub.add_parser(
        "serve", help="run the OpenAI-compatible server (settings also from HOTLORA_<NAME>)",
        description="Run the OpenAI-compatible server. Every setting comes from its flag,\n"
        "else its HOTLORA_<NAME> environment variable, else its default.",
        epilog=f"{_secrets_epilog()}\n\n{EXIT_CODES}", formatter_class=raw, parents=[common],
    )
    _settings_flags(serve)
    serve.set_defaults(func=_serve)
    gen = sub.add_parser(
        "generate", help="generate one prompt with chosen adapters", parents=[common]
    )
    gen.add_argument("--model", type=Path, default=DEMO_MODEL, help="a model directory")
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    gen.add_argument("--use", action="append", default=[], metavar="NAME", help="adapter per row")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit code (server/cli_errors.py), never a traceback unless
    -v."""
    verbose = False
    try:
        args = build_parser().parse_args(argv)
        verbose = bool(args.verbose)
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING, format="%(message)s"
        )
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        return report(e, verbose)


def report(exc: Exception, verbose: bool) -> int:
    """The one stderr line for `exc` (the traceback first with -v); returns its exit code."""
    error = classify(exc)
    if verbose:
        traceback.print_exception(exc)
    print(f"hotlora: error: {error if error is not None else unexpected(exc)}", file=sys.stderr)
    return error.exit_code if error is not None else EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
