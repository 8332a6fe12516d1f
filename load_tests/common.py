"""Shared helpers of the load tests: loopback-only URLs, server processes, synthetic adapters,
adapter popularity, latency statistics and Prometheus text parsing.

Every script in load_tests/ talks to 127.0.0.1 only: `check_loopback` refuses any other host.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]

DEMO_MODEL = REPO / "adapters" / "demo" / "hotlora-demo"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# All four GPT-2 block projections, as the demo adapters target them.
DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ---------------------------------------------------------------------------- network


def check_loopback(url: str) -> str:
    """Return url without a trailing slash; refuse anything but a loopback http URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise SystemExit(f"refusing {url!r}: load tests only target http://127.0.0.1:<port>")
    return url.rstrip("/")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; a race is possible but unlikely)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------------- popularity


def popularity(n: int, alpha: float) -> list[float]:
    """Adapter popularity as in S-LoRA's trace generator (numpy's power distribution).

    S-LoRA draws x ~ Power(alpha) on [0, 1] (density alpha * x**(alpha - 1)) and picks adapter
    floor(x * n). Adapter i therefore gets exactly

        p_i = ((i + 1) / n) ** alpha - (i / n) ** alpha,    i = 0 .. n-1,  0 < alpha <= 1.

    alpha = 1 is uniform (every p_i = 1/n); a smaller alpha puts more mass on the low indices
    (alpha = 0.1 with n = 32 gives adapter 0 about 71%). The sum telescopes to exactly 1.
    """
    if n < 1:
        raise ValueError(f"need at least one adapter, got {n}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return [((i + 1) / n) ** alpha - (i / n) ** alpha for i in range(n)]


def sample_index(rng: random.Random, probs: Sequence[float]) -> int:
    return rng.choices(range(len(probs)), weights=probs, k=1)[0]


def parse_range(text: str) -> tuple[int, int]:
    """'16:64' -> (16, 64); '32' -> (32, 32). Inclusive bounds of a uniform integer draw."""
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if a < 1 or b < a:
        raise ValueError(f"bad range {text!r}: need 1 <= lo <= hi")
    return a, b


# ---------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); nan if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """mean, p50, p90, p99 and max of values * scale (nan when there are none)."""
    xs = [v * scale for v in values]
    return {
        "mean": sum(xs) / len(xs) if xs else math.nan,
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "max": max(xs) if xs else math.nan,
        "n": float(len(xs)),
    }


def tpot(latency: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first: (latency - ttft) / (output_tokens - 1)."""
    if output_tokens < 2:
        return None
    return (latency - ttft) / (output_tokens - 1)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, summing nothing (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def metric(metrics: dict[str, float], name: str) -> float:
    """Sum of every sample of `name` (all label sets); 0 when absent."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


# ---------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class BaseDims:
    n_layer: int
    n_embd: int
    n_inner: int
    vocab_size: int
    n_positions: int


def base_dims(model_dir: Path) -> BaseDims:
    """The GPT-2 shapes an adapter must fit, read from the base's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    n_embd = int(cfg["n_embd"])
    return BaseDims(
        n_layer=int(cfg["n_layer"]),
        n_embd=n_embd,
        n_inner=int(cfg.get("n_inner") or 4 * n_embd),
        vocab_size=int(cfg["vocab_size"]),
        n_positions=int(cfg.get("n_positions", 1024)),
    )


def make_adapter(
    path: Path,
    dims: BaseDims,
    *,
    rank: int,
    seed: int,
    targets: Sequence[str] = DEFAULT_TARGETS,
    std: float = 0.02,
) -> Path:
    """Write a random PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

    A ~ N(0, std), B ~ N(0, std): small, non-zero, deterministic per seed. Shaped for `dims`.
    """
    import torch

    from hotlora.adapters.format import BaseShapes, LoRAAdapter, LoRAModule, save_lora_adapter
    from hotlora.adapters.lora_config import LoRAConfig

    config = LoRAConfig.from_dict(
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(targets),
            "fan_in_fan_out": True,  # GPT-2's Conv1D layout, as peft saves it
            "lora_dropout": 0.0,
            "bias": "none",
        },
        path.name,
    )
    shapes = BaseShapes.gpt2(dims.n_layer, dims.n_embd, dims.n_inner)
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for layer in range(dims.n_layer):
        for target in DEFAULT_TARGETS:
            if target not in targets:
                continue
            d_in, d_out = shapes.dims[target]
            A = torch.randn(rank, d_in, generator=gen) * std  # (r, d_in)
            B = torch.randn(d_out, rank, generator=gen) * std  # (d_out, r)
            name = f"transformer.h.{layer}.{target}"
            modules.append(LoRAModule(layer, target, A, B, config.scaling_for(name)))
    save_lora_adapter(path, LoRAAdapter(path.name, config, tuple(modules)))
    return path


def random_deu(
    n_layer: int,
    d_ff: int,
    *,
    seed: int,
    layers: tuple[int, ...] | None = None,
    group_size: int = 1,
    gain: float = 0.5,
    base_name: str = "synthetic",
    layout: Any = None,
) -> Any:
    """A DEUAdapter with random parameters spread over every regime (a, b, c in (0.2, 2)),
    c1, c2 ~ N(0, 0.3), gain ~ N(0, gain); deterministic per seed. layout: the base family's
    (adapters.layout; default GPT-2)."""
    import torch

    from hotlora.adapters.deu_format import DEUAdapter, DEUConfig
    from hotlora.adapters.layout import GPT2_LAYOUT

    gen = torch.Generator().manual_seed(seed)
    layers = tuple(range(n_layer)) if layers is None else layers
    groups = d_ff // group_size
    params = {}
    for layer in layers:
        abc = 0.2 + 1.8 * torch.rand(3, groups, generator=gen)  # (3, G)
        c12 = 0.3 * torch.randn(2, groups, generator=gen)  # (2, G)
        g = gain * torch.randn(1, groups, generator=gen)  # (1, G)
        params[layer] = torch.cat([abc, c12, g])  # (6, G)
    config = DEUConfig(layers, group_size, base_name, layout=layout or GPT2_LAYOUT)
    return DEUAdapter(config, params)


def adapter_files(path: Path) -> dict[str, tuple[str, bytes]]:
    """The multipart files of POST /v1/adapters for a PEFT adapter directory."""
    return {
        "config": ("adapter_config.json", (path / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (path / "adapter_model.safetensors").read_bytes()),
    }


def upload_adapter(
    client: Any, url: str, name: str, path: Path, admin_key: str | None = None
) -> dict[str, Any]:
    """POST /v1/adapters with an httpx.Client; raises on anything but 201."""
    r = client.post(
        f"{url}/v1/adapters",
        data={"name": name},
        files=adapter_files(path),
        headers=auth(admin_key),
        timeout=120,
    )
    if r.status_code != 201:
        raise RuntimeError(f"upload of {name} failed: {r.status_code} {r.text[:300]}")
    body: dict[str, Any] = r.json()
    return body


def base_model_id(client: Any, url: str, api_key: str | None = None) -> str:
    """The served base model's id: the first entry of GET /v1/models."""
    r = client.get(f"{url}/v1/models", headers=auth(api_key), timeout=30)
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


RANDOM_BASES = {
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 300},
}


def random_base_tokenizer(vocab_size: int) -> Any:
    """A byte-level tokenizer with exactly vocab_size ids, every one decodable to text.

    Ids 0-255 are the bytes (as in the demo tokenizer), 256 .. vocab_size-2 are 4-letter
    strings (never produced by encoding, but a random model samples them and they must decode
    to text, or a server would stream nothing for them), vocab_size-1 is <|endoftext|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from hotlora.adapters.demo_tasks import EOS, build_tokenizer

    base = build_tokenizer().get_vocab()
    vocab = {tok: i for tok, i in base.items() if i < 256}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(vocab_size - 257):
        word = "".join(letters[(i // 26**k) % 26] for k in range(4))
        vocab[word] = 256 + i
    vocab[EOS] = vocab_size - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


def make_random_base(path: Path, kind: str = "gpt2-small", seed: int = 0) -> Path:
    """A GPT-2 with random weights in Hugging Face layout (config.json, model.safetensors,
    tokenizer.json), shaped like `kind` (gpt2-small: 124M parameters, context 1024)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = RANDOM_BASES[kind]
    torch.manual_seed(seed)
    vocab = shape["vocab_size"]
    cfg = GPT2Config(
        n_layer=shape["n_layer"],
        n_embd=shape["n_embd"],
        n_head=shape["n_head"],
        vocab_size=vocab,
        n_positions=1024,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    GPT2LMHeadModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    random_base_tokenizer(vocab).save(str(path / "tokenizer.json"))
    return path


# ---------------------------------------------------------------------------- processes


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants: the server is its API process plus the engine process it
    spawns (from whichever thread started it, so every thread's children are read)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out += process_tree(int(child))
    return out


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process and its descendants (VmRSS in /proc/<pid>/status)."""
    total = _vm_rss(pid)
    for child in process_tree(pid)[1:]:
        try:
            total += _vm_rss(child)
        except (OSError, RuntimeError):  # it just exited
            continue
    return total


class ServerProcess:
    """A hotlora or baseline server in a subprocess on a free 127.0.0.1 port.

    kind "hotlora" runs `python -m hotlora.server serve`; "baseline" runs
    load_tests/baseline_server.py.
    The adapter store is a fresh temporary directory unless given. Output goes to a log file.
    """

    def __init__(
        self,
        kind: str,
        model_dir: Path,
        *,
        port: int | None = None,
        store: Path | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        if kind not in ("hotlora", "baseline"):
            raise ValueError(f"unknown server kind {kind!r}")
        self.kind, self.model_dir = kind, Path(model_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._tmp = tempfile.TemporaryDirectory(prefix=f"hotlora-{kind}-")
        self.store = store or Path(self._tmp.name) / "store"
        self.log_path = log_path or Path(self._tmp.name) / "server.log"
        self.extra_args, self.env = list(extra_args), env or {}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        common_args = ["--model", str(self.model_dir), "--port", str(self.port)]
        common_args += ["--host", "127.0.0.1"]
        if self.kind == "hotlora":
            return [
                sys.executable,
                "-m",
                "hotlora.server",
                "serve",
                *common_args,
                "--adapter-store",
                str(self.store),
                *self.extra_args,
            ]
        script = str(Path(__file__).resolve().parent / "baseline_server.py")
        return [
            sys.executable,
            script,
            *common_args,
            "--adapter-store",
            str(self.store),
            *self.extra_args,
        ]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, poll_s: float = 0.2) -> ServerProcess:
        """Launch and wait until ready, checking every poll_s seconds."""
        import httpx

        env = {**os.environ, **self.env}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command(), cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        ready = "/ready" if self.kind == "hotlora" else "/health"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + ready, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} server not ready in time:\n{self.log_tail()}")
            time.sleep(poll_s)

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s; returns the exit code."""
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(timeout=10)
        elif self.proc is not None:
            code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def machine_info() -> dict[str, Any]:
    """What ran the measurement: CPU model, cores, torch threads and versions."""
    import platform

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],  # other work on a shared machine
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch is optional for the client side
        pass
    return info
