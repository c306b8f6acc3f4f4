"""Incremental detokenization and stop strings, safe for streaming.

Decoding one token at a time breaks multi-byte characters and the spaces a
BPE merges in; so we decode a short window before the new tokens and emit
only text that is complete (no trailing U+FFFD replacement character).
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids)
        self.prefix_offset = max(len(self.token_ids) - _CONTEXT_TOKENS, 0)
        self.read_offset = len(self.token_ids)
        self.stop = stop
        self.text = ""
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly ''), cut at a stop string."""
        if self.stop_reason is not None:
            raise ValueError("the sequence already stopped at a stop string; no more tokens can be added")
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return self._add_text(delta)

    def _add_text(self, delta: str) -> str:
        before = len(self.text)
        self.text += delta
        if not self.stop:
            return delta
        window = max(before - max(len(s) for s in self.stop) + 1, 0)
        hits = [(self.text.find(s, window), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i != -1]
        if not hits:
            return delta
        cut, self.stop_reason = min(hits)
        self.text = self.text[:cut]
        return self.text[before:]
