"""Crash-safe progress of collect-failures and evaluate: the work list is done in chunks, each chunk's
rows written atomically as `parts/part_NNNNN.parquet`; a resumed run reads the parts, skips the ids
they hold and redoes only the rest."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from rrr.atomic import atomic_write_parquet
from rrr.config import UserError

if TYPE_CHECKING:
    import pandas as pd


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def part_paths(parts: Path) -> list[Path]:
    return sorted(parts.glob("part_*.parquet"))


def read_parts(parts: Path, key: str = "id") -> "pd.DataFrame":
    import pandas as pd

    frames = [_read_part(p, key) for p in part_paths(parts)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    # A query is in exactly one part; drop_duplicates only guards against a hand-copied part.
    return pd.concat(frames, ignore_index=True).drop_duplicates(key, keep="first").reset_index(drop=True)


def _read_part(path: Path, key: str):
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        raise UserError(f"part file {path} is unreadable ({type(e).__name__}); delete it and re-run with the same "
                        f"run_dir= (its queries are redone)") from None
    if len(df) and key not in df.columns:
        raise UserError(f"part file {path} has no {key!r} column: not written by this command; delete it and re-run")
    return df


def done_ids(parts: Path, key: str = "id") -> set[str]:
    df = read_parts(parts, key)
    return set() if df.empty else set(df[key].astype(str))


def write_part(parts: Path, rows: list[dict[str, Any]]) -> Path:
    import pandas as pd

    path = parts / f"part_{len(part_paths(parts)):05d}.parquet"
    atomic_write_parquet(path, pd.DataFrame(rows))
    return path
