"""The `hotlora` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.demo_tasks import DEMO_MODEL, TASKS, demo_adapters, prompt_for

if TYPE_CHECKING:
    from server.config import Settings

log = logging.getLogger("hotlora")


def _demo(args: argparse.Namespace) -> int:
    """One mixed batch on a demo model: every word through the base and every demo adapter."""
    from server.engine import Engine, EngineConfig, SamplingParams

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
    from server.engine import Engine, SamplingParams

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
    import uvicorn
    from pydantic import ValidationError
    from uvicorn.config import STARTUP_FAILURE

    from server.config import Settings
    from server.lifecycle import GracefulServer, lifecycle_of
    from server.main import create_app

    flags = {
        "model": args.model,
        "adapter_store": args.adapter_store,
        "chat_template": args.chat_template,
        "host": args.host,
        "port": args.port,
        "max_running": args.max_running,
        "max_queue": args.max_queue,
        "max_adapters": args.max_adapters,
        "max_rank": args.max_rank,
        "max_seq_len": args.max_seq_len,
        "replicas": args.replicas,
        "ray_address": args.ray_address,
    }
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        print(f"hotlora: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.replicas is not None:
        return _serve_on_ray(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # hotlora.access writes the one line per request
        # bounds SIGINT's shutdown too (uvicorn takes whole seconds)
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
    )
    _json_log_lines()  # after uvicorn.Config, which applies uvicorn's logging config
    server = GracefulServer(config, lifecycle_of(app), settings.shutdown_timeout_s)
    # uvicorn re-raises a SIGINT it shut down for: not an error here (as in uvicorn.run)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else STARTUP_FAILURE


def _serve_on_ray(settings: Settings) -> int:
    """`--replicas N`: N engine replicas behind one ingress on Ray Serve (server/ray_app.py)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print(
            "hotlora: --replicas needs Ray Serve: pip install 'hotlora[ray]' "
            "(or: pip install 'ray[serve]'); without --replicas hotlora serves in one process",
            file=sys.stderr,
        )
        return 2
    from server.ray_app import serve_forever

    return serve_forever(settings)


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hotlora", description="Serve many LoRA adapters on one base."
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="generate from the demo model with all demo adapters at once"
    )
    demo.add_argument(
        "--model", type=Path, default=DEMO_MODEL,
        help="a demo model (default: the GPT-2 demo; adapters/demo/hotlora-llama-demo: Llama)",
    )
    demo.add_argument("words", nargs="*", help="inputs for the demo tasks")
    demo.set_defaults(func=_demo)
    serve = sub.add_parser(
        "serve", help="run the OpenAI-compatible server (settings also from HOTLORA_<NAME>)"
    )
    serve.add_argument(
        "--model", type=Path,
        help="a gpt2/llama/mistral/qwen2/qwen3 directory (default: the demo model)",
    )
    serve.add_argument("--adapter-store", type=Path, help="adapter store directory")
    serve.add_argument(
        "--chat-template", type=Path, metavar="FILE",
        help="a jinja chat template that supplies or overrides the model's",
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--max-running", type=int, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, help="waiting requests before 429")
    serve.add_argument("--max-adapters", type=int, help="device adapter slots")
    serve.add_argument("--max-rank", type=int)
    serve.add_argument("--max-seq-len", type=int)
    serve.add_argument(
        "--replicas", type=int, metavar="N",
        help="N engine replicas behind one ingress on Ray Serve (needs hotlora[ray])",
    )
    serve.add_argument(
        "--ray-address", metavar="ADDR",
        help="with --replicas: the Ray cluster to join (default: start a local one)",
    )
    serve.set_defaults(func=_serve)
    gen = sub.add_parser("generate", help="generate one prompt with chosen adapters")
    gen.add_argument("--model", type=Path, default=DEMO_MODEL)
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    gen.add_argument("--use", action="append", default=[], metavar="NAME", help="adapter per row")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    from adapters.errors import AdapterError
    from server.engine.errors import EngineError

    try:
        return int(args.func(args))
    except (AdapterError, EngineError) as e:
        print(f"hotlora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
