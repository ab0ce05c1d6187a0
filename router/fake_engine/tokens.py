"""Deterministic stand-ins for a tokenizer, a sampler and a pooler.

Everything here is a pure, cheap function of its input, so the same request always
gets the same text, vectors and scores (only ids and timestamps differ).

* Tokens are UTF-8 bytes: ``tokenize`` gives byte values, ``detokenize`` inverts it,
  and a prompt of ``n`` bytes counts as ``n`` prompt tokens.
* Generated text is a sequence of words picked from a fixed list, seeded by a CRC-32
  of the prompt's last text; token ``i`` is word ``i`` (with a leading space after
  the first), so streamed deltas always join to the non-streamed text.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Sequence

WORDS: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "river", "stone", "cloud", "ember", "maple", "harbor",
)

VOCAB_SIZE = 256


def seed_of(text: str | bytes) -> int:
    data = text.encode() if isinstance(text, str) else text
    return zlib.crc32(data)


def token_text(seed: int, index: int) -> str:
    word = WORDS[(seed + index * 7) % len(WORDS)]
    return word if index == 0 else " " + word


def generate(seed: int, count: int) -> list[str]:
    """The ``count`` generated token strings for a prompt seeded with ``seed``."""
    return [token_text(seed, i) for i in range(count)]


def count(text: str) -> int:
    return len(text.encode())


def tokenize(text: str) -> list[int]:
    return list(text.encode())


def detokenize(ids: Iterable[int]) -> str:
    """Raise ValueError for ids outside the byte vocabulary."""
    return bytes(ids).decode("utf-8", errors="replace")


def vector(text: str, dim: int) -> list[float]:
    """A unit-length vector of ``dim`` floats derived from ``text``."""
    state = seed_of(text) or 1
    values: list[float] = []
    for _ in range(dim):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        values.append(state / 0x7FFFFFFF * 2.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round through float32 so JSON floats equal the base64/bytes encodings.
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in values]


def pack_f32(values: Sequence[float]) -> bytes:
    """Little-endian float32, as vLLM's base64 and bytes encodings use."""
    return struct.pack(f"<{len(values)}f", *values)


def score(a: str, b: str) -> float:
    """A relevance score in [0, 1) for the pair, stable across runs."""
    return (seed_of(a + "\x00" + b) % 10_000) / 10_000
