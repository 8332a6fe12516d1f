"""The one error type an adapter refusal raises, so callers can catch refusals and nothing else."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter was refused; names the adapter and the offending field or tensor key."""

    adapter: str
    field: str | None

    def __init__(self, adapter: str, message: str, field: str | None = None) -> None:
        self.adapter = adapter
        self.field = field
        self.message = message
        where = f" [{field}]" if field is not None else ""
        super().__init__(f"adapter {adapter!r}{where}: {message}")

    def __reduce__(self) -> tuple[type[AdapterError], tuple[str, str, str | None]]:
        # Default exception pickling replays __init__ with str(self) only; keep the fields intact
        # so the error survives crossing a process boundary.
        return (type(self), (self.adapter, self.message, self.field))
