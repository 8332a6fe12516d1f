"""The public offline engine: a frozen base model of any supported family, resident LoRA/DEU
adapters, batched generation.

`generate` and the server's loop share one step function: `add_request` queues work, each
`step` either admits waiting requests (prefill) or decodes every running row once.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.adapter import Adapter, load_adapter
from adapters.format import BaseShapes
from server.engine.batch import StepBatch, build_step
from server.engine.config import DEFAULT_MAX_SEQ_LEN, EngineConfig
from server.engine.deu_slots import DEUSlots
from server.engine.errors import EngineError, ModelLoadError, RequestError
from server.engine.hook import BatchAdapters
from server.engine.kv_cache import KVCache
from server.engine.loader import load_model
from server.engine.lora_slots import LoRASlots
from server.engine.models import CausalLM
from server.engine.outputs import GenerationOutput, StepOutput
from server.engine.sampling import SamplingParams, make_generator, sample
from server.engine.tokenizer import Detokenizer, TextTokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class _Resident:
    """An adapter in a device slot; `refs` counts the requests that use it."""

    name: str  # the name it is resident under (the server uses name@version)
    adapter: Adapter
    slot: int
    refs: int = 0
    removed: bool = False

    @property
    def lora_slot(self) -> int:
        return -1 if self.adapter.lora is None else self.slot

    @property
    def deu_slot(self) -> int:
        return -1 if self.adapter.deu is None else self.slot


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: _Resident | None
    detok: Detokenizer
    generator: torch.Generator | None
    out_ids: list[int] = field(default_factory=list)
    row: int = -1
    finish_reason: str | None = None

    @property
    def lora_slot(self) -> int:
        return -1 if self.adapter is None else self.adapter.lora_slot

    @property
    def deu_slot(self) -> int:
        return -1 if self.adapter is None else self.adapter.deu_slot


class Engine:
    """A frozen base model serving many LoRA and DEU adapters in mixed batches."""

    def __init__(
        self, model: CausalLM, tokenizer: TextTokenizer, config: EngineConfig, model_dir: Path
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        cfg = self.model_config = model.cfg
        self.model_dir = model_dir
        weight = next(iter(model.parameters()))
        self.device, self.dtype = weight.device, weight.dtype
        context = min(cfg.max_positions, DEFAULT_MAX_SEQ_LEN)
        self.max_seq_len = min(config.max_seq_len or context, cfg.max_positions)
        window = cfg.attention_window
        if window is not None and window < self.max_seq_len:
            raise ModelLoadError(
                f"config.json: sliding_window={window} is smaller than the served context of "
                f"{self.max_seq_len} tokens; hotlora attends to the whole context: serve with "
                f"max_seq_len <= {window}"
            )
        self.kv = KVCache(cfg, config.max_batch, self.max_seq_len, self.device, self.dtype)
        self.slots = LoRASlots(cfg, config.max_adapters, config.max_rank, self.device, self.dtype)
        self.deu_slots = DEUSlots(cfg, config.max_adapters, self.device)
        self.base_shapes = BaseShapes(cfg.n_layer, cfg.target_dims(), cfg.layout)
        # generation_config.json's eos_token_id (an int or a list), else config.json's: as
        # transformers' generate() stops.
        self.eos_token_ids = frozenset(i for i in tokenizer.eos_token_ids if i < cfg.vocab_size)
        self._adapters: dict[str, _Resident] = {}
        self._free_slots = list(range(config.max_adapters - 1, -1, -1))
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(torch.seed())
        self._merged: _Resident | None = None
        self._pristine: dict[tuple[int, int], torch.nn.Parameter] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
    ) -> Engine:
        """Load a Hugging Face model directory: config.json (model_type gpt2, llama, mistral,
        qwen2 or qwen3), model.safetensors (or sharded), tokenizer.json (+ tokenizer_config.json,
        generation_config.json)."""
        config = config or EngineConfig()
        if device is not None or dtype is not None:
            config = EngineConfig(
                **{
                    **config.__dict__,
                    "device": device or config.device,
                    "dtype": dtype or config.dtype,
                }
            )
        model_dir = Path(model_dir)
        model, _ = load_model(model_dir, config.torch_device(), config.torch_dtype())
        return cls(model, load_tokenizer(model_dir), config, model_dir)

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, path: str | Path) -> Adapter:
        """Validate a LoRA, DEU or LoRA+DEU directory and make it resident.

        Raises AdapterError for a refused adapter, EngineError when it cannot be made resident.
        """
        if name in self._adapters:
            raise EngineError(f"adapter {name!r} is already loaded; remove it first")
        adapter = load_adapter(
            path, name=name, base=self.base_shapes, max_rank=self.config.max_rank
        )
        self.load_adapter(name, adapter)
        return adapter

    def load_adapter(self, name: str, adapter: Adapter) -> None:
        """Copy an already validated adapter into a free device slot."""
        if name in self._adapters:
            raise EngineError(f"adapter {name!r} is already loaded; remove it first")
        if adapter.rank > self.config.max_rank:
            raise EngineError(f"adapter {name!r} has rank {adapter.rank} > {self.config.max_rank}")
        if not self._free_slots:
            raise EngineError(
                f"all {self.config.max_adapters} adapter slots are in use; remove an adapter first"
            )
        slot = self._free_slots.pop()
        if adapter.lora is not None:
            self.slots.write(slot, adapter.lora)
        if adapter.deu is not None:
            self.deu_slots.write(slot, adapter.deu)
        self._adapters[name] = _Resident(name, adapter, slot)
        log.info("adapter %s: %s, rank %d, in slot %d", name, adapter.kind, adapter.rank, slot)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def adapter_refs(self, name: str) -> int:
        """How many requests (and the merged weights) use a resident adapter."""
        return self._adapters[name].refs

    def idle_adapters(self) -> list[str]:
        """Resident adapters no request uses, least recently used first (eviction order)."""
        return [n for n, r in self._adapters.items() if r.refs == 0]

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; requests still using it finish on it, then its slot is freed."""
        res = self._adapters.pop(name, None)
        if res is None:
            raise EngineError(f"adapter {name!r} is not loaded")
        if self._merged is res:
            self.unmerge_adapter()
        res.removed = True
        if res.refs == 0:
            self._free(res)

    @property
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def adapter_kinds(self) -> dict[str, str]:
        """Resident adapter -> "lora" | "deu" | "lora+deu"."""
        return {n: r.adapter.kind for n, r in self._adapters.items()}

    def _free(self, res: _Resident) -> None:
        self.slots.clear(res.slot)
        self.deu_slots.clear(res.slot)
        self._free_slots.append(res.slot)

    # ------------------------------------------------------------------ merged weights

    @property
    def merged_adapter(self) -> str | None:
        return None if self._merged is None else self._merged.name

    def merge_adapter(self, name: str) -> None:
        """Serve `name`'s LoRA from W + s * B @ A; other rows get delta_j - delta_name.

        A DEU part cannot be merged (it is not linear) and keeps being applied per row.
        """
        res = self._adapters.get(name)
        if res is None:
            raise EngineError(f"adapter {name!r} is not loaded")
        lora = res.adapter.lora
        if lora is None:
            raise EngineError(f"adapter {name!r} has no LoRA part to merge into the weights")
        if self._merged is not None:
            self.unmerge_adapter()
        for m in lora.modules:
            t = self.slots.targets.index(m.target)
            mod = self.model.target(m.layer, t)
            merged = mod.merged_weight(self.slots.delta(m.layer, t, res.slot))
            self._pristine[(m.layer, t)] = mod.weight
            mod.weight = torch.nn.Parameter(merged, requires_grad=False)
        self._merged = res
        res.refs += 1  # the weights use it: its slot must outlive a removal

    def unmerge_adapter(self) -> None:
        """Put the pristine base weights back (the very tensors, so bit-exact)."""
        if self._merged is None:
            return
        for (layer, t), weight in self._pristine.items():
            self.model.target(layer, t).weight = weight
        self._pristine.clear()
        res, self._merged = self._merged, None
        self._release(res)

    def _release(self, res: _Resident) -> None:
        res.refs -= 1
        if res.refs == 0 and res.removed:
            self._free(res)

    # ------------------------------------------------------------------ requests

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            if self.model_config.bos_token_id is None:
                raise RequestError("prompt is empty")
            ids = [self.model_config.bos_token_id]
        if any(not 0 <= i < self.model_config.vocab_size for i in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise RequestError(
                f"prompt has {len(ids)} tokens; the context holds {self.max_seq_len}, "
                "so the prompt must be shorter"
            )
        return ids

    def add_request(
        self,
        prompt: str | Sequence[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue one request; it is admitted by a later `step`. Returns its id."""
        params = params or SamplingParams()
        ids = self.check_request(prompt, params)
        res = None
        if adapter is not None:
            res = self._adapters.get(adapter)
            if res is None:
                raise RequestError(f"adapter {adapter!r} is not loaded")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._running or any(r.id == rid for r in self._waiting):
            raise RequestError(f"request id {rid!r} is already in use")
        gen = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(2**62, (1,), generator=self._seeds))
            gen = make_generator(seed, self.device)
        if res is not None:
            res.refs += 1
            self._adapters[res.name] = self._adapters.pop(res.name)  # most recently used last
        self._waiting.append(
            _Request(rid, ids, params, res, Detokenizer(self.tokenizer, params.stop), gen)
        )
        return rid

    def abort_request(self, request_id: str) -> bool:
        """Drop a waiting or running request (a client went away). True if it existed."""
        req = self._running.pop(request_id, None)
        if req is None:
            found = [r for r in self._waiting if r.id == request_id]
            if not found:
                return False
            req = found[0]
            self._waiting.remove(req)
        self._retire(req)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def check_request(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """Encode and check a request without queueing it (safe from any thread)."""
        ids = self.encode(prompt)
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context of {self.max_seq_len} tokens; lower max_tokens"
            )
        return ids

    def adapter_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Rows per adapter among running and among waiting requests."""
        running: dict[str, int] = {}
        waiting: dict[str, int] = {}
        for reqs, out in ((self._running.values(), running), (self._waiting, waiting)):
            for r in reqs:
                if r.adapter is not None:
                    name = r.adapter.name
                    out[name] = out.get(name, 0) + 1
        return running, waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _retire(self, req: _Request) -> None:
        if req.row >= 0:
            self.kv.release(req.row)
            self._fill_hole(req.row)
            req.row = -1
        if req.adapter is not None:
            self._release(req.adapter)
            req.adapter = None

    def _fill_hole(self, hole: int) -> None:
        """Move the highest running row into a freed lower one, keeping rows 0..n-1 in use.

        Contiguous rows let attention read a view of the cache instead of gathering every
        row at every layer of every step; the price is one copy per finished request.
        """
        top = max(self._running.values(), key=lambda r: r.row, default=None)
        if top is None or top.row < hole:
            return
        self.kv.move(top.row, hole, len(top.prompt_ids) + len(top.out_ids))
        top.row = hole

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests (one prefill) if rows are free, else decode all running rows."""
        if self._waiting and self.kv.free_rows:
            batch = [
                self._waiting.popleft() for _ in range(min(self.kv.free_rows, len(self._waiting)))
            ]
            for req in batch:
                req.row = self.kv.allocate()
                self._running[req.id] = req
            return self._forward(batch, [r.prompt_ids for r in batch], [0] * len(batch))
        batch = sorted(self._running.values(), key=lambda r: r.row)
        if not batch:
            return []
        starts = [len(r.prompt_ids) + len(r.out_ids) - 1 for r in batch]
        return self._forward(batch, [[r.out_ids[-1]] for r in batch], starts)

    def _forward(
        self, batch: list[_Request], tokens: list[list[int]], starts: list[int]
    ) -> list[StepOutput]:
        merged = None if self._merged is None else self._merged.slot
        step = build_step(
            self.kv,
            [r.row for r in batch],
            tokens,
            starts,
            [r.lora_slot for r in batch],
            [r.deu_slot for r in batch],
            merged,
            self.device,
            self.slots.row_widths,
        )
        hidden = self.model(
            step.input_ids, step.positions, step.attn, self._hook(step)
        )  # (B, L, d)
        last = hidden[torch.arange(len(batch), device=self.device), step.last]  # (B, d)
        logits = self.model.logits(last)  # (B, V)
        next_ids = sample(logits, [r.params for r in batch], [r.generator for r in batch])
        return [self._advance(req, tok) for req, tok in zip(batch, next_ids, strict=True)]

    def _hook(self, step: StepBatch) -> BatchAdapters | None:
        if not step.has_adapters:
            return None
        return BatchAdapters(self.slots, self.deu_slots, step.lora, step.lora_minus, step.deu)

    def _advance(self, req: _Request, token: int) -> StepOutput:
        p = req.params
        reason = None
        new_ids: list[int] = []
        if token in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        else:
            req.out_ids.append(token)
            new_ids = [token]
            if (
                len(req.out_ids) >= p.max_tokens
                or len(req.prompt_ids) + len(req.out_ids) >= self.max_seq_len
            ):
                reason = "length"
        text = req.detok.update(req.out_ids, final=reason is not None)
        if req.detok.stopped:
            reason = "stop"
        if reason is not None:
            req.finish_reason = reason
            self._running.pop(req.id, None)
            self._retire(req)
        return StepOutput(req.id, new_ids, text, reason)

    # ------------------------------------------------------------------ offline API

    @torch.inference_mode()
    def prompt_logits(
        self, prompts: Sequence[str | Sequence[int]], adapters: Sequence[str | None] | None = None
    ) -> list[torch.Tensor]:
        """Next-token logits (n_i, V) at every prompt position, all prompts in one batch."""
        names = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(names) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts and {len(names)} adapters")
        if len(prompts) > self.kv.free_rows:
            raise RequestError(f"{len(prompts)} prompts but only {self.kv.free_rows} free rows")
        unknown = [n for n in names if n is not None and n not in self._adapters]
        if unknown:
            raise RequestError(f"adapter {unknown[0]!r} is not loaded")
        ids = [self.encode(p) for p in prompts]
        res = [None if n is None else self._adapters[n] for n in names]
        lora = [-1 if r is None else r.lora_slot for r in res]
        deu = [-1 if r is None else r.deu_slot for r in res]
        rows = [self.kv.allocate() for _ in prompts]
        try:
            merged = None if self._merged is None else self._merged.slot
            step = build_step(
                self.kv, rows, ids, [0] * len(ids), lora, deu, merged, self.device,
                self.slots.row_widths,
            )
            hidden = self.model(step.input_ids, step.positions, step.attn, self._hook(step))
            return [self.model.logits(hidden[b, : len(t)]).float() for b, t in enumerate(ids)]
        finally:
            for row in rows:
                self.kv.release(row)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        adapters: Sequence[str | None] | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Generate for every prompt in mixed batches; row i uses adapters[i] (None = base)."""
        n = len(prompts)
        names = list(adapters) if adapters is not None else [None] * n
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * n
        if len(names) != n or len(plist) != n:
            raise RequestError(
                f"got {n} prompts, {len(names)} adapters, {len(plist)} params; lengths must match"
            )
        for name in names:  # refuse before queueing anything
            if name is not None and name not in self._adapters:
                raise RequestError(f"adapter {name!r} is not loaded")
        for prompt, p in zip(prompts, plist, strict=True):
            self.check_request(prompt, p)
        ids = [self.add_request(pr, a, p) for pr, a, p in zip(prompts, names, plist, strict=True)]
        wanted = set(ids)
        reqs = {r.id: r for r in self._waiting if r.id in wanted}
        while any(reqs[i].finish_reason is None for i in ids):
            self.step()
        return [
            GenerationOutput(
                text=reqs[i].detok.text,
                token_ids=list(reqs[i].out_ids),
                finish_reason=reqs[i].finish_reason or "length",
                prompt_token_ids=reqs[i].prompt_ids,
                adapter=a,
            )
            for i, a in zip(ids, names, strict=True)
        ]
