"""The baseline hotlora is measured against: the simplest multi-adapter server a user would write.

FastAPI + transformers + peft, ONE request at a time (an asyncio.Lock around each generation):
`PeftModel.set_adapter(name)` for an adapter, `disable_adapter()` for the base model, then a plain
token-by-token loop with the model's KV cache. It serves the subset of hotlora's API the load
tests use, with the same shapes:

    POST /v1/completions        model = base id (the model dir's name) or an adapter name;
                                prompt (string or token ids), max_tokens, temperature, top_p,
                                top_k, seed, stop, ignore_eos, stream (SSE) + stream_options
    POST /v1/adapters           multipart name / config / weights -> 201 (same name = replace)
    DELETE /v1/adapters/{name}
    GET /v1/models, GET /health

    python load_tests/baseline_server.py --model adapters/demo/hotlora-demo --port 8001

It never touches the network beyond its 127.0.0.1 listening socket (HF_HUB_OFFLINE is forced).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # adapters come from local paths only

from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionBody(BaseModel):
    model: str
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "error", "param": param, "code": status}}


class Baseline:
    """The model, its peft adapters and the one lock every generation and mutation takes."""

    def __init__(self, model_dir: Path, store: Path, device: str = "cpu") -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import GPT2LMHeadModel

        self.torch = torch
        self.model_dir, self.store = model_dir, store
        self.model_id = model_dir.resolve().name
        self.device = device
        self.base = GPT2LMHeadModel.from_pretrained(str(model_dir)).to(device).eval()
        self.peft: Any = None  # the PeftModel once the first adapter arrives
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        eos = self.tokenizer.token_to_id("<|endoftext|>")
        self.eos = eos if eos is not None else self.base.config.eos_token_id
        self.context = int(self.base.config.n_positions)
        self.adapters: dict[str, dict[str, Any]] = {}  # name -> info
        self.lock = asyncio.Lock()
        self.created = int(time.time())
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------ adapters

    def add(self, name: str, config: bytes, weights: bytes) -> dict[str, Any]:
        """Store the files and (re)load them into peft; call with the lock held."""
        from peft import PeftModel

        info = self.adapters.get(name)
        version = (info["version"] + 1) if info else 1
        path = self.store / name / f"v{version}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_config.json").write_bytes(config)
        (path / "adapter_model.safetensors").write_bytes(weights)
        try:
            cfg = json.loads(config)
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
                self.peft.eval()
            else:
                if info is not None:
                    self.peft.delete_adapter(name)
                self.peft.load_adapter(str(path), adapter_name=name)
        except Exception as e:
            shutil.rmtree(path, ignore_errors=True)
            if info is not None:  # the old version is gone from peft now: drop the name too
                self.adapters.pop(name, None)
            raise APIError(400, f"adapter {name!r} could not be loaded: {e}", "config") from e
        info = {
            "name": name,
            "version": version,
            "kind": "lora",
            "rank": int(cfg.get("r", 0)),
            "target_modules": list(cfg.get("target_modules") or []),
            "size_bytes": len(weights),
            "sha256": "",
            "created": int(time.time()),
        }
        self.adapters[name] = info
        return info

    def delete(self, name: str) -> None:
        if name not in self.adapters:
            raise APIError(404, f"adapter {name!r} does not exist", "name")
        self.peft.delete_adapter(name)
        del self.adapters[name]
        shutil.rmtree(self.store / name, ignore_errors=True)

    # ------------------------------------------------------------------ generation

    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt).ids
        if not ids:
            raise APIError(400, "prompt must not be empty", "prompt")
        return ids

    def generate(
        self,
        ids: list[int],
        adapter: str | None,
        body: CompletionBody,
        emit: Callable[[list[int], str | None], None],
        cancelled: threading.Event,
    ) -> None:
        """Token-by-token decoding with the KV cache; emit(new_ids, finish_reason) per token."""
        torch = self.torch
        gen = torch.Generator().manual_seed(body.seed) if body.seed is not None else None
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        with torch.inference_mode():
            if adapter is None:
                model = self.base
                ctx: Any = self.peft.disable_adapter() if self.peft is not None else _null()
            else:
                self.peft.set_adapter(adapter)
                model, ctx = self.peft, _null()
            with ctx:
                x = torch.tensor([ids], device=self.device)
                cache = None
                out_ids: list[int] = []
                for _ in range(body.max_tokens):
                    if cancelled.is_set():
                        return
                    kwargs: dict[str, Any] = {self.cache_kw: cache} if cache is not None else {}
                    o = model(input_ids=x, use_cache=True, **kwargs)
                    cache = getattr(o, "cache", None) or o.past_key_values
                    tok = self._sample(o.logits[0, -1].float(), body, gen)
                    if tok == self.eos and not body.ignore_eos:
                        emit([], "stop")
                        return
                    out_ids.append(tok)
                    if stops:
                        text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                        if any(s in text for s in stops):
                            emit([tok], "stop")
                            return
                    done = len(out_ids) == body.max_tokens
                    emit([tok], "length" if done else None)
                    x = torch.tensor([[tok]], device=self.device)

    def _sample(self, logits: Any, body: CompletionBody, gen: Any) -> int:
        torch = self.torch
        if body.temperature == 0:
            return int(logits.argmax())
        logits = logits / body.temperature
        if body.top_k > 0:
            kth = torch.topk(logits, min(body.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if body.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < body.top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        return int(torch.multinomial(probs, 1, generator=gen))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _Text:
    """Incremental detokenization: emit only text that no longer ends mid-character."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0

    def add(self, ids: list[int], final: bool) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            at = text.find(s)
            if at != -1:
                text, final = text[:at], True
        end = len(text) if final or not text.endswith("\ufffd") else len(text) - 1
        delta = text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta


