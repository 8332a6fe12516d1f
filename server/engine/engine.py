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

from hotlora.adapters.adapter import Adapter, load_adapter
from hotlora.server.engine.batch import StepBatch, build_step, lora_rows
from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.cuda_graphs import Capture, DecodeGraphs, cuda_capture
from hotlora.server.engine.errors import EngineError, RequestError
from hotlora.server.engine.hook import BatchAdapters
from hotlora.server.engine.inputs import InputProcessor
from hotlora.server.engine.kv_cache import KVCache
from hotlora.server.engine.loader import load_model
from hotlora.server.engine.logprobs import prompt_logprobs, token_logprobs
from hotlora.server.engine.models import CausalLM
from hotlora.server.engine.outputs import GenerationOutput, StepOutput, TokenLogprob
from hotlora.server.engine.residents import Resident, Residents
from hotlora.server.engine.sampling import RowHistory, SamplingParams, make_generator, sample
from hotlora.server.engine.tokenizer import Detokenizer, TextTokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: Resident | None
    detok: Detokenizer
    generator: torch.Generator | None
    stop_ids: frozenset[int]  # sampled, these end the request (EOS unless ignored, stop ids)
    out_ids: list[int] = field(default_factory=list)
    row: int = -1
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def history(self) -> RowHistory | None:
        """What the sampler reads when this row's logits are adjusted (penalties and the like)."""
        if not self.params.adjusts_logits:
            return None
        return RowHistory(self.prompt_ids, self.out_ids, self.stop_ids)

    @property
    def lora_slot(self) -> int:
        return -1 if self.adapter is None else self.adapter.lora_slot

    @property
    def deu_slot(self) -> int:
        return -1 if self.adapter is None else self.adapter.deu_slot


