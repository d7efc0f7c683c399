"""A py-spy raw profile summed up on the machine that recorded it: full profiles of a served run are tens of MB,
too large to bring back from a GPU machine, and a summary says what is needed.

    py-spy record -r 200 --nonblocking --subprocesses --threads -f raw -o /tmp/s.txt -p SERVER_PID -d 20
    python benchmarks/spy_summary.py /tmp/s.txt --seconds 20 --rate 200 > summary.txt

For the busiest (process, thread) pairs: their samples (and the share of the recorded time they were on a CPU),
then functions by inclusive and by self samples.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict


def _name(frame: str) -> str:
    if " (" not in frame:
        return frame
    name, where = frame.split(" (", 1)
    return f"{name} {where.rsplit('/', 1)[-1].split(':')[0]}"


def summarize(path: str, seconds: float, rate: float, threads: int = 8, rows: int = 40) -> str:
    per: Counter = Counter()
    inclusive: dict = defaultdict(Counter)
    own: dict = defaultdict(Counter)
    with open(path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            # (a process's command line may hold ';' itself: what is left of it is no "name (file:line)" frame)
            body = [f for f in frames if not f.startswith(("process ", "thread ")) and f.endswith(")")]
            if not body or not count.isdigit():
                continue
            procs = [f for f in frames if f.startswith("process ")]
            named = [f for f in frames if f.startswith("thread ")]
            key = (procs[-1][:90] if procs else "?", named[-1] if named else "?")
            n = int(count)
            per[key] += n
            for name in {_name(f) for f in body}:
                inclusive[key][name] += n
            own[key][f"{_name(body[-1])}:{body[-1].rsplit(':', 1)[-1]}"] += n
    out = []
    top = per.most_common(1)[0][1] if per else 0
    for key, n in per.most_common(threads):
        out.append(f"\n=== {n} samples ({n / rate / seconds:.0%} of {seconds:.0f} s) {key[0]} {key[1]}")
        if n < 0.05 * top:
            continue
        out += [f"  {100 * c / n:5.1f}% {name}" for name, c in inclusive[key].most_common(rows)]
        out.append("  -- self")
        out += [f"  {100 * c / n:5.1f}% {name}" for name, c in own[key].most_common(rows // 2)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--seconds", type=float, required=True, help="How long py-spy recorded (its -d).")
    ap.add_argument("--rate", type=float, default=100, help="py-spy's sampling rate (its -r).")
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    print(summarize(args.profile, args.seconds, args.rate, args.threads))


if __name__ == "__main__":
    main()
