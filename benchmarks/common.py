"""The benchmark harness every script in ``benchmarks/`` shares.

Three providers run the same work on the same inputs in one process:

- ``eager``: the op's eager PyTorch reference from ``euphonium/ops/*.py`` (the spec, written the way
  peer trainers write it: whole-tensor fp32 upcasts, one op at a time);
- ``compile``: ``torch.compile`` of that reference (inductor, static shapes: compile's best case);
- ``euphonium``: the public op on this device (the fused Triton kernels on CUDA, the library's CPU
  path on the CPU; the JSON records which one ran).

Per case it reports the median time over many runs after warm-up (``triton.testing.do_bench`` with
quantiles on CUDA; interleaved ``time.perf_counter`` rounds on the CPU, so that load from other
processes hits every provider alike), the speedups over ``eager`` and ``compile`` measured side by
side, the achieved bandwidth ``minimal bytes read + written / time`` and its fraction of the copy
bandwidth (a large ``Tensor.copy_``) measured in the same run, the peak memory allocated (CUDA) and
the bytes saved for backward (any device, through ``torch.autograd.graph.saved_tensors_hooks``).
Results go to stdout and to ``benchmarks/results/<device>/<bench>.{json,csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
PROVIDERS = ("eager", "compile", "euphonium")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Outputs of the providers must agree with eager's to these tolerances (by the case's input dtype):
# bf16 results may differ by one rounding step where the fused kernel and eager round differently.
TOLERANCES = {"fp32": (1e-4, 1e-4), "bf16": (2e-2, 2e-2), "fp16": (5e-3, 5e-3)}

Shape = Tuple[int, ...]

# Latent shapes [B, C, (T,) H, W]: image latents (SD3/Flux-style 64x64) and Wan2.1 video latents of
# 81-frame clips at 480p (832x480) and 720p (1280x720): 16 channels, 21 latent frames, 8x spatial
# compression.
LATENT_PRESETS: Dict[str, Tuple[int, ...]] = {
    "small": (2, 16, 4, 16, 16),
    "image": (8, 16, 64, 64),
    "wan480p": (1, 16, 21, 60, 104),
    "wan480p-b4": (4, 16, 21, 60, 104),
    "wan720p": (1, 16, 21, 90, 160),
    "wan720p-b2": (2, 16, 21, 90, 160),
}


# ------------------------------------------------------------------------------------------------
# The device
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> Dict[str, Any]:
    """Name, results-directory slug and software versions of ``device``."""
    info: Dict[str, Any] = {"type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            capability=f"sm_{props.major}{props.minor}",
        )
        info["slug"] = _slug(props.name)
    else:
        info.update(name=cpu_model(), threads=torch.get_num_threads(), logical_cpus=os.cpu_count())
        info["slug"] = "cpu-" + _slug(info["name"])
    return info


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TimingOptions:
    """How long to time. CUDA: ``do_bench`` warm-up/measurement budgets in ms. CPU: interleaved
    rounds until ``cpu_min_time_s`` has passed and at least ``cpu_min_reps`` rounds ran (at most
    ``cpu_max_reps``), after ``cpu_warmup`` calls of each provider (the first compiles).
    ``copy_bytes``: size of the copy-bandwidth measurement (default: see ``copy_bandwidth``)."""

    cuda_warmup_ms: float = 100.0
    cuda_rep_ms: float = 500.0
    cpu_min_time_s: float = 2.0
    cpu_min_reps: int = 5
    cpu_max_reps: int = 200
    cpu_warmup: int = 2
    copy_bytes: Optional[int] = None


@dataclasses.dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: Optional[int]


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_cuda(fn: Callable[[], Any], options: TimingOptions) -> Timing:
    """Median and 20/80% quantiles of ``fn`` by ``triton.testing.do_bench`` (L2 flushed between runs)."""
    from triton.testing import do_bench

    median, q20, q80 = do_bench(fn, warmup=options.cuda_warmup_ms, rep=options.cuda_rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, q20, q80, None)


def time_cpu_interleaved(fns: Dict[str, Callable[[], Any]], options: TimingOptions) -> Dict[str, Timing]:
    """Per-call wall times of every function, called in turn in each round, as median/quantiles.

    Interleaving makes the comparison fair on a shared machine: a burst of load from another
    process slows every provider's sample of that round, not one provider's whole measurement.
    The order steps through every permutation, so that each provider runs after each other one
    (whose freed memory or warm caches it would inherit) equally often.
    """
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    orders = list(itertools.permutations(fns))
    start = time.perf_counter()
    rounds = 0
    while True:
        for name in orders[rounds % len(orders)]:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        elapsed = time.perf_counter() - start
        if rounds >= options.cpu_max_reps or (rounds >= options.cpu_min_reps and elapsed >= options.cpu_min_time_s):
            break
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = Timing(
            1e3 * statistics.median(values), 1e3 * _quantile(values, 0.2), 1e3 * _quantile(values, 0.8), len(values)
        )
    return out


def time_functions(
    fns: Dict[str, Callable[[], Any]], device: torch.device, options: TimingOptions
) -> Dict[str, Timing]:
    if device.type == "cuda":
        return {name: time_cuda(fn, options) for name, fn in fns.items()}
    return time_cpu_interleaved(fns, options)


def copy_bandwidth(device: torch.device, options: TimingOptions, nbytes: Optional[int] = None) -> Dict[str, float]:
    """The device's achievable bandwidth: ``2 * nbytes / time`` of ``dst.copy_(src)`` (read + write).

    ``nbytes`` defaults to 1 GiB on CUDA (far beyond L2) and 256 MiB on the CPU (beyond its caches).
    """
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    for _ in range(2):
        copy()
    synchronize(device)
    timing = time_functions({"copy": copy}, device, options)["copy"]
    return {"bytes": nbytes, "median_ms": timing.median_ms, "gbps": 2 * nbytes / (timing.median_ms * 1e-3) / 1e9}


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def saved_for_backward(forward: Callable[[], Any], inputs: Sequence[torch.Tensor]) -> Dict[str, int]:
    """Bytes autograd keeps for the backward of ``forward()``.

    Every tensor packed for backward (by any autograd node or custom Function) is collected through
    ``saved_tensors_hooks``; storages are counted once. ``saved_bytes`` is their total size,
    ``saved_new_bytes`` the part that does not alias any of ``inputs``: the memory the op itself adds
    between forward and backward (saving an input that the caller holds anyway costs nothing).
    """
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    del out
    return {
        "saved_bytes": sum(storages.values()),
        "saved_new_bytes": sum(n for ptr, n in storages.items() if ptr not in input_ptrs),
    }


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


# ------------------------------------------------------------------------------------------------
# Cases and their results
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One benchmarked configuration.

    ``run`` maps each provider to a zero-argument callable doing the timed work (its result is
    compared with eager's); ``bytes_moved`` is the minimal number of bytes that work must read and
    write (what one fused pass would move). For differentiable ops ``forward`` maps each provider to
    the forward alone, whose saved tensors are counted, and ``inputs`` are the op's inputs.
    ``checked`` selects the part of a result compared with eager's (default: all of it), e.g. what
    does not depend on random noise that the providers draw differently.
    """

    label: str
    dtype: str
    shape: Shape
    bytes_moved: int
    run: Dict[str, Callable[[], Any]]
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    forward: Optional[Dict[str, Callable[[], Any]]] = None
    inputs: Sequence[torch.Tensor] = ()
    checked: Optional[Callable[[Any], Any]] = None


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def compare(out: Any, ref: Any, dtype: str) -> Dict[str, Any]:
    """Largest absolute difference of ``out`` from ``ref`` and whether it is within the dtype's tolerance."""
    outs, refs = _tensors(out), _tensors(ref)
    if len(outs) != len(refs):
        return {"max_abs_err": None, "check": f"different outputs: {len(outs)} tensors vs eager's {len(refs)}"}
    rtol, atol = TOLERANCES[dtype]
    worst, problem = 0.0, None
    for i, (a, b) in enumerate(zip(outs, refs)):
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape:
            return {"max_abs_err": None, "check": f"output {i} has shape {tuple(a.shape)}, eager's {tuple(b.shape)}"}
        worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
        try:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        except AssertionError as err:
            problem = problem or f"output {i}: " + str(err).splitlines()[0]
    return {"max_abs_err": worst, "check": problem or "ok"}


