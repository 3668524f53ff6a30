"""Sampling for `Engine.generate`: prime encoding through a model's vocabulary and temperature/top-k sampling.

Pure functions (numpy only), so they are tested without a server. The engine feeds each sampled token back as
one step through the batcher, so concurrent generations batch together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import InvalidArgument


def encode_text(text: str, vocabulary: Sequence[str]) -> list[int]:
    """Token ids of `text`: longest vocabulary entry first at each position.

    Raises InvalidArgument naming every character that no vocabulary entry covers.
    """
    index = {tok: i for i, tok in enumerate(vocabulary) if tok}
    longest = max((len(t) for t in index), default=1)
    ids: list[int] = []
    unknown: list[str] = []
    pos = 0
    while pos < len(text):
        for width in range(min(longest, len(text) - pos), 0, -1):
            tid = index.get(text[pos : pos + width])
            if tid is not None:
                ids.append(tid)
                pos += width
                break
        else:
            if text[pos] not in unknown:
                unknown.append(text[pos])
            pos += 1
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:20])
        raise InvalidArgument(
            f"prime text has characters outside the model's vocabulary: {shown}; "
            f"expected only characters from the {len(vocabulary)}-token vocabulary"
        )
    return ids


def check_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Raise InvalidArgument unless every id is in [0, vocab_size)."""
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise InvalidArgument(f"token ids {bad[:10]} are out of range; expected 0 <= id < {vocab_size}")


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """One token id from a `(V,)` logit vector.

    temperature 0 means greedy (argmax); top_k 0 means the whole vocabulary.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[0]:
        cut = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cut, scaled, -np.inf)
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))
