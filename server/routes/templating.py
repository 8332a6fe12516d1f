"""Chat messages -> prompt text through the model's chat template (chat and /tokenize)."""

from __future__ import annotations

import asyncio

from hotlora.server.engine import RequestError
from hotlora.server.errors import APIError
from hotlora.server.openai_schemas import ChatMessage
from hotlora.server.state import AppState


async def render_chat(state: AppState, messages: list[ChatMessage], generation_prompt: bool) -> str:
    """The conversation as the model's chat template writes it, or a 400. Rendering runs off
    the event loop: an untrusted template may take up to its render deadline."""
    template = state.chat_template
    if template is None:
        raise APIError(
            400,
            f"model {state.settings.model_id!r} has no chat template: start hotlora serve with "
            "--chat-template FILE (a jinja template), or use /v1/completions",
            "messages",
        )
    plain = [
        {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
        for m in messages
    ]
    try:
        return await asyncio.to_thread(template.render, plain, generation_prompt)
    except RequestError as e:
        raise APIError(400, str(e), "messages") from e
