"""The `tokenizers` tokenizer and incremental, stop-string-aware detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from server.engine.errors import ModelLoadError


def load_tokenizer(model_dir: Path) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: tokenizer.json not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ModelLoadError(f"{path}: not a valid tokenizer.json ({e})") from e


class Detokenizer:
    """Turns a growing list of token ids into text, applying stop strings.

    `update` returns the newly final text: text that can no longer change, i.e. not ending in an
    incomplete UTF-8 sequence and not a possible beginning of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.text = ""  # all text so far, cut at a stop string once one is seen
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False

    def update(self, token_ids: list[int], final: bool = False) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hold = 0
        if text.endswith("\ufffd") and not final:
            hold = 1  # a multi-byte character is still incomplete
        for s in self.stop:
            at = text.find(s)
            if at != -1 and (not self.stopped or at < len(self.text)):
                text, self.stopped, hold = text[:at], True, 0
        if not self.stopped and not final:
            body = text[: len(text) - hold]
            for s in self.stop:  # keep back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, len(body)), 0, -1):
                    if body.endswith(s[:k]):
                        hold = max(hold, len(text) - len(body) + k)
                        break
        self.text = text
        end = max(self.emitted, len(text) - hold)
        delta = text[self.emitted : end]
        self.emitted = end
        return delta
