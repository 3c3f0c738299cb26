"""Ahead-of-time compilation of every kernel for GPUs that need not be present.

Each kernel module lists its variants in ``AOT_SPECS`` (a list of ``AOTSpec``); this module finds
them, compiles each for a target such as sm_80 or sm_90 with the ``ptxas`` shipped in the Triton
wheel, and reads the resource usage and the width of global memory accesses from the SASS
(``cuobjdump``/``nvdisasm`` from the same wheel). Tests and ``benchmarks/kernel_report.py`` use it.

Run ``python -m euphonium.kernels.aot [--arch 80 90]`` (without ``TRITON_INTERPRET``) for a JSON report.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclasses.dataclass(frozen=True)
class AOTSpec:
    """One compiled variant of a kernel.

    ``signature`` maps every non-constexpr argument to a Triton type (``"*fp32"``, ``"i32"``, ...),
    ``constexprs`` gives the constexpr arguments, and ``aligned`` names the arguments (pointers and
    sizes) assumed divisible by 16, as the JIT specialises them at run time for contiguous tensors
    of aligned sizes; without it the compiler cannot emit 128-bit accesses.
    ``options`` are compile options the launcher also passes (FP fusion is on unless it says otherwise).
    """

    name: str
    kernel: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    aligned: tuple = ()
    num_warps: int = 4
    # Launch options the kernel's launcher passes too (e.g. ``enable_fp_fusion``), so the AOT build
    # is the code that runs.
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)


def all_specs() -> List[AOTSpec]:
    """Every ``AOTSpec`` declared by the modules of ``euphonium.kernels``."""
    import euphonium.kernels as pkg

    specs: List[AOTSpec] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name == "aot":
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        specs.extend(getattr(module, "AOT_SPECS", []))
    return specs


def compile_spec(spec: AOTSpec, arch: int):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (kernels are interpreted functions)")
    names = spec.kernel.arg_names
    unknown = set(spec.signature) | set(spec.constexprs) | set(spec.aligned)
    unknown -= set(names)
    if unknown:
        raise ValueError(f"{spec.name}: arguments {sorted(unknown)} are not parameters of {spec.kernel.__name__}")
    # Constexpr parameters appear in the signature as "constexpr" too (Triton >= 3.2).
    signature = {n: (spec.signature[n] if n in spec.signature else "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    src = ASTSource(fn=spec.kernel, signature=signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"enable_fp_fusion": True, "num_warps": spec.num_warps, **spec.options},
    )


def _tool(name: str, *args: str) -> str:
    out = subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True, check=True)
    return out.stdout


def sass_report(cubin: bytes) -> Dict[str, Any]:
    """Registers, spills, shared memory and the widths of global loads and stores of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _tool("cuobjdump", "-res-usage", f.name)
        sass = _tool("nvdisasm", "-c", f.name)
    regs = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    shared = re.search(r"SHARED:(\d+)", usage)
    ops = re.findall(r"\b((?:LDG|STG)(?:\.E)?(?:\.[A-Z0-9]+)*)\b", sass)
    widths: Dict[str, Dict[str, int]] = {"LDG": {}, "STG": {}}
    for op in ops:
        kind = op[:3]
        m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
        width = {"128": "128", "64": "64", "U16": "16", "S16": "16", "U8": "8", "S8": "8"}[m.group(1)] if m else "32"
        widths[kind][width] = widths[kind].get(width, 0) + 1
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(local.group(1)) if local else 0,
        "shared_bytes": int(shared.group(1)) if shared else 0,
        "global_loads_by_bits": widths["LDG"],
        "global_stores_by_bits": widths["STG"],
    }


def report(archs=(80, 90), names: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    rows = []
    for spec in all_specs():
        if names and spec.name not in names:
            continue
        for arch in archs:
            compiled = compile_spec(spec, arch)
            rows.append(
                {
                    "kernel": spec.name,
                    "arch": f"sm_{arch}",
                    "ptx_bytes": len(compiled.asm["ptx"]),
                    **sass_report(compiled.asm["cubin"]),
                }
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--kernel", nargs="*", help="only these spec names")
    args = parser.parse_args(argv)
    json.dump(report(args.arch, args.kernel), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
