"""Top entries of a py-spy profile in collapsed ("raw") format: inclusive share per function.

    py-spy record -p PID -r 20 -d 120 -f raw -o prof.txt
    python -m bench.profile_top prof.txt [--top 25] [--match rrr/,trl/,transformers/,torch/]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default="", help="comma-separated substrings a frame's file must contain")
    a = p.parse_args()
    inclusive, total = Counter(), 0
    for line in open(a.path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name = re.sub(r":\d+\)$", ")", frame)          # drop line numbers: one row per function
            if a.match and not any(m in name for m in a.match.split(",")):
                continue
            if name not in seen:
                seen.add(name)
                inclusive[name] += n
    print(f"{total} samples")
    for name, n in inclusive.most_common(a.top):
        print(f"{100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