def run_case(
    case: Case, device: torch.device, providers: Sequence[str], options: TimingOptions, copy_gbps: float
) -> Dict[str, Any]:
    """Warm up and check every provider against eager, time them side by side, measure memory."""
    fns = {p: case.run[p] for p in providers if p in case.run}
    results: Dict[str, Dict[str, Any]] = {p: {} for p in fns}
    outputs = {}
    select = case.checked or (lambda out: out)
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        results[name]["first_call_s"] = time.perf_counter() - t0  # includes torch.compile's compilation
        # A copy: an in-place provider's output is its input, which the warm-up calls change again.
        outputs[name] = [t.detach().clone() for t in _tensors(select(out))]
        del out
        for _ in range(options.cpu_warmup - 1 if device.type == "cpu" else 0):
            fn()
    if "eager" in outputs:
        for name in fns:
            if name != "eager":
                results[name].update(compare(outputs[name], outputs["eager"], case.dtype))
        results["eager"].update(max_abs_err=0.0, check="ok")
    del outputs

    for name, timing in time_functions(fns, device, options).items():
        gbps = case.bytes_moved / (timing.median_ms * 1e-3) / 1e9
        results[name].update(
            median_ms=timing.median_ms,
            q20_ms=timing.q20_ms,
            q80_ms=timing.q80_ms,
            reps=timing.reps,
            gbps=gbps,
            copy_fraction=gbps / copy_gbps,
        )
    for name, fn in fns.items():
        results[name]["peak_bytes"] = peak_memory(fn, device)
        if case.forward is not None and name in case.forward:
            results[name].update(saved_for_backward(case.forward[name], case.inputs))
    for res in results.values():
        for base in ("eager", "compile"):
            if base in results:
                res[f"speedup_vs_{base}"] = results[base]["median_ms"] / res["median_ms"]
    return {
        "case": case.label,
        "dtype": case.dtype,
        "shape": list(case.shape),
        "bytes_moved": case.bytes_moved,
        "params": case.params,
        "providers": results,
    }


