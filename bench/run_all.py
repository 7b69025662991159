"""Every benchmark in one run: detector1 and image2+image3 vs jwst, then jump and ramp_fit kernels vs stcal.

Usage: python bench/run_all.py  (also `make bench`). Single core throughout; takes several
minutes, most of it jwst on the full frame.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["bench_detector1.py"],
    ["bench_image3.py"],
    ["bench_jump.py"],
    ["bench_jump.py", "--nints", "3", "--size", "640"],
    ["bench_ramp_fit.py"],
    ["bench_ramp_fit.py", "--nints", "3", "--ny", "640", "--nx", "640"],
    ["bench_affected.py"],
    ["bench_daemon.py"],
]


def main() -> int:
    failures = 0
    for args in RUNS:
        print(f"\n===== {' '.join(args)}", flush=True)
        failures += subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]]).returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
