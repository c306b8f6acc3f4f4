"""Calibration and evaluation text: Python's own documentation, shipped with every interpreter.

``pydoc_data.topics`` holds the pages ``help()`` shows for ~80 language topics (465k characters,
~113k SmolLM2 tokens). The split is by topic: every ``EVAL_EVERY``-th topic in name order is held
out for evaluation (~30k tokens) and never seen by calibration (~83k tokens). Models without a
tokenizer (``random:`` presets) get seeded random token ids instead.
"""

from __future__ import annotations

from typing import Any

import torch

EVAL_EVERY = 4
SPLITS = ("calibration", "evaluation")


def doc_topics(split: str) -> list[str]:
    """The texts of one split, in topic-name order."""
    from pydoc_data.topics import topics

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = sorted(topics)
    held_out = set(names[::EVAL_EVERY])
    return [topics[name] for name in names if (name in held_out) == (split == "evaluation")]


def token_stream(tokenizer: Any, split: str) -> list[int]:
    """Every topic of ``split`` tokenized (no special tokens) and concatenated."""
    ids = tokenizer(doc_topics(split), add_special_tokens=False, verbose=False)["input_ids"]
    return [t for topic in ids for t in topic]


def calibration_ids(tokenizer: Any | None, vocab_size: int, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[num_samples, seq_len]`` windows of the calibration split at seeded random offsets."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"calibration needs num_samples >= 1 and seq_len >= 2, got {num_samples}, {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    if tokenizer is None:
        return torch.randint(0, vocab_size, (num_samples, seq_len), generator=gen)
    stream = torch.tensor(token_stream(tokenizer, "calibration"))
    if len(stream) < seq_len:
        raise ValueError(f"calib seq_len {seq_len} is longer than the calibration text ({len(stream)} tokens)")
    starts = torch.randint(0, len(stream) - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def evaluation_ids(tokenizer: Any | None, vocab_size: int, max_tokens: int | None = None, seed: int = 1) -> torch.Tensor:
    """The held-out split as one token stream (its first ``max_tokens``); random ids without a tokenizer."""
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (max_tokens or 4096,), generator=gen)
    return torch.tensor(token_stream(tokenizer, "evaluation")[:max_tokens])
