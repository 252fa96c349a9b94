"""Soak test of published outputs: quantize / eval / generate in loops under kills, concurrent writers and a full disk.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/soak.py [--seconds 300] [--json soak.json] [--md soak.md]

Runs the real CLI (``python -m diffquant.cli``) as subprocesses on a tiny SD pipeline, each iteration one of:
a run SIGKILLed after a random delay or just after its ``.partial-*`` sibling appears, two writers of the same ``--out`` started together, a run whose ``--out``
sits on a nearly full disk (an 8 MiB tmpfs topped up with a filler file; where mounting is refused,
RLIMIT_FSIZE makes writes fail mid-file instead), or a plain run. Killed runs and about half the others
pass ``--overwrite``, so kills land inside the atomic swap too. Afterwards every output that exists must load and verify
(``diffquant.load`` checks the manifest hashes; PNGs open; results.json parses), every output once published
must still exist, and after one more claim of each output no ``.partial-*``/``.old-*`` sibling or lock file
may remain. Not part of the test suite (it runs for minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
KINDS = ("quantize", "generate", "eval")
DISK = 8 << 20


def command(kind: str, out: Path, base: Path, overwrite: bool) -> list[str]:
    """The CLI command of one run of ``kind`` writing ``out`` (steps and prompts kept tiny)."""
    tiny, prompts, q = base / "tiny", base / "prompts.txt", base / "q-base"
    args = {"quantize": ["quantize", "--model", tiny, "--method", "rtn", "--num-prompts", "1", "--steps", "2",
                         "--prompts", prompts],
            "generate": ["generate", "--model", q, "--prompt", "a red circle", "--steps", "2"],
            "eval": ["eval", "--reference", tiny, "--model", q, "--prompts", prompts, "--steps", "2",
                     "--metrics", "psnr", "--cache-dir", base / "cache"]}[kind]
    return [sys.executable, "-m", "diffquant.cli", *map(str, args), "--out", str(out)] + (["--overwrite"] if overwrite else [])


def out_path(root: Path, kind: str, slot: int) -> Path:
    return root / {"quantize": f"q{slot}", "generate": f"g{slot}.png", "eval": f"e{slot}"}[kind]


def verify(kind: str, out: Path) -> None:
    """Raise unless ``out`` is a complete output of ``kind``."""
    if kind == "quantize":
        import diffquant

        diffquant.load(out)
    elif kind == "generate":
        from PIL import Image

        with Image.open(out) as image:
            image.load()
    else:
        json.loads((out / "results.json").read_text())


class Soak:
    def __init__(self, base: Path, seed: int) -> None:
        self.base, self.rng = base, random.Random(seed)
        self.env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.disk_root, self.fsize = base / "full", None
        self.stats = dict.fromkeys(("runs", "succeeded", "kills", "kills_while_writing", "collisions", "both_writers_succeeded", "refused_existing",
                                    "disk_full_failures", "other_failures", "tracebacks"), 0)
        self.published: dict[Path, str] = {}  # every output a run reported saved -> its kind
        self.killed: set[int] = set()
        self.seconds = dict.fromkeys(KINDS, 15.0)  # how long the last complete run of each kind took
        self.findings: list[str] = []

    def setup(self) -> None:
        from diffquant.models.tiny import tiny_sd_pipeline

        tiny_sd_pipeline().save_pretrained(self.base / "tiny")
        (self.base / "prompts.txt").write_text("a red circle\n")
        self.start("quantize", self.base / "q-base", False).communicate()
        self.stats["runs"] = 0
        self.disk_root.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(self.disk_root)],
                                 capture_output=True).returncode == 0
        self.disk_mode = "tmpfs 8 MiB" if mounted else "RLIMIT_FSIZE"

    def start(self, kind: str, out: Path, overwrite: bool, fsize: int | None = None) -> subprocess.Popen:
        def limit() -> None:  # the child gets EFBIG from a write past the limit instead of being killed by SIGXFSZ
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        self.stats["runs"] += 1
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(command(kind, out, self.base, overwrite), env=self.env, cwd=self.base, text=True,
                                stdout=subprocess.DEVNULL, stderr=log, preexec_fn=limit if fsize else None)
        proc.kind, proc.out, proc.log = kind, out, log  # type: ignore[attr-defined]
        return proc

    def finish(self, proc: subprocess.Popen, kill_after: float | None = None, at_write: bool = False) -> str:
        """Wait for ``proc`` and classify how it ended; SIGKILL it after ``kill_after`` seconds or, with ``at_write``,
        a random 0-0.2 s after its ``.partial-*`` sibling appears (inside the write and the swap)."""
        started, partial = time.monotonic(), proc.out.with_name(f".partial-{proc.pid}-{proc.out.name}")
        while proc.poll() is None:
            if at_write and partial.exists():
                time.sleep(self.rng.uniform(0.0, 0.2))
            elif kill_after is None or at_write or time.monotonic() - started < kill_after:
                time.sleep(0.01)
                continue
            if proc.poll() is None:
                self.stats["kills_while_writing"] += partial.exists()
                proc.kill()
                proc.wait()
        proc.log.seek(0)
        err = proc.log.read()
        proc.log.close()
        lines = [line for line in err.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if proc.returncode == -signal.SIGKILL:
            self.stats["kills"] += 1
            self.killed.add(proc.pid)
            return "killed"
        if proc.returncode == 0:
            self.stats["succeeded"] += 1
            self.seconds[proc.kind] = time.monotonic() - started
            self.published[proc.out] = proc.kind
            return "ok"
        if "Traceback" in err or not last.startswith("error:"):
            self.stats["tracebacks"] += 1
            self.findings.append(f"{proc.kind} --out {proc.out.name}: exit {proc.returncode}, {last[:200]!r}")
        for needle, key in (("being written by another", "collisions"), ("already exists", "refused_existing"),
                            ("no space left", "disk_full_failures"), ("File too large", "disk_full_failures")):
            if needle.lower() in last.lower():
                self.stats[key] += 1
                return key
        self.stats["other_failures"] += 1
        return "failed"

    def check_present(self) -> None:
        for out in self.published:
            if not out.exists():
                self.findings.append(f"LOST: {out} was published and is gone")

    def fill_disk(self) -> int | None:
        """Leave a random few hundred KiB to a few MiB free on the tmpfs; the RLIMIT_FSIZE to use otherwise."""
        free = self.rng.randint(4 << 10, 3 << 20)
        if self.disk_mode == "RLIMIT_FSIZE":
            return free
        filler = self.disk_root / "filler"
        have = filler.stat().st_size if filler.exists() else 0
        st = os.statvfs(self.disk_root)
        size = max(0, have + st.f_bavail * st.f_frsize - free)
        filler.unlink(missing_ok=True)
        with open(filler, "wb") as f:
            try:
                f.write(b"\0" * size)
            except OSError:
                pass
        return None

    def iteration(self) -> None:
        kind, slot = self.rng.choice(KINDS), self.rng.randrange(2)
        scenario = self.rng.choice(("kill", "kill", "concurrent", "disk", "plain"))
        overwrite = scenario == "kill" or self.rng.random() < 0.5  # a kill should land in a swap, not a refusal
        if scenario == "disk":
            fsize = self.fill_disk()
            self.finish(self.start(kind, out_path(self.disk_root, kind, slot), overwrite, fsize))
        elif scenario == "concurrent":
            out = out_path(self.base / "outs", kind, slot)
            a, b = self.start(kind, out, overwrite), self.start(kind, out, overwrite)
            ends = {self.finish(a), self.finish(b)}
            if ends == {"ok"}:
                self.stats["both_writers_succeeded"] += 1
        else:
            delay = self.rng.uniform(0.3, 1.0) * self.seconds[kind] if scenario == "kill" else None
            at_write = scenario == "kill" and self.rng.random() < 0.7
            self.finish(self.start(kind, out_path(self.base / "outs", kind, slot), overwrite), kill_after=delay, at_write=at_write)
        self.check_present()
        print(f"{scenario} {kind}{slot}{' --overwrite' if overwrite else ''}: {self.stats}", flush=True)

    def final_check(self) -> dict[str, int]:
        """Verify every output that exists; count leftovers, then claim each output once and count again."""
        from diffquant.outputs import claim_output

        outs = {out_path(root, kind, slot): kind for root in (self.base / "outs", self.disk_root) for kind in KINDS for slot in range(2)}
        verified = corrupted = 0
        for out, kind in outs.items():
            if out.exists():
                try:
                    verify(kind, out)
                    verified += 1
                except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                    corrupted += 1
                    self.findings.append(f"CORRUPTED: {out}: {type(e).__name__}: {e}"[:300])
        lost = sum(1 for out in self.published if not out.exists())

        def leftovers() -> list[Path]:
            return [p for root in (self.base / "outs", self.disk_root) if root.exists() for p in root.iterdir()
                    if p.name.startswith((".partial-", ".old-")) or p.name.endswith(".lock")]

        before = leftovers()
        unexplained = [p for p in before if p.name.startswith((".partial-", ".old-"))
                       and int(p.name.split("-")[1]) not in self.killed]
        self.findings += [f"LEFTOVER of a process that was not killed: {p}" for p in unexplained]
        for out in outs:
            with claim_output(out, overwrite=True):
                pass
        after = leftovers()
        self.findings += [f"LEFTOVER after a fresh claim: {p}" for p in after]
        return {"outputs_verified": verified, "outputs_lost": lost, "outputs_corrupted": corrupted,
                "leftovers_of_killed_runs": len(before) - len(unexplained), "leftovers_unexplained": len(unexplained),
                "leftovers_after_claim": len(after)}


def markdown(summary: dict) -> str:
    rows = [(k, v) for k, v in summary.items() if k not in ("findings", "command")]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long to loop (the last run may run past it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", type=Path, help="write the summary as JSON here")
    parser.add_argument("--md", type=Path, help="write the summary as a Markdown table here")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="diffquant-soak-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    (base / "outs").mkdir(exist_ok=True)
    soak = Soak(base, args.seed)
    try:
        soak.setup()
        start = time.monotonic()
        while time.monotonic() - start < args.seconds:
            soak.iteration()
        summary = {"command": " ".join(sys.argv), "seconds": round(time.monotonic() - start), "disk_full_by": soak.disk_mode,
                   **soak.stats, **soak.final_check(), "findings": soak.findings}
    finally:
        if getattr(soak, "disk_mode", "") == "tmpfs 8 MiB":
            subprocess.run(["umount", str(soak.disk_root)], check=False)
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    print(markdown(summary), end="")
    for finding in summary["findings"]:
        print("finding:", finding)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(summary))
    sys.exit(1 if summary["outputs_lost"] or summary["outputs_corrupted"] else 0)


if __name__ == "__main__":
    main()
