"""Engine log-probabilities in the two OpenAI shapes: completions' parallel lists and chat's
per-token objects. Token strings are each token decoded alone, special tokens written out."""

from __future__ import annotations

from collections.abc import Sequence

from hotlora.server.engine.outputs import TokenLogprob
from hotlora.server.engine.tokenizer import TextTokenizer
from hotlora.server.openai_schemas import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)


def token_text(tok: TextTokenizer, token_id: int) -> str:
    return tok.token_text(token_id)


class CompletionLogprobsBuilder:
    """Completions' `logprobs` object, built chunk by chunk; text_offset counts from the start
    of the choice's text (the echoed prompt included), carried across chunks."""

    def __init__(self, tok: TextTokenizer) -> None:
        self.tok = tok
        self.offset = 0

    def build(
        self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None]
    ) -> CompletionLogprobs:
        """One entry per token id; None (the first prompt token) has no log-probability.

        top_logprobs holds the k best tokens and the chosen one (as vLLM), most likely first.
        """
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, lp in zip(token_ids, entries, strict=True):
            text = token_text(self.tok, token_id)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
            if lp is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(lp.logprob)
            pairs = sorted({*lp.top, (lp.token_id, lp.logprob)}, key=lambda p: -p[1])
            top: dict[str, float] = {}
            for t, v in pairs:
                top.setdefault(token_text(self.tok, t), v)
            out.top_logprobs.append(top)
        return out


def chat_logprobs(tok: TextTokenizer, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """Chat's `logprobs.content`: the chosen token and exactly top_logprobs alternatives."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(tok, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for lp in entries:
        chosen = top(lp.token_id, lp.logprob)
        content.append(
            ChatTokenLogprob(**chosen.model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
        )
    return ChatLogprobs(content=content)