# ------------------------------------------------------------------------------------------------
# Sizes and the command line
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SizeSpec:
    """Named sizes of a benchmark and the defaults per device (``quick``: one small size)."""

    presets: Dict[str, Shape]
    default_cpu: List[str]
    default_cuda: List[str]
    quick: List[str]
    dtypes: List[str]
    quick_dtypes: Optional[List[str]] = None


def parse_size(token: str, presets: Dict[str, Shape]) -> Tuple[str, Shape]:
    """A preset name (``wan480p``) or an explicit shape (``2x16x21x60x104``) as ``(label, shape)``."""
    if token in presets:
        return token, presets[token]
    if re.fullmatch(r"\d+(x\d+)*", token):
        return token, tuple(int(d) for d in token.split("x"))
    raise argparse.ArgumentTypeError(
        f"size must be one of {sorted(presets)} or a shape like 2x16x21x60x104, got {token!r}"
    )


def shape_str(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def make_parser(description: str, sizes: SizeSpec) -> argparse.ArgumentParser:
    presets = ", ".join(f"{k}={shape_str(v)}" for k, v in sizes.presets.items())
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"size presets: {presets}\n"
        f"defaults: CPU {' '.join(sizes.default_cpu)}; CUDA {' '.join(sizes.default_cuda)}",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: cuda when available)",
    )
    parser.add_argument("--sizes", nargs="+", help="preset names or shapes like 2x16x21x60x104 (default: per device)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help=f"default: {' '.join(sizes.dtypes)}")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help="one small size and short timing (a smoke run)")
    parser.add_argument(
        "--min-time",
        type=float,
        default=None,
        help="CPU: seconds of interleaved timing per case (default 2, quick 0.2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch.set_num_threads (default: torch's choice). On a CPU shared with other "
        "jobs, 1 avoids OpenMP barriers stalling on descheduled threads",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compile provider (default inductor)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results root: files go to OUT/<device>/<bench>.{json,csv,png}"
    )
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    return parser


def resolve_args(
    args: argparse.Namespace, sizes: SizeSpec
) -> Tuple[torch.device, List[Tuple[str, Shape]], List[str], TimingOptions]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    names = args.sizes or (
        sizes.quick if args.quick else sizes.default_cuda if device.type == "cuda" else sizes.default_cpu
    )
    size_list = [parse_size(n, sizes.presets) for n in names]
    dtypes = args.dtypes or ((sizes.quick_dtypes or sizes.dtypes) if args.quick else sizes.dtypes)
    options = TimingOptions()
    if args.quick:
        options = TimingOptions(
            cuda_warmup_ms=10, cuda_rep_ms=50, cpu_min_time_s=0.2, cpu_min_reps=3, cpu_warmup=1, copy_bytes=2**26
        )
    if args.min_time is not None:
        options.cpu_min_time_s = args.min_time
    return device, size_list, dtypes, options


def compiled(fn: Callable, backend: str) -> Callable:
    """``torch.compile(fn)`` with static shapes and room for one graph per (shape, dtype) benchmarked.

    Dynamo's default recompile limit (8) would silently fall back to eager after a few cases.
    """
    config = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, attr):
            setattr(config, attr, max(getattr(config, attr), 256))
    return torch.compile(fn, backend=backend, dynamic=False)


