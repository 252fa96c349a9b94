"""Wall time of ``diffquant --help`` and of every subcommand's ``--help``, each in a fresh process (median of N).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/cli_startup.py [--repeats 3] [--json benchmarks/results/cli_startup.json]
        [--commands "diffquant,quantize,zoo train"]   # a subset (default: all)

Each run starts the interpreter the way the ``diffquant`` console script does (``from diffquant.cli import app``),
so the time is what a user waits for the help text: interpreter start, imports, building the commands (wall
time, and the CPU time the process used, which a busy machine inflates far less). The
sources are whatever ``PYTHONPATH`` names (``PYTHONPATH=/path/to/other/src`` measures another checkout). Prints
one row per command and writes the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: tuple[tuple[str, ...], ...] = (
    (), ("quantize",), ("generate",), ("info",), ("export",), ("demo",), ("eval",), ("bench",),
    ("zoo",), ("zoo", "list"), ("zoo", "train"), ("zoo", "eval"),
)
# The console script's own code (pyproject's [project.scripts] diffquant = "diffquant.cli:app").
ENTRY = "import sys; from diffquant.cli import app; sys.argv[0] = 'diffquant'; sys.exit(app())"


def time_help(command: tuple[str, ...]) -> tuple[float, float]:
    """Wall seconds from process start to exit of ``diffquant COMMAND --help``, and the CPU seconds (user + system)
    it used: on a busy machine the wall time grows with the load, the CPU time much less. Fails on a non-zero exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ENTRY, *command, "--help"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"diffquant {' '.join(command)} --help exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/cli_startup.json"))
    parser.add_argument("--commands", default=None, help="comma list of commands to time, 'diffquant' for the root")
    args = parser.parse_args()
    wanted = None if args.commands is None else {c.strip() for c in args.commands.split(",")}
    rows = []
    for command in COMMANDS:
        if wanted is not None and (" ".join(command) or "diffquant") not in wanted:
            continue
        runs = [time_help(command) for _ in range(args.repeats)]
        times, cpu = [r[0] for r in runs], [r[1] for r in runs]
        rows.append({"command": " ".join(("diffquant", *command, "--help")), "median_s": round(statistics.median(times), 3),
                     "median_cpu_s": round(statistics.median(cpu), 3), "times_s": [round(t, 3) for t in times]})
        print(f"{rows[-1]['command']:34s} {rows[-1]['median_s']:6.2f} s wall  {rows[-1]['median_cpu_s']:5.2f} s CPU   "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)})", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"slowest {max(r['median_s'] for r in rows):.2f} s wall, {max(r['median_cpu_s'] for r in rows):.2f} s CPU; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "cli_startup", "repeats": args.repeats, "pythonpath": os.environ.get("PYTHONPATH", ""),
        "python": platform.python_version(), "cpus": os.cpu_count(), "load_average_1min": load, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
