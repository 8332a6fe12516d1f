"""How the `hotlora` command line ends on a mistake: one line on stderr and an exit code.

Exit codes (also in `hotlora --help`):

    0  success; `hotlora serve` also after SIGTERM or SIGINT stopped it
    1  an unexpected error: a bug (rerun with -v for the traceback and report it)
    2  usage: a bad flag or HOTLORA_* value (the message names which), an invalid tenants file,
       an unreadable or invalid --chat-template, --replicas without Ray Serve installed
    3  the model or the adapter store cannot be loaded
    4  the address cannot be listened on: the port is in use, or the host is not an address
       of this machine, or the port needs privileges

The line is `hotlora: error: <what is wrong>; <what to do>`, and no traceback is printed unless
`-v` is given. Errors are typed where a problem is found (ModelLoadError, StoreMismatch,
TenantsFileError, pydantic's ValidationError, ...); `cli.main` maps them here, once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_LOAD, EXIT_ADDRESS = 0, 1, 2, 3, 4

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}  success (serve: also when SIGTERM or SIGINT stopped it)
  {EXIT_BUG}  unexpected error (a bug: rerun with -v for the traceback)
  {EXIT_USAGE}  usage: a bad flag or HOTLORA_* value, tenants file, --chat-template, or
     --replicas without Ray Serve
  {EXIT_LOAD}  the model or the adapter store cannot be loaded
  {EXIT_ADDRESS}  the address cannot be listened on (port in use, host not local)
errors are one line, `hotlora: error: <what>; <what to do>`; -v adds the traceback"""

HELP_HINT = "hotlora serve --help lists every setting"


class CliError(Exception):
    """A mistake the command line reports in one line; `exit_code` says which kind."""

    exit_code = EXIT_BUG


class UsageError(CliError):
    """A flag, a HOTLORA_* variable or a file it names is wrong."""

    exit_code = EXIT_USAGE


class LoadError(CliError):
    """The model or the adapter store cannot be loaded."""

    exit_code = EXIT_LOAD


class AddressError(CliError):
    """The server cannot listen where it was asked to."""

    exit_code = EXIT_ADDRESS


def one_line(text: str) -> str:
    """`text` on one line: a message that spans lines (pydantic's, YAML's) must not break the
    one-line contract."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def with_hint(message: str, hint: str) -> str:
    """`message`, with `hint` as its what-to-do unless it already has one (`<what>; <do>`)."""
    return message if "; " in message else f"{message}; {hint}"


def settings_error(
    error: ValidationError, from_flags: Iterable[str], secrets: Iterable[str] = ()
) -> UsageError:
    """A Settings ValidationError as one line that names where the value came from: the flag
    when the command line gave the field, else its HOTLORA_* variable (a secret's value is
    never echoed)."""
    flags, hidden = set(from_flags), set(secrets)
    errors = error.errors()
    first = errors[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    where = "--" + field.replace("_", "-") if field in flags else "HOTLORA_" + field.upper()
    shown = "" if field in hidden else f"={_short(first.get('input'))}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    fix = "leave it out" if field in flags else "unset it"
    return UsageError(
        f"{where}{shown}: {first['msg']}{more}; set a valid {where} or {fix} ({HELP_HINT})"
    )


def _short(value: Any) -> str:
    text = repr(value if isinstance(value, str) else str(value))
    return text if len(text) <= 60 else text[:57] + "...'"


def classify(exc: BaseException) -> CliError | None:
    """The CliError an exception of hotlora's stands for, or None for one it does not know
    (a bug: exit 1). Imports lazily: `hotlora --version` stays fast."""
    from hotlora.adapters.errors import AdapterError
    from hotlora.adapters.store import StoreMismatch
    from hotlora.server.engine.errors import EngineError, ModelLoadError
    from hotlora.server.tenants import TenantsFileError

    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, TenantsFileError):
        return UsageError(one_line(str(exc)))
    if isinstance(exc, ModelLoadError):
        hint = "point --model at a model directory hotlora can serve"
        return LoadError(with_hint(one_line(str(exc)), hint))
    if isinstance(exc, StoreMismatch):
        return LoadError(one_line(str(exc)))
    if isinstance(exc, AdapterError | EngineError):
        # `generate --adapter` or a prompt the engine refuses: the user's input
        return UsageError(with_hint(one_line(str(exc)), "fix the input it names"))
    return None


def unexpected(exc: BaseException) -> str:
    """The one line for an error hotlora did not expect."""
    return (
        f"unexpected {type(exc).__name__}: {one_line(str(exc)) or '(no message)'}; rerun with "
        "-v for the traceback and report it"
    )
