"""What `hotlora serve` checks before it starts anything (uvicorn, the engine, a Ray cluster).

Each mistake a user can make is found here, in about a second and before any weight is read,
as a typed error (server/cli_errors.py) that `cli.main` reports in one line. Found later, it
would surface inside uvicorn's start-up or a Ray replica, as a traceback after a model load.
The usage checks (exit 2) come first, then the address (4), then the model and store (3).
The server repeats the loading checks when it builds its state (server/main.py): these are a
fast first pass, not a replacement.
"""

from __future__ import annotations

import errno
import logging
import socket

from hotlora.server.cli_errors import AddressError, LoadError, UsageError
from hotlora.server.config import Settings

log = logging.getLogger(__name__)


def check_ray() -> None:
    """`--replicas` needs Ray Serve (the `ray` extra)."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as e:
        raise UsageError(
            "--replicas needs Ray Serve, which is not installed; pip install 'hotlora[ray]', "
            "or leave out --replicas to serve in one process"
        ) from e


def check_usage(settings: Settings, flags: set[str]) -> None:
    """The files and values a user names: the tenants file, a --chat-template, the device
    (`flags`: the settings the command line gave, named as flags in messages)."""
    from hotlora.server.engine.chat_template import ChatTemplate, ChatTemplateError
    from hotlora.server.tenants import TenantRegistry, TenantsFileError

    try:
        TenantRegistry(settings.tenants_file)
    except TenantsFileError as e:
        raise UsageError(str(e)) from e
    if settings.chat_template is not None:
        try:
            ChatTemplate.from_file(settings.chat_template)
        except ChatTemplateError as e:
            raise UsageError(str(e)) from e
    if settings.device is not None:
        _check_device(settings.device, "--device" if "device" in flags else "HOTLORA_DEVICE")


def _check_device(device: str, where: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(
            f"{where}={device!r} is not a torch device; use cpu, cuda or cuda:<index>, or leave "
            "it out"
        ) from e
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise UsageError(
                f"{where}={device!r}, but this machine has {count} CUDA device(s); pick one it "
                "has, or leave it out"
            )


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening-ready sockets on every address `host` resolves to, as asyncio's create_server
    would bind them; uvicorn serves on these, so the address is checked before the model loads
    and nothing can take it in between."""
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise AddressError(
            f"cannot resolve host {host!r} ({e.strerror}); pass --host an address of this "
            "machine (127.0.0.1, 0.0.0.0 for every interface)"
        ) from e
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, str(address[0])) in seen:
                continue
            seen.add((family, str(address[0])))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            # Listening now holds the port: two SO_REUSEADDR sockets may both bind one port
            # while neither listens, and then another server could take it during the model
            # load. (uvicorn listens again, with its own backlog.)
            sock.listen(2048)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise _address_error(host, port, e) from e
    return sockets


def check_address(host: str, port: int) -> None:
    """Whether `host:port` can be listened on now (for a server that binds it itself)."""
    for sock in bind(host, port):
        sock.close()


def _address_error(host: str, port: int, e: OSError) -> AddressError:
    where = f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return AddressError(
            f"port {port} on {host} is in use; stop what listens there or pass another --port"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return AddressError(
            f"no permission to listen on {where} ({e.strerror}); pass a --port above 1023"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return AddressError(
            f"{host} is not an address of this machine; pass --host one of its addresses "
            "(127.0.0.1, 0.0.0.0 for every interface)"
        )
    return AddressError(f"cannot listen on {where} ({e.strerror or e}); pass another --host or "
                        "--port")


def check_model(settings: Settings) -> None:
    """The model directory: config.json, the safetensors headers (every tensor there, with its
    shape), the tokenizer, the chat template; then the adapter store, bound to this base."""
    from hotlora.adapters.errors import AdapterError
    from hotlora.adapters.store import AdapterStore, StoreMismatch
    from hotlora.server.engine import EngineConfig
    from hotlora.server.engine.chat_template import ChatTemplate
    from hotlora.server.engine.errors import ModelLoadError
    from hotlora.server.engine.inputs import InputProcessor
    from hotlora.server.engine.loader import check_checkpoint

    try:
        check_checkpoint(settings.model)
        inputs = InputProcessor.from_model_dir(
            settings.model, EngineConfig(max_seq_len=settings.max_seq_len)
        )
        ChatTemplate.load(settings.model, settings.chat_template)
    except ModelLoadError as e:
        raise LoadError(str(e)) from e
    try:
        AdapterStore(settings.store_path, inputs.base_shapes, settings.max_rank)
    except StoreMismatch as e:
        raise LoadError(str(e)) from e
    except (OSError, AdapterError) as e:
        raise LoadError(
            f"cannot open the adapter store {settings.store_path} ({e}); pass --adapter-store "
            "(HOTLORA_ADAPTER_STORE) a directory this user can write"
        ) from e