class Engine:
    """A frozen base model serving many LoRA and DEU adapters in mixed batches."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: TextTokenizer,
        config: EngineConfig,
        model_dir: Path,
        *,
        graph_capture: Capture | None = None,
    ) -> None:
        """`graph_capture` replaces CUDA graph capture (tests run the graph path on the CPU
        with one that replays by calling); by default a CUDA engine with config.cuda_graphs
        captures its decode steps."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        cfg = self.model_config = model.cfg
        self.model_dir = model_dir
        weight = next(iter(model.parameters()))
        self.device, self.dtype = weight.device, weight.dtype
        self.inputs = InputProcessor(cfg, tokenizer, config)
        self.max_seq_len = self.inputs.max_seq_len
        self.base_shapes = self.inputs.base_shapes
        self.eos_token_ids = self.inputs.eos_token_ids
        if graph_capture is None and config.cuda_graphs and self.device.type == "cuda":
            graph_capture = cuda_capture(self.device)
        self.kv = KVCache(
            cfg,
            config.max_batch,
            self.max_seq_len,
            self.device,
            self.dtype,
            scratch=graph_capture is not None,
        )
        self.residents = Residents(model, config, self.device, self.dtype)
        self.graphs = (
            None
            if graph_capture is None
            else DecodeGraphs(
                model, self.kv, self.residents, config.max_batch, self.device, graph_capture
            )
        )
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(torch.seed())

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        graph_capture: Capture | None = None,
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
        return cls(model, load_tokenizer(model_dir), config, model_dir, graph_capture=graph_capture)

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, path: str | Path) -> Adapter:
        """Validate a LoRA, DEU or LoRA+DEU directory and make it resident.

        Raises AdapterError for a refused adapter, EngineError when it cannot be made resident.
        """
        if name in self.residents:
            raise EngineError(f"adapter {name!r} is already loaded; remove it first")
        adapter = load_adapter(
            path, name=name, base=self.base_shapes, max_rank=self.config.max_rank
        )
        self.residents.load(name, adapter)
        return adapter

    def load_adapter(self, name: str, adapter: Adapter) -> None:
        """Copy an already validated adapter into a free device slot."""
        self.residents.load(name, adapter)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; requests still using it finish on it, then its slot is freed."""
        self.residents.remove(name)

    @property
    def adapters(self) -> list[str]:
        return self.residents.names

    @property
    def free_slots(self) -> int:
        return self.residents.free_slots

    def adapter_refs(self, name: str) -> int:
        """How many requests (and the merged weights) use a resident adapter."""
        return self.residents.get(name).refs

    def idle_adapters(self) -> list[str]:
        """Resident adapters no request uses, least recently used first (eviction order)."""
        return self.residents.idle()

    def adapter_kinds(self) -> dict[str, str]:
        """Resident adapter -> "lora" | "deu" | "lora+deu"."""
        return self.residents.kinds()

    @property
    def merged_adapter(self) -> str | None:
        merged = self.residents.merged
        return None if merged is None else merged.name

    def merge_adapter(self, name: str) -> None:
        """Serve `name`'s LoRA from merged weights (see Residents.merge)."""
        self.residents.merge(name)

    def unmerge_adapter(self) -> None:
        """Put the pristine base weights back (bit-exact)."""
        self.residents.unmerge()

    # ------------------------------------------------------------------ requests

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.inputs.encode(prompt)

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
            if adapter not in self.residents:
                raise RequestError(f"adapter {adapter!r} is not loaded")
            res = self.residents.get(adapter)
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
            self.residents.acquire(res)
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        detok = Detokenizer(self.tokenizer, params.stop)
        self._waiting.append(
            _Request(rid, ids, params, res, detok, gen, eos | set(params.stop_token_ids))
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
        return self.inputs.check_request(prompt, params)

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
            self.residents.release(req.adapter)
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
            return self._forward(
                batch, [r.prompt_ids for r in batch], [0] * len(batch), prefill=True
            )
        batch = sorted(self._running.values(), key=lambda r: r.row)
        if not batch:
            return []
        starts = [len(r.prompt_ids) + len(r.out_ids) - 1 for r in batch]
        return self._forward(batch, [[r.out_ids[-1]] for r in batch], starts, prefill=False)

    def _forward(
        self, batch: list[_Request], tokens: list[list[int]], starts: list[int], prefill: bool
    ) -> list[StepOutput]:
        rows = [r.row for r in batch]
        lora, deu = [r.lora_slot for r in batch], [r.deu_slot for r in batch]
        logits = None if prefill else self._decode_graphed(rows, tokens, starts, lora, deu)
        if logits is None:
            step, hidden = self._run(rows, tokens, starts, lora, deu)
            last = hidden[torch.arange(len(batch), device=self.device), step.last]  # (B, d)
            logits = self.model.logits(last)  # (B, V)
            for b, req in enumerate(batch if prefill else ()):
                k = req.params.prompt_logprobs
                if k is not None:
                    n = len(req.prompt_ids)
                    req.prompt_logprobs = prompt_logprobs(
                        self.model.logits, hidden[b, :n], req.prompt_ids, k
                    )
        params = [r.params for r in batch]
        next_ids = sample(
            logits, params, [r.generator for r in batch], [r.history() for r in batch]
        )
        wants = [b for b, p in enumerate(params) if p.logprobs is not None]
        if wants:
            k = max(params[b].logprobs or 0 for b in wants)
            chosen = torch.tensor([next_ids[b] for b in wants], device=self.device)
            for b, lp in zip(wants, token_logprobs(logits[wants], chosen, k), strict=True):
                cut = params[b].logprobs or 0
                batch[b].logprobs.append(TokenLogprob(lp.token_id, lp.logprob, lp.top[:cut]))
        return [
            self._advance(req, tok, first=prefill) for req, tok in zip(batch, next_ids, strict=True)
        ]

    def _run(
        self,
        rows: list[int],
        tokens: list[list[int]],
        starts: list[int],
        lora_slots: list[int],
        deu_slots: list[int],
    ) -> tuple[StepBatch, torch.Tensor]:
        """One forward pass (build_step's rows, tokens, starts and slots): the step's
        metadata and the last hidden states (B, L, d)."""
        step = build_step(
            self.kv,
            rows,
            tokens,
            starts,
            lora_slots,
            deu_slots,
            self.residents.merged_slot,
            self.device,
            self.dtype,
            self.residents.lora.row_widths,
        )
        return step, self.model(step.input_ids, step.positions, step.attn, self._hook(step))

    def _decode_graphed(
        self,
        rows: list[int],
        tokens: list[list[int]],
        starts: list[int],
        lora_slots: list[int],
        deu_slots: list[int],
    ) -> torch.Tensor | None:
        """A decode step's logits (B, V) from a captured graph, or None (run it eagerly)."""
        if self.graphs is None:
            return None
        plus, minus = lora_rows(lora_slots, self.residents.merged_slot)
        return self.graphs.decode(rows, [t[0] for t in tokens], starts, plus, minus, deu_slots)

    def _hook(self, step: StepBatch) -> BatchAdapters | None:
        if not step.has_adapters:
            return None
        r = self.residents
        return BatchAdapters(r.lora, r.deu, step.lora, step.lora_minus, step.deu)

    def _advance(self, req: _Request, token: int, first: bool) -> StepOutput:
        """Append the sampled token (or end the request); the step's output for it."""
        p = req.params
        reason = None
        new_ids: list[int] = []
        if p.max_tokens == 0:  # a scoring request: the prefill was all it wanted
            reason = "length"
            if req.logprobs:
                req.logprobs.pop()
        elif token in req.stop_ids:
            reason = "stop"  # the stop token is not output, but its logprob is reported
        else:
            req.out_ids.append(token)
            new_ids = [token]
            if (
                len(req.out_ids) >= p.max_tokens
                or len(req.prompt_ids) + len(req.out_ids) >= self.max_seq_len
            ):
                reason = "length"
        text = ""
        if self.config.detokenize:
            text = req.detok.update(
                req.out_ids, final=reason is not None, check_stop=len(req.out_ids) > p.min_tokens
            )
            if req.detok.stopped:
                reason = "stop"
        if reason is not None:
            req.finish_reason = reason
            self._running.pop(req.id, None)
            self._retire(req)
        return StepOutput(
            req.id,
            new_ids,
            text,
            reason,
            tuple(req.logprobs[-1:]) if p.logprobs is not None and p.max_tokens else (),
            None if not first or req.prompt_logprobs is None else tuple(req.prompt_logprobs),
        )

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
        unknown = [n for n in names if n is not None and n not in self.residents]
        if unknown:
            raise RequestError(f"adapter {unknown[0]!r} is not loaded")
        ids = [self.encode(p) for p in prompts]
        res = [None if n is None else self.residents.get(n) for n in names]
        lora = [-1 if r is None else r.lora_slot for r in res]
        deu = [-1 if r is None else r.deu_slot for r in res]
        rows = [self.kv.allocate() for _ in prompts]
        try:
            _, hidden = self._run(rows, ids, [0] * len(ids), lora, deu)
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
            if name is not None and name not in self.residents:
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
                logprobs=None if reqs[i].params.logprobs is None else reqs[i].logprobs,
                prompt_logprobs=reqs[i].prompt_logprobs,
            )
            for i, a in zip(ids, names, strict=True)
        ]
