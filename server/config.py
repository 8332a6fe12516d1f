"""Server settings: the one place hotlora reads environment variables (HOTLORA_<NAME>)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.demo_tasks import DEMO_MODEL


class Settings(BaseSettings):
    """Every setting of `hotlora serve`; each can come from HOTLORA_<NAME> or the command line."""

    model_config = SettingsConfigDict(env_prefix="HOTLORA_", frozen=True, extra="forbid")

    model: Path = Field(DEMO_MODEL, description="Hugging Face GPT-2 directory to serve")
    served_model_name: str | None = Field(
        None, description="model id in the API (default: dir name)"
    )
    adapter_store: Path | None = Field(
        None,
        description="adapter store, bound to one base (default: hotlora-adapters/<model id>)",
    )
    chat_template: Path | None = Field(
        None, description="a jinja chat template file that supplies or overrides the model's"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    admin_key: SecretStr | None = Field(None, description="bearer key for adapter mutations")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys for completions"
    )
    allowed_adapter_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="os.pathsep-separated roots for /v1/load_lora_adapter"
    )
    max_running: int = Field(32, ge=1, description="requests decoded together (KV-cache rows)")
    max_queue: int = Field(256, ge=0, description="waiting requests before 429")
    max_seq_len: int | None = Field(
        None, ge=2, description="context per request (default: model's)"
    )
    max_adapters: int = Field(16, ge=1, description="device slots for adapters")
    max_rank: int = Field(64, ge=1)
    cpu_cache_bytes: int = Field(1 << 30, ge=0, description="CPU adapter cache (LRU by bytes)")
    max_upload_bytes: int = Field(256 << 20, ge=1, description="largest accepted adapter upload")
    merge_hot_adapters: bool = Field(
        True, description="serve a dominant adapter from merged weights"
    )
    cuda_graphs: bool = Field(
        True, description="CUDA: replay decode steps from graphs captured per batch bucket"
    )
    merge_min_share: float = Field(0.75, gt=0, le=1, description="share of running rows to merge")
    merge_min_rows: int = Field(4, ge=1, description="running rows needed before merging")
    seed_demo_adapters: bool = Field(True, description="put the demo adapters in an empty store")
    engine_process: bool = Field(
        True, description="run the engine in its own process (false: on a thread of the API's)"
    )
    engine_threads: int | None = Field(
        None,
        ge=1,
        description="the engine process' torch threads (default: the CPU cores but one, which "
        "the API process needs; threads that share a core with it stall every step)",
    )
    tenants_file: Path | None = Field(
        None,
        description="YAML or JSON file of tenants (keys, roles, limits); reloaded on SIGHUP and "
        "when it changes",
    )
    max_body_bytes: int = Field(
        4 << 20, ge=1024, description="largest JSON request body (413 beyond; uploads: see above)"
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        description="per-request deadline: past it the row is freed; a request that started "
        "ends with what it has (finish_reason 'length'), one that never started gets a 504",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM: /ready answers 503 at once, running requests get this long to "
        "finish, then the server exits 0",
    )
    access_log: bool = Field(True, description="one JSON line per request (logger hotlora.access)")
    device: str | None = None
    dtype: str | None = None
    log_level: str = "info"

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
        None, ge=1, description="serve with N engine replicas on Ray Serve (pip install "
        "hotlora[ray]); unset: one process"
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join with replicas (default: start a local one)"
    )
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica")
