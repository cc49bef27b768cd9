"""Seeded, hash-based train/test splits that can never overlap, and deterministic sampling.

Everything is decided by a hash of (seed, content key), never by row order or Python's `hash`, so the
same data gives the same split on every machine and in every process:

- `split_of`: an open-ended source (the Countdown generator) puts a key in `test` iff its hash bucket
  is below `test_fraction`;
- `partition`: a finite source (a file, a hub data set) puts exactly `n_test` keys in `test`, the ones
  with the smallest hashes (the same rule with the threshold chosen to give the requested count).

A key lives in exactly one split, so examples that share a key can never leak from train into test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from rrr.config import UserError

T = TypeVar("T")
SPLITS = ("train", "test")


def canonical(key: Any) -> str:
    """A stable text form of a key: JSON with sorted dict keys (tuples become lists)."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _text_hash(seed: int | str, text: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def key_hash(seed: int | str, key: Any) -> int:
    """64-bit hash of (seed, key); identical across processes and machines."""
    return _text_hash(seed, canonical(key))


def bucket(seed: int | str, key: Any) -> float:
    """Uniform in [0, 1)."""
    return key_hash(seed, key) / 2**64


def content_id(prefix: str, key: Any) -> str:
    """A stable example id from its content key, e.g. `cd-3f2a…`."""
    return f"{prefix}-{hashlib.sha1(canonical(key).encode()).hexdigest()[:16]}"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use data.split=train or data.split=test")


def split_of(key: Any, split_seed: int, test_fraction: float) -> str:
    return "test" if bucket(f"split:{split_seed}", key) < test_fraction else "train"


def dedupe(items: Iterable[T], key: Callable[[T], Hashable]) -> list[T]:
    """Keep the first item of each key."""
    seen: set[Hashable] = set()
    out = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out


def partition(keys: Iterable[Any], split_seed: int, n_test: int) -> set[str]:
    """The canonical forms of the `n_test` distinct keys with the smallest split hash: the test split.
    This is `split_of`'s rule with the bucket threshold chosen to give exactly `n_test` keys."""
    return _lowest({canonical(k) for k in keys}, split_seed, n_test)


def _lowest(texts: set[str], split_seed: int, n: int) -> set[str]:
    ranked = sorted(texts, key=lambda c: (_text_hash(f"split:{split_seed}", c), c))
    return set(ranked[:n])


def n_test_for(n_keys: int, test_fraction: float, test_size: int | None) -> int:
    """round(test_fraction * n), capped at test_size: 60,000 xLAM rows -> 12,000; a 20-row file -> 4."""
    n = round(test_fraction * n_keys)
    return min(n, test_size) if test_size is not None else n


def select_split(items: Sequence[T], key: Callable[[T], Any], split: str, split_seed: int,
                 test_fraction: float, test_size: int | None) -> list[T]:
    """The items of one split of a finite source, partitioned by key; keeps the input order."""
    check_split(split)
    keys = [canonical(key(x)) for x in items]
    distinct = set(keys)
    test_keys = _lowest(distinct, split_seed, n_test_for(len(distinct), test_fraction, test_size))
    want_test = split == "test"
    return [x for x, k in zip(items, keys) if (k in test_keys) == want_test]


def sample(items: Sequence[T], key: Callable[[T], Any], limit: int | None, seed: int | str) -> list[T]:
    """The first `limit` items after a seeded shuffle (order by hash of (seed, key)), so a small limit
    is a mixed sample of the whole split and does not depend on the input order."""
    decorated = [(_text_hash(f"order:{seed}", c), c, i) for i, c in enumerate(canonical(key(x)) for x in items)]
    ordered = [items[i] for _, _, i in sorted(decorated)]
    return ordered if limit is None else ordered[:limit]
