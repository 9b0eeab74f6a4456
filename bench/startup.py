"""`edgellm --help` wall time against `python -c pass` (goal: under 0.3 s, no heavy imports).

usage: python bench/startup.py [runs]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    baseline = wall([sys.executable, "-c", "pass"], runs)
    ours = wall([sys.executable, "-m", "edgellm", "--help"], runs)
    print(f"python -c pass : {baseline * 1000:7.1f} ms (median of {runs})")
    print(f"edgellm --help : {ours * 1000:7.1f} ms")
    print(f"ratio          : {ours / baseline:7.2f}x   goal: edgellm --help < 300 ms -> {'ok' if ours < 0.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
