"""Key/value caches for the fast engine: one row per live sequence, plus a store of finished ones.

`SlotKV` keeps the live rows packed at 0..n-1 (a finished row is replaced by the last live one), so
every decode step attends over a plain view of the cache: no gather, no concatenation, no copy of the
past. `PrefixStore` keeps the K/V of finished sequences so that a later prompt extending one of them
(the next turn of an episode, a retried request) prefills only its new tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

_MOD = (1 << 61) - 1
_BASE = 1_000_003


class SlotKV:
    """K/V of up to `slots` sequences, each up to `capacity` tokens: tensors [layers, slots, kv_heads, capacity, head_dim]."""

    def __init__(self, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype):
        # Uninitialized, then zeroed lazily up to the furthest position read or written (`clean_to`):
        # a generous capacity costs no memory until used, and regrowing is rare. Read positions must
        # be finite even where masked, since attention multiplies them by a zero weight (0 * NaN = NaN).
        self.k = torch.empty(layers, slots, kv_heads, capacity, head_dim, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.slots = slots
        self.capacity = capacity
        self.clean = 0  # positions [0, clean) of every row hold finite values

    def clean_to(self, length: int) -> None:
        """Make positions [0, length) of every row finite (zero those never written).

        Called before positions are read by attention or written: writes beyond `clean` would be
        zeroed by the next call."""
        if length > self.clean:
            self.k[:, :, :, self.clean : length].zero_()
            self.v[:, :, :, self.clean : length].zero_()
            self.clean = length

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src`'s first `length` positions onto row `dst` (all layers)."""
        self.clean_to(length)  # clean before writing, or a later clean_to would zero what was written
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def copy_rows(self, other: "SlotKV", rows: int, length: int) -> None:
        """Take rows 0..rows-1, positions [0, length), from `other` (a smaller cache being regrown)."""
        self.clean_to(length)
        self.k[:, :rows, :, :length] = other.k[:, :rows, :, :length]
        self.v[:, :rows, :, :length] = other.v[:, :rows, :, :length]

    def export(self, row: int, length: int) -> torch.Tensor:
        """A compact copy [2, layers, kv_heads, length, head_dim] of one row."""
        return torch.stack([self.k[:, row, :, :length], self.v[:, row, :, :length]])  # stack copies

    def load(self, row: int, kv: torch.Tensor) -> None:
        """Write an exported prefix into the start of `row`."""
        n = kv.shape[3]
        self.clean_to(n)
        self.k[:, row, :, :n] = kv[0]
        self.v[:, row, :, :n] = kv[1]


def prefix_hashes(tokens: list[int]) -> list[int]:
    """hashes[i] identifies tokens[:i + 1] (polynomial hash; hits are confirmed token by token)."""
    h, out = 0, []
    for t in tokens:
        h = (h * _BASE + t + 1) % _MOD
        out.append(h)
    return out


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    kv: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixStore:
    """K/V of finished sequences keyed by their tokens; least recently used entries go first past `max_bytes`.

    The K/V belong to the weights that computed them: the engine clears the store on every update.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._lengths: dict[int, int] = {}  # entry length -> how many entries have it
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], kv: torch.Tensor) -> None:
        entry = _Entry(tuple(tokens), kv)
        if not tokens or entry.nbytes > self.max_bytes:
            return
        key = (len(tokens), prefix_hashes(tokens)[-1])
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self._lengths[len(tokens)] = self._lengths.get(len(tokens), 0) + 1
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def longest_prefix(self, tokens: list[int], limit: int) -> tuple[int, torch.Tensor | None]:
        """The longest stored sequence that is a prefix of `tokens` and at most `limit` long: (length, kv)."""
        if not self._entries:
            return 0, None
        hashes = prefix_hashes(tokens[:limit])
        for n in sorted((n for n in self._lengths if n <= len(hashes)), reverse=True):
            key = (n, hashes[n - 1])
            entry = self._entries.get(key)
            if entry is not None and entry.tokens == tuple(tokens[:n]):
                self._entries.move_to_end(key)
                self.hits += 1
                self.reused_tokens += n
                return n, entry.kv
        return 0, None

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.nbytes = 0

    def _drop(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        n = len(entry.tokens)
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]
