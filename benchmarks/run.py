"""`make bench`: kubellm side by side with plain baselines, in one run, reported as ratios.

Every ``benchmarks/bench_*.py`` module exposes ``run(quick: bool) -> list[dict]``; each row has at least
``benchmark``, ``measure``, ``kubellm``, ``baseline``, ``ratio``, ``goal`` and ``ok``. Rows are printed as
one table and saved to ``bench-results/<timestamp>.json``. ``--only NAME`` runs one module; ``--quick``
uses smaller inputs (for a smoke check of the benchmark code itself, not for the figures).

Benchmarks never fail the build: they measure. Goals are printed beside the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover(only: str | None) -> list[Path]:
    mods = sorted(HERE.glob("bench_*.py"))
    if only:
        mods = [m for m in mods if m.stem in (only, f"bench_{only}")]
        if not mods:
            sys.exit(f"error: no benchmark named {only!r} in {HERE}")
    return mods


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run one benchmark module (e.g. prep)")
    ap.add_argument("--quick", action="store_true", help="small inputs, for checking the benchmark code")
    ap.add_argument("--out", default="bench-results", help="folder for the JSON results")
    args = ap.parse_args()

    sys.path.insert(0, str(HERE.parent / "src"))
    from kubellm.log import print_table, setup

    setup()
    rows: list[dict] = []
    for path in discover(args.only):
        t0 = time.perf_counter()
        print(f"== {path.stem} ...", flush=True)
        try:
            rows.extend(load(path).run(quick=args.quick))
        except Exception:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows.append({"benchmark": path.stem, "measure": "ERROR", "ok": False})
        print(f"== {path.stem} done in {time.perf_counter() - t0:.1f} s", flush=True)

    cols = ("benchmark", "measure", "kubellm", "baseline", "ratio", "goal", "ok", "note")
    print()
    print_table("kubellm benchmarks", [{c: r.get(c, "") for c in cols} for r in rows])
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    path = out / time.strftime("%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(rows, indent=2, default=str))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
