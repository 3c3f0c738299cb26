"""Resource report of every Triton kernel, compiled ahead of time for a GPU that need not be present.

Each ``AOTSpec`` of ``euphonium.kernels`` is compiled for ``--arch`` (default sm_90, H100/H200) by
``euphonium.kernels.aot`` with the ``ptxas`` shipped in the Triton wheel; registers, spills and static
shared memory come from ``cuobjdump -res-usage`` and the widths of the global loads and stores from the
SASS (``nvdisasm``). A streaming kernel should use no spills and 128-bit (``LDG.E.128``/``STG.E.128``)
accesses for its latent-sized tensors; 32-bit accesses that remain are per-sample scalars (sigmas,
partial sums) or per-row values. Writes a table to stdout and
``benchmarks/results/aot-sm_<arch>/kernel_report.{json,md}``.

Runs without a GPU (the compile happens in a subprocess without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

from benchmarks.common import RESULTS_DIR, ROOT  # noqa: E402

COLUMNS = ("kernel", "arch", "registers", "spills (B)", "shared (B)", "global loads", "global stores", "128-bit")


def compile_report(archs, kernels=None):
    """Rows of ``euphonium.kernels.aot.report`` for ``archs``, computed in a clean subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "euphonium.kernels.aot", "--arch", *map(str, archs)]
    if kernels:
        cmd += ["--kernel", *kernels]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"ahead-of-time compilation failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def _widths(counts):
    """``{"128": 6, "32": 11}`` as ``128b x6, 32b x11`` (widest first)."""
    if not counts:
        return "-"
    return ", ".join(f"{bits}b x{n}" for bits, n in sorted(counts.items(), key=lambda kv: -int(kv[0])))


def vectorised(row) -> str:
    """Which kinds of global access have 128-bit instructions: ``loads+stores``, ``loads``, ``stores``
    or ``none`` (a kernel whose only stores are per-program scalars shows ``loads``)."""
    return "+".join(k for k in ("loads", "stores") if "128" in row[f"global_{k}_by_bits"]) or "none"


def table_rows(rows):
    return [
        [
            r["kernel"],
            r["arch"],
            str(r["registers"]),
            str(r["spill_bytes"]),
            str(r["shared_bytes"]),
            _widths(r["global_loads_by_bits"]),
            _widths(r["global_stores_by_bits"]),
            vectorised(r),
        ]
        for r in rows
    ]


def markdown(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (default 90)")
    parser.add_argument("--kernel", nargs="*", help="only these AOTSpec names")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    rows = compile_report(args.arch, args.kernel)
    cells = table_rows(rows)
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *cells)]
    for line in [COLUMNS, ["-" * w for w in widths], *cells]:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    import triton

    if not args.no_save:
        directory = args.out / ("aot-" + "-".join(f"sm_{a}" for a in args.arch))
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "bench": "kernel_report",
            "archs": [f"sm_{a}" for a in args.arch],
            "triton": triton.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["kernel_report.py", *sys.argv[1:]]),
            "kernels": rows,
        }
        (directory / "kernel_report.json").write_text(json.dumps(payload, indent=1) + "\n")
        (directory / "kernel_report.md").write_text(markdown(rows) + "\n")
        print(
            "# wrote "
            f"{directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory}/kernel_report.{{json,md}}"
        )
    return rows


if __name__ == "__main__":
    main()
