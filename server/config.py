"""Server settings: the one place hotlora reads environment variables (HOTLORA_<NAME>).

Every field is also a `hotlora serve --<name>` flag (secrets excepted: they are environment only,
a flag would show in `ps`); `hotlora serve --help` is generated from these fields, their
descriptions and defaults (server/cli.py), so describe each one as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hotlora.adapters.demo_tasks import DEMO_MODEL


class Settings(BaseSettings):
    """Every setting of `hotlora serve`; each can come from HOTLORA_<NAME> or the command line."""

    model_config = SettingsConfigDict(env_prefix="HOTLORA_", frozen=True, extra="forbid")

    model: Path = Field(
        DEMO_MODEL,
        description="the base model: a Hugging Face GPT-2, Llama, Mistral, Qwen2 or Qwen3 "
        "directory (config.json, model.safetensors, tokenizer files); the default is the "
        "bundled GPT-2 demo",
    )
    served_model_name: str | None = Field(
        None, description="the base model's id in the API (unset: the model directory's name)"
    )
    adapter_store: Path | None = Field(
        None,
        description="the adapter store directory, bound to one base model (unset: "
        "hotlora-adapters/<model id> in the working directory)",
    )
    chat_template: Path | None = Field(
        None,
        description="a jinja chat template file that supplies or overrides the model's "
        "(unset: the model's own, if it has one)",
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    admin_key: SecretStr | None = Field(
        None, description="bearer key for adapter uploads and deletes (unset: open to anyone)"
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated bearer keys for completions (unset: open to anyone)",
    )
    allowed_adapter_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="os.pathsep-separated directories /v1/load_lora_adapter may load from "
        "(unset: none)",
    )
    max_running: int = Field(32, ge=1, description="requests decoded together (KV-cache rows)")
    max_queue: int = Field(256, ge=0, description="waiting requests before 429")
    max_seq_len: int | None = Field(
        None, ge=2, description="context per request in tokens (unset: the model's, at most 4096)"
    )
    max_adapters: int = Field(16, ge=1, description="device slots for adapters")
    max_rank: int = Field(64, ge=1, description="largest LoRA rank accepted")
    cpu_cache_bytes: int = Field(1 << 30, ge=0, description="CPU adapter cache in bytes (LRU)")
    max_upload_bytes: int = Field(
        256 << 20, ge=1, description="largest accepted adapter upload in bytes"
    )
    merge_hot_adapters: bool = Field(
        True, description="serve a dominant adapter from merged weights"
    )
    cuda_graphs: bool = Field(
        True, description="CUDA: replay decode steps from graphs captured per batch bucket"
    )
    merge_min_share: float = Field(0.75, gt=0, le=1, description="share of running rows to merge")
    merge_min_rows: int = Field(4, ge=1, description="running rows needed before merging")
    seed_demo_adapters: bool = Field(
        True, description="put the demo adapters in an empty store (a bundled demo model only)"
    )
    engine_process: bool = Field(
        True, description="run the engine in its own process (false: on a thread of the API's)"
    )
    engine_threads: int | None = Field(
        None,
        ge=1,
        description="the engine process' torch threads (unset: the CPU cores but one, which "
        "the API process needs; threads that share a core with it stall every step)",
    )
    tenants_file: Path | None = Field(
        None,
        description="YAML or JSON file of tenants (keys, roles, limits); reloaded on SIGHUP and "
        "when it changes (unset: no tenants)",
    )
    max_body_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="largest JSON request body in bytes (413 beyond; adapter uploads: "
        "max_upload_bytes)",
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        description="per-request deadline in seconds: past it the row is freed; a request that "
        "started ends with what it has (finish_reason 'length'), one that never started gets a "
        "504 (unset: none)",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM: /ready answers 503 at once, running requests get this many "
        "seconds to finish, then the server exits 0",
    )
    access_log: bool = Field(True, description="one JSON line per request (logger hotlora.access)")
    device: str | None = Field(
        None, description="torch device of the engine, e.g. cpu, cuda, cuda:1 (unset: cuda if "
        "available, else cpu)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="weights and activations: float32, float16 or bfloat16 (unset: "
        "float16 on CUDA, float32 on CPU)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="critical, error, warning, info, debug or trace"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        return [k.strip() for k in v.split(",") if k.strip()] if isinstance(v, str) else v

    @field_validator("allowed_adapter_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, v: Any) -> Any:
        return [p for p in v.split(os.pathsep) if p] if isinstance(v, str) else v

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model.resolve().name

    @property
    def torch_threads(self) -> int | None:
        """The engine process' torch threads; None leaves torch's default (engine on a thread)."""
        if not self.engine_process:
            return self.engine_threads
        return self.engine_threads or max(1, (os.cpu_count() or 2) - 1)

    @property
    def store_path(self) -> Path:
        """The adapter store: adapters fit one base, so each model gets its own by default."""
        return self.adapter_store or Path("hotlora-adapters") / self.model_id

    def redacted(self) -> dict[str, Any]:
        """The effective settings for the start-up log, secrets masked."""
        out = self.model_dump()
        out["admin_key"] = "***" if self.admin_key else None
        out["api_keys"] = [f"*** ({len(self.api_keys)} keys)"] if self.api_keys else []
        return out

    # -- scale out (server/ray_app.py; README "Scale out") --
    shared_store: bool = Field(
        False,
        description="other servers write the adapter store too (replicas, pods on one volume): "
        "every request resolves its adapter from the disk, so their uploads and deletes apply "
        "at once",
    )
    shared_store_refresh_s: float = Field(
        2.0, gt=0, description="with shared_store: how often listings rescan the whole store"
    )
    replicas: int | None = Field(
        None, ge=1, description="serve with N engine replicas behind one ingress on Ray Serve "
        "(pip install 'hotlora[ray]'; unset: one process)"
    )
    ray_address: str | None = Field(
        None, description="with replicas: the Ray cluster to join (unset: start a local one, "
        "stopped with the server)"
    )
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica")