def create_app(model_dir: Path, store: Path, device: str = "cpu") -> FastAPI:
    state: dict[str, Baseline] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["b"] = Baseline(model_dir, store, device)
        yield

    app = FastAPI(title="baseline", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        b = state["b"]
        cards = [
            {
                "id": b.model_id,
                "object": "model",
                "created": b.created,
                "owned_by": "baseline",
                "root": b.model_id,
                "parent": None,
            }
        ]
        cards += [
            {
                "id": n,
                "object": "model",
                "created": i["created"],
                "owned_by": "baseline",
                "root": b.model_id,
                "parent": b.model_id,
            }
            for n, i in sorted(b.adapters.items())
        ]
        return {"object": "list", "data": cards}

    @app.post("/v1/adapters", status_code=201)
    async def upload(
        name: Annotated[str, Form()],
        config: Annotated[UploadFile, Form()],
        weights: Annotated[UploadFile, Form()],
    ) -> dict[str, Any]:
        b = state["b"]
        if not _NAME_RE.fullmatch(name):
            raise APIError(400, f"invalid adapter name {name!r}", "name")
        cfg, w = await config.read(), await weights.read()
        async with b.lock:  # never change peft's modules while a generation runs
            return await asyncio.to_thread(b.add, name, cfg, w)

    @app.delete("/v1/adapters/{name}")
    async def delete(name: str) -> dict[str, Any]:
        b = state["b"]
        async with b.lock:
            b.delete(name)
        return {"name": name, "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        b = state["b"]
        if body.model != b.model_id and body.model not in b.adapters:
            raise APIError(404, f"model {body.model!r} does not exist", "model")
        ids = b.encode(body.prompt)
        if len(ids) + body.max_tokens > b.context:
            raise APIError(
                400,
                f"prompt ({len(ids)}) + max_tokens ({body.max_tokens}) exceeds "
                f"the context of {b.context} tokens",
                "max_tokens",
            )
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

        async def tokens() -> AsyncIterator[tuple[list[int], str | None]]:
            """Take the lock, run the generation in a thread, yield its tokens as they come."""
            async with b.lock:
                if body.model != b.model_id and body.model not in b.adapters:
                    raise APIError(404, f"model {body.model!r} does not exist", "model")
                adapter = None if body.model == b.model_id else body.model
                loop = asyncio.get_running_loop()
                q: asyncio.Queue[Any] = asyncio.Queue()
                cancelled = threading.Event()

                def emit(new: list[int], reason: str | None) -> None:
                    loop.call_soon_threadsafe(q.put_nowait, (new, reason))

                def run() -> None:
                    try:
                        b.generate(ids, adapter, body, emit, cancelled)
                    except BaseException as e:  # handed to the request
                        loop.call_soon_threadsafe(q.put_nowait, e)

                task = asyncio.ensure_future(asyncio.to_thread(run))
                try:
                    while True:
                        item = await q.get()
                        if isinstance(item, BaseException):
                            raise item
                        yield item
                        if item[1] is not None:
                            break
                finally:
                    cancelled.set()
                    await task  # the lock is released only when the thread is done

        def chunk(text: str, reason: str | None) -> str:
            c = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            }
            return f"data: {json.dumps(c)}\n\n"

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if body.stream:

            async def sse() -> AsyncIterator[str]:
                text, n = _Text(b.tokenizer, stops), 0
                try:
                    async for new, reason in tokens():
                        n += len(new)
                        delta = text.add(new, reason is not None)
                        if delta or reason is not None:
                            yield chunk(delta, reason)
                except Exception as e:
                    yield f"data: {json.dumps(error_body(503, f'generation failed: {e}'))}\n\n"
                if body.stream_options is not None and body.stream_options.include_usage:
                    final = {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": usage(n),
                    }
                    yield f"data: {json.dumps(final)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        text, n, reason = _Text(b.tokenizer, stops), 0, None
        out = ""
        async for new, reason in tokens():
            n += len(new)
            out += text.add(new, reason is not None)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "text": out, "logprobs": None, "finish_reason": reason}],
            "usage": usage(n),
        }

    return app


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, required=True, help="Hugging Face GPT-2 directory")
    ap.add_argument("--adapter-store", type=Path, help="where uploads are kept (default: temp)")
    ap.add_argument("--host", default="127.0.0.1", help="must be a loopback address")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--device", default="cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"refusing --host {args.host}: the baseline listens on loopback only")
        return 2
    import uvicorn

    tmp = None
    store = args.adapter_store
    if store is None:
        tmp = tempfile.TemporaryDirectory(prefix="baseline-store-")
        store = Path(tmp.name)
    store.mkdir(parents=True, exist_ok=True)
    try:
        app = create_app(args.model, store, args.device)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
