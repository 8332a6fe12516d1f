"""What a request is checked against before it reaches the engine: the tokenizer, the served
context and the vocabulary. Needs the model's config, not its weights, so the API process
of a server checks requests without loading the model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hotlora.adapters.format import BaseShapes
from hotlora.server.engine.config import DEFAULT_MAX_SEQ_LEN, EngineConfig
from hotlora.server.engine.errors import ModelLoadError, RequestError
from hotlora.server.engine.loader import read_config
from hotlora.server.engine.models import ModelSpec
from hotlora.server.engine.sampling import SamplingParams
from hotlora.server.engine.tokenizer import TextTokenizer, load_tokenizer


class InputProcessor:
    """Encodes prompts and refuses requests the engine could not serve (RequestError)."""

    def __init__(self, cfg: ModelSpec, tokenizer: TextTokenizer, config: EngineConfig) -> None:
        self.model_config, self.tokenizer = cfg, tokenizer
        context = min(cfg.max_positions, DEFAULT_MAX_SEQ_LEN)
        self.max_seq_len = min(config.max_seq_len or context, cfg.max_positions)
        window = cfg.attention_window
        if window is not None and window < self.max_seq_len:
            raise ModelLoadError(
                f"config.json: sliding_window={window} is smaller than the served context of "
                f"{self.max_seq_len} tokens; hotlora attends to the whole context: serve with "
                f"max_seq_len <= {window}"
            )
        self.base_shapes = BaseShapes(cfg.n_layer, cfg.target_dims(), cfg.layout)
        self.vocab_size = cfg.vocab_size
        # generation_config.json's eos_token_id (an int or a list), else config.json's: as
        # transformers' generate() stops.
        self.eos_token_ids = frozenset(i for i in tokenizer.eos_token_ids if i < cfg.vocab_size)

    @classmethod
    def from_model_dir(cls, model_dir: Path, config: EngineConfig) -> InputProcessor:
        """config.json and the tokenizer files only: no weights are read."""
        _, cfg = read_config(model_dir)
        return cls(cfg, load_tokenizer(model_dir), config)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            if self.model_config.bos_token_id is None:
                raise RequestError("prompt is empty")
            ids = [self.model_config.bos_token_id]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise RequestError(
                f"prompt has {len(ids)} tokens; the context holds {self.max_seq_len}, "
                "so the prompt must be shorter"
            )
        return ids

    def check_request(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """Encode and check a request without queueing it (safe from any thread)."""
        ids = self.encode(prompt)
        for name, named in (
            ("stop_token_ids", list(params.stop_token_ids)),
            ("logit_bias", [t for t, _ in params.logit_bias]),
        ):
            bad = [t for t in named if t >= self.vocab_size]
            if bad:
                raise RequestError(
                    f"{name}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                    name,
                )
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context of {self.max_seq_len} tokens; lower max_tokens",
                "max_tokens",
            )
        return ids
