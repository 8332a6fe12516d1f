"""What the engine returns: a finished generation, or one step's increment of a request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the raw (adapter's own) distribution, and the k most
    likely tokens at its position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob) x k


@dataclass(frozen=True)
class GenerationOutput:
    """The finished result of one prompt."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, a stop token or string) | "length"
    prompt_token_ids: list[int]
    adapter: str | None
    # If params.logprobs was set: one per token id, then the stop token's (EOS or a
    # stop_token_id) when one ended the request, as vLLM reports it.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first token's is None


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request (streamed by the server)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None  # set on the request's last output
    # If params.logprobs was set: of new_token_ids, or of the stop token that ended the request
    logprobs: tuple[TokenLogprob, ...] = ()
    # On a request's first output, if params.prompt_logprobs was set; the first one is None.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
