"""Typed errors of the engine (adapter errors live in adapters.errors)."""


class EngineError(Exception):
    """Base class of every error the engine raises on bad input."""


class ModelLoadError(EngineError):
    """The base model directory cannot be loaded (missing files, pickle weights, bad shapes)."""


class RequestError(EngineError, ValueError):
    """A generation request is invalid (unknown adapter, prompt too long, bad sampling params).

    `param` names the request field to fix (OpenAI's error `param`), set where the error is
    raised; None leaves the choice to the caller (the prompt or messages, say).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
