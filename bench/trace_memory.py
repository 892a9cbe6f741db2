"""Peak memory of one Hutch++ estimate (~10 s, CPU).

    python bench/trace_memory.py

A diagonal float32 operator with n = 4,000,000 entries (products cost nothing, so the
estimator's own memory is all that moves), 99 products as in ``HessianSpectrumMonitor``: a
sketch of 33 vectors, 504 MB. Runs the estimate in a fresh process and prints the resident
memory it adds to that process's peak (``ru_maxrss``), in MB and in sketches. Appends the
line to ``bench/results/trace-memory-<date>.md``.
"""

from __future__ import annotations

import datetime as dt
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
N, NUM_HVPS = 4_000_000, 99

CHILD = f"""
import resource, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from spectral_callbacks.linalg import hutchpp

class Diagonal:
    def __init__(self, d):
        self.d, self.size, self.dtype, self.device = d, d.numel(), d.dtype, d.device
    def matmat(self, block):
        return block * self.d

torch.set_num_threads(1)
diagonal = torch.rand({N}, generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
estimate = hutchpp(Diagonal(diagonal), num_hvps={NUM_HVPS})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024, estimate.estimate, float(diagonal.double().sum()))
"""


def main() -> None:
    output = subprocess.run(
        [sys.executable, "-c", CHILD], check=True, capture_output=True, text=True
    ).stdout.split()
    extra_mb, estimate, exact = (float(value) for value in output)
    sketch_mb = (NUM_HVPS // 3) * N * 4 / 2**20
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    line = (
        f"| {dt.date.today()} | {commit} | {extra_mb:.0f} MB | {extra_mb / sketch_mb:.1f} | "
        f"{estimate:.6g} (exact {exact:.6g}) |"
    )
    print(line)
    out = ROOT / "bench" / "results" / f"trace-memory-{dt.date.today()}.md"
    if not out.exists():
        out.write_text(
            f"# Peak memory of one Hutch++ estimate (`python bench/trace_memory.py`)\n\n"
            f"Diagonal float32 operator, n = {N:,}, {NUM_HVPS} products (sketch of "
            f"{NUM_HVPS // 3} vectors, {sketch_mb:.0f} MB), CPU, fresh process.\n\n"
            "| date | code at | added to peak RSS | in sketches | estimate |\n"
            "|---|---|---|---|---|\n"
        )
    with out.open("a") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()
