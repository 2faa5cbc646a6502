"""Start-up time of the commands a newcomer types first, against the bare interpreter.

Each command runs as a fresh process, --repeats times, interleaved; the table reports medians of
wall-clock seconds, and which heavy modules each process imported (torch, lightning), which is
what start-up pays for. ``prune`` itself runs on a small synthetic store (made once), so its
figure is start-up plus a prune of 2,000 rows. Target: ``dbp-lightning --help``, ``prune --help``
and ``prune`` under 1 s on this machine.

    python benchmarks/bench_startup.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: runs ``dbp_lightning.cli.main`` with argv, then reports the heavy modules it loaded
PROBE = ("import sys\nfrom dbp_lightning.cli import main\n"
         "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code or 0\n"
         "print('MODULES', 'torch' in sys.modules, 'lightning' in sys.modules, file=sys.stderr)\n"
         "sys.exit(code)")


#: ``prune`` in one process, split: start-up (interpreter, imports, parsing, opening the pool),
#: the stages (report.json), and writing the run (tables, plots), timed around rundir.write_run
SPLIT = ("import json, sys, time\nt0 = time.perf_counter()\nimport dbp_lightning.rundir as rundir\n"
         "from dbp_lightning.cli import main\nspent = [0.0]\nwrite = rundir.write_run\n"
         "def timed(*a, **k):\n    t = time.perf_counter()\n    try:\n        return write(*a, **k)\n"
         "    finally:\n        spent[0] += time.perf_counter() - t\n"
         "rundir.write_run = timed\nmain(sys.argv[1:])\ntotal = time.perf_counter() - t0\n"
         "stages = json.load(open(sys.argv[sys.argv.index('--output') + 1] + '/report.json'))['seconds']\n"
         "print('SPLIT', total - stages - spent[0], stages, spent[0], file=sys.stderr)")


def timed(argv: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    modules = next((line.split()[1:] for line in done.stderr.splitlines() if line.startswith("MODULES")), [])
    loaded = [name for name, flag in zip(("torch", "lightning"), modules) if flag == "True"]
    return seconds, ", ".join(loaded) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dbp_bench_startup_"))
    py = sys.executable
    subprocess.run([py, "-c", PROBE, "data", "synthetic", "--out", str(work / "pool"), "--n", "2000",
                    "--n_concepts", "20"], check=True, capture_output=True)
    cases = {
        "python -c pass (the interpreter)": [py, "-c", "pass"],
        "import dbp_lightning": [py, "-c", "import dbp_lightning"],
        "dbp-lightning --help": [py, "-c", PROBE, "--help"],
        "dbp-lightning prune --help": [py, "-c", PROBE, "prune", "--help"],
        "dbp-lightning prune (2,000 rows)": [py, "-c", PROBE, "prune", "--input", str(work / "pool"),
                                             "--output", str(work / "run"), "--semdedup.k", "20",
                                             "--select.k", "30", "--select.target_fraction", "0.5"],
        "dbp-lightning fit --help": [py, "-c", PROBE, "fit", "--help"],
        "import torch (for scale)": [py, "-c", "import torch"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    loaded: dict[str, str] = {}
    for name, argv in cases.items():  # warm the page cache once, untimed
        timed(argv)
    for _ in range(args.repeats):
        for name, argv in cases.items():
            seconds, loaded[name] = timed(argv)
            times[name].append(seconds)
    base = statistics.median(times["python -c pass (the interpreter)"])
    print(f"median of {args.repeats}, wall-clock seconds of a fresh process\n")
    print("| command | seconds | over the interpreter | torch / lightning imported |")
    print("|---|---:|---:|---|")
    for name in cases:
        m = statistics.median(times[name])
        probed = PROBE in cases[name]
        print(f"| {name} | {m:.2f} | +{m - base:.2f} | {loaded[name] if probed else 'n/a'} |")
    splits = []
    for _ in range(args.repeats):
        done = subprocess.run([py, "-c", SPLIT, *cases["dbp-lightning prune (2,000 rows)"][3:]],
                              capture_output=True, text=True, check=True)
        line = next(l for l in done.stderr.splitlines() if l.startswith("SPLIT"))
        splits.append([float(v) for v in line.split()[1:]])
    start, stages, write = (statistics.median(col) for col in zip(*splits))
    print(f"\nprune (2,000 rows) in one process, median of {args.repeats}: start-up (interpreter, "
          f"imports, parsing, opening the pool) {start:.2f} s, the stages {stages:.2f} s, writing the "
          f"run (tables and plots) {write:.2f} s")
    print("\n" + json.dumps({name: round(statistics.median(v), 3) for name, v in times.items()}))


if __name__ == "__main__":
    main()
