"""POST /tokenize and /detokenize (vLLM's shapes): the base model's tokenizer, which every
adapter shares."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from hotlora.server.deps import PrincipalDep, StateDep, authenticate
from hotlora.server.engine import RequestError
from hotlora.server.errors import APIError
from hotlora.server.routes.templating import render_chat
from hotlora.server.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(
    body: TokenizeRequest, state: StateDep, principal: PrincipalDep
) -> TokenizeResponse:
    """A prompt, or messages rendered by the chat template (special tokens then default to
    off: the template writes them, as in /v1/chat/completions)."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    if body.model is not None:
        state.resolve_model(body.model, principal)
    tok = state.inputs.tokenizer
    special = body.add_special_tokens
    if body.messages is not None:
        text = await render_chat(state, body.messages, body.add_generation_prompt)
        special = bool(special)
    else:
        text = body.prompt or ""
        special = special is None or special
    try:
        ids = tok.encode(text, add_special_tokens=special)
    except RequestError as e:
        raise APIError(400, str(e), "prompt" if body.messages is None else "messages") from e
    strs = [tok.raw.id_to_token(i) for i in ids] if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=state.inputs.max_seq_len, tokens=ids, token_strs=strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    body: DetokenizeRequest, state: StateDep, principal: PrincipalDep
) -> DetokenizeResponse:
    if body.model is not None:
        state.resolve_model(body.model, principal)
    tok = state.inputs.tokenizer
    bad = [i for i in body.tokens if not 0 <= i < tok.vocab_size]
    if bad:
        raise APIError(
            400, f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})", "tokens"
        )
    # As vLLM (and tokenizer.decode's default): special tokens are written out, not dropped.
    return DetokenizeResponse(prompt=tok.decode(body.tokens, skip_special_tokens=False))


@router.get("/tokenizer_info", dependencies=[Depends(authenticate)], response_model=TokenizerInfo)
async def tokenizer_info(state: StateDep) -> TokenizerInfo:
    tok = state.inputs.tokenizer

    def name(i: int | None) -> str | None:
        return None if i is None else tok.raw.id_to_token(i)

    eos = min(state.inputs.eos_token_ids, default=None)  # the first of them, by id
    bos = (
        tok.bos_token_id if tok.bos_token_id is not None else state.inputs.model_config.bos_token_id
    )
    return TokenizerInfo(
        bos_token=name(bos),
        eos_token=name(eos),
        model_max_length=state.inputs.max_seq_len,
    )
