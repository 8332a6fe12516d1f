"""What the engine returns: a finished generation, or one step's increment of a request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationOutput:
    """The finished result of one prompt."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_token_ids: list[int]
    adapter: str | None


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request (streamed by the server)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None  # set on the request's last output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