# ------------------------------------------------------------------------------------------------
# Running a benchmark and writing its results
# ------------------------------------------------------------------------------------------------


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f}M" if n >= 2**20 else f"{n / 2**10:.1f}K"


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


TABLE_COLUMNS = (
    "case",
    "dtype",
    "provider",
    "median ms",
    "q20-q80 ms",
    "GB/s",
    "% copy",
    "vs eager",
    "vs compile",
    "peak mem",
    "saved bwd (new)",
    "check",
)


def table_rows(case_result: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for name, r in case_result["providers"].items():
        saved = (
            "-" if "saved_bytes" not in r else f"{_fmt_bytes(r['saved_bytes'])} ({_fmt_bytes(r['saved_new_bytes'])})"
        )
        rows.append(
            [
                case_result["case"],
                case_result["dtype"],
                name,
                _fmt(r["median_ms"], ".3f"),
                f"{r['q20_ms']:.3f}-{r['q80_ms']:.3f}",
                _fmt(r["gbps"], ".1f" if r["gbps"] >= 10 else ".3g"),
                _fmt(100 * r["copy_fraction"], ".0f"),
                _fmt(r.get("speedup_vs_eager"), ".2f"),
                _fmt(r.get("speedup_vs_compile"), ".2f"),
                _fmt_bytes(r["peak_bytes"]),
                saved,
                r.get("check", "-"),
            ]
        )
    return rows


# Fixed minimum widths keep the columns of rows printed case by case aligned.
_MIN_WIDTHS = (22, 5, 9, 10, 19, 7, 6, 8, 10, 9, 17, 5)


def format_table(
    rows: List[List[str]],
    header: Sequence[str] = TABLE_COLUMNS,
    min_widths: Sequence[int] = _MIN_WIDTHS,
    with_header: bool = True,
) -> str:
    widths = [max([m] + [len(str(x)) for x in col]) for m, col in zip(min_widths, zip(header, *rows))]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i >= 3 else str(c).ljust(w)  # noqa: E731
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    head = [line(header), line(["-" * w for w in widths])] if with_header else []
    return "\n".join(head + [line(r) for r in rows])


def euphonium_backend(device: torch.device) -> str:
    """What the ``euphonium`` provider runs here: ``triton`` (the fused kernels), ``torch`` (the ops'
    PyTorch paths, the CPU default) or ``reference`` (``EUPHONIUM_BACKEND=reference``)."""
    from euphonium.ops._backend import resolve

    return resolve(device, torch_path=True)


def run_bench(
    bench: str,
    description: str,
    cases: Iterable[Case],
    args: argparse.Namespace,
    device: torch.device,
    options: TimingOptions,
    notes: Sequence[str] = (),
) -> Dict[str, Any]:
    """Run every case, print the table as it goes, and write the result files unless ``--no-save``."""
    info = describe_device(device)
    copy = copy_bandwidth(device, options, options.copy_bytes)
    print(f"# {bench}: {description}")
    print(
        f"# device: {info['name']} ({device.type}{', %d threads' % info['threads'] if 'threads' in info else ''}); "
        f"torch {info['torch']}, triton {info['triton']}; euphonium backend: {euphonium_backend(device)}"
    )
    print(f"# copy bandwidth (Tensor.copy_ of {copy['bytes'] >> 20} MiB): {copy['gbps']:.1f} GB/s")
    for note in notes:
        print(f"# {note}")
    results, rows = [], []
    for case in cases:
        result = run_case(case, device, args.providers, options, copy["gbps"])
        results.append(result)
        new_rows = table_rows(result)
        rows.extend(new_rows)
        print(format_table(new_rows, with_header=len(results) == 1), flush=True)
        bad = [f"{p}: {r['check']}" for p, r in result["providers"].items() if r.get("check", "ok") != "ok"]
        if bad:
            print(f"# WARNING {case.label} {case.dtype}: output differs from eager: {'; '.join(bad)}", file=sys.stderr)
    timing_method = (
        "triton.testing.do_bench median (quantiles 0.2/0.5/0.8), "
        f"warmup {options.cuda_warmup_ms:g} ms, rep {options.cuda_rep_ms:g} ms"
        if device.type == "cuda"
        else f"median of interleaved time.perf_counter rounds (>= {options.cpu_min_reps} rounds and "
        f">= {options.cpu_min_time_s:g} s per case) after {options.cpu_warmup} warm-up call(s)"
    )
    payload = {
        "bench": bench,
        "description": description,
        "device": info,
        "copy_bandwidth": copy,
        "euphonium_backend": euphonium_backend(device),
        "timing": timing_method,
        "compile_backend": args.compile_backend,
        "notes": list(notes),
        "command": " ".join([Path(sys.argv[0]).name if sys.argv else bench, *sys.argv[1:]]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cases": results,
    }
    if not args.no_save:
        paths = write_results(payload, args.out)
        print(f"# wrote {', '.join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths)}")
    return payload


CSV_FIELDS = (
    "bench",
    "device",
    "case",
    "shape",
    "dtype",
    "provider",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "reps",
    "bytes_moved",
    "gbps",
    "copy_fraction",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "peak_bytes",
    "saved_bytes",
    "saved_new_bytes",
    "first_call_s",
    "max_abs_err",
    "check",
)


def write_results(payload: Dict[str, Any], root: Path) -> List[Path]:
    """``root/<device slug>/<bench>.json``, ``.csv`` and ``.png``."""
    directory = Path(root) / payload["device"]["slug"]
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / payload["bench"]
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    csv_path = stem.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for case in payload["cases"]:
            for name, r in case["providers"].items():
                writer.writerow(
                    {
                        **r,
                        "bench": payload["bench"],
                        "device": payload["device"]["name"],
                        "case": case["case"],
                        "shape": shape_str(case["shape"]),
                        "dtype": case["dtype"],
                        "provider": name,
                        "bytes_moved": case["bytes_moved"],
                    }
                )
    png_path = stem.with_suffix(".png")
    plot_results(payload, png_path)
    return [json_path, csv_path, png_path]


def plot_results(payload: Dict[str, Any], path: Path) -> None:
    """Grouped bars of the median time per case and provider (log scale), speedups over eager on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = payload["cases"]
    providers = [p for p in PROVIDERS if any(p in c["providers"] for c in cases)]
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cases) + 2), 4.2))
    for i, name in enumerate(providers):
        xs, ys, labels = [], [], []
        for j, case in enumerate(cases):
            r = case["providers"].get(name)
            if r is None:
                continue
            xs.append(j + (i - (len(providers) - 1) / 2) * width)
            ys.append(r["median_ms"])
            labels.append(f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "")
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
    ax.set_yscale("log")
    top = max(r["median_ms"] for c in cases for r in c["providers"].values())
    ax.set_ylim(top=top * 4)  # room for the speedup labels above the tallest bar
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_xticks(range(len(cases)), [f"{c['case']}\n{c['dtype']}" for c in cases], fontsize=7)
    ax.set_title(
        f"{payload['bench']} on {payload['device']['name']} (euphonium = {payload['euphonium_backend']}); "
        "labels: speedup over eager",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latent_bytes(shape: Shape, dtype: torch.dtype, tensors: int) -> int:
    """Bytes of ``tensors`` latent-sized tensors of ``dtype``."""
    return tensors * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def replace_block(path: Path, text: str, begin: str, end: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` marker lines of ``path`` with ``text``."""
    doc = path.read_text()
    start, stop = doc.find(begin), doc.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"{path} has no {begin} ... {end} block to replace")
    path.write_text(doc[: start + len(begin)] + "\n" + text + doc[stop:])
