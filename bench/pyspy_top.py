"""Summarise a py-spy `--format raw` profile (collapsed stacks): top functions by self
and by inclusive share of samples, with line numbers folded away.

    py-spy record --pid PID --rate 500 --duration 10 --nonblocking --format raw -o prof.txt
    python -m bench.pyspy_top prof.txt [--top 30] [--filter proxy/]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def fold(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        i = path.find(marker)
        if i >= 0:
            path = path[i + len(marker):]
            break
    return f"{m.group('fn')} ({path})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--filter", default="", help="only show functions whose file contains this")
    args = ap.parse_args(argv)
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in open(args.profile, encoding="utf-8", errors="replace"):
        m = _LINE.match(line.rstrip("\n"))
        if not m:
            continue
        stack, n = m.group(1), int(m.group(2))
        frames = [fold(f) for f in stack.split(";") if f]
        total += n
        if not frames:
            continue
        if frames[-1].startswith(("run_forever", "select (", "poll (")) or "uv__io_poll" in frames[-1]:
            idle += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    if not total:
        print("no samples")
        return 1
    print(f"samples: {total}")
    for title, counter in (("self", self_c), ("inclusive", incl_c)):
        print(f"\n== top by {title} ==")
        shown = 0
        for fn, n in counter.most_common():
            if args.filter and args.filter not in fn:
                continue
            print(f"{100 * n / total:6.1f}%  {fn}")
            shown += 1
            if shown >= args.top:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
