"""The persisted results: ``benchmarks/results/methods.json`` (every model) and the page, rewritten after every row.

A model's entry is merged with what an earlier run left: its sessions are kept while the FP weights match, and
its rows too while the table is the same (FP fingerprint, sampling settings, calibration prompts), so a run
adds or redoes rows and never drops those it does not reach. A finished row is found again by its key, a hash
of everything that decides its numbers (``runner.row_key``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import report


def short(value, digits: int = 5):
    """``value`` with its floats cut to ``digits`` significant digits (keeps the JSON readable)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: short(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [short(v, digits) for v in value]
    return value


class Store:
    """methods.json (all models) and the page, rewritten atomically after every row.

    Each save re-reads the file and replaces only the models this run touched, so runs of different models
    (or a merge by hand) between two saves are kept."""

    def __init__(self, json_path: Path, md_path: Path):
        self.json_path, self.md_path = json_path, md_path
        self.data = self._read()
        self.touched: set[str] = set()

    def _read(self) -> dict:
        if self.json_path.is_file():
            return json.loads(self.json_path.read_text())
        return {"version": 1, "models": {}}

    def model(self, name: str, result: dict) -> None:
        self.data["models"][name] = result
        self.touched.add(name)

    def save(self) -> None:
        from diffquant.evaluation.report import jsonable
        from diffquant.io import atomic_write_text

        disk = self._read()
        self.data = {**disk, "models": {**disk["models"], **{n: self.data["models"][n] for n in self.touched}}}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.json_path, json.dumps(jsonable(self.data), indent=1, allow_nan=False) + "\n")
        report.write_page(self.md_path, self.data)

    def begin_model(self, name: str, result: dict, fresh: bool) -> tuple[dict, dict[str, dict]]:
        """Enter ``result`` (a new run's entry for ``name``, without rows) merged with the stored one; save.

        Returns this run's session record (the runner fills in how it ended) and the stored rows by key
        (none with ``fresh``), from which finished rows are reused.
        """
        earlier = {} if fresh else self.data["models"].get(name, {})
        ref = result["reference"]
        if ref["generation"]["generated"] == 0 and "generate_s" in earlier.get("reference", {}).get("summary", {}):
            ref["summary"]["generate_s"] = earlier["reference"]["summary"]["generate_s"]  # all cached: keep the time it took
        same_fp = earlier.get("reference", {}).get("fingerprint") == ref["fingerprint"]
        if same_fp:
            result["sessions"] = earlier.get("sessions") or [  # results written before sessions were recorded
                {"command": earlier["command"].removeprefix(".venv/bin/python "), "started": earlier["started"],
                 "load_start": earlier["load_start"],
                 **({k: earlier[k] for k in ("finished", "wall_s", "load_end")} if "wall_s" in earlier else {}),
                 "rows_run": [r["label"] for r in earlier.get("rows", [])]}]
        if same_fp and "peers" in earlier:  # the methods-and-peers table (methodbench/peers.py) is rerun on its own
            result["peers"] = earlier["peers"]
        session = {"command": result["command"].removeprefix(".venv/bin/python "), "started": result["started"],
                   "load_start": result["load_start"]}
        result["sessions"].append(session)
        same_table = (same_fp and earlier.get("calib_prompts") == result["calib_prompts"]
                      and earlier.get("settings") == json.loads(json.dumps(result["settings"], default=str)))
        # A run adds or redoes rows: rows it does not reach (other methods or bit widths, or after a crash) stay.
        result["rows"] = list(earlier.get("rows", [])) if same_table else []
        result["bits"] = result["bits"] + [b for b in earlier.get("bits", []) if same_table and b not in result["bits"]]
        self.model(name, result)
        self.save()
        return session, {r["key"]: r for r in earlier.get("rows", [])}


def put_row(result: dict, row: dict, variants: list[str]) -> None:
    """Add or replace ``row`` in ``result``, keeping rows ordered by bit width, then by ``variants``' order."""
    rows = [r for r in result["rows"] if r["label"] != row["label"]] + [row]
    order = {b: i for i, b in enumerate(result["bits"])}
    rank = {v: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: (order.get(r["bits"], len(order)), rank.get(r["variant"], len(rank))))
    result["rows"] = rows
