"""pytest-benchmark suite for regression tracking: every op and provider at its small (``--quick``) size.

Not part of the default test run (``pytest.ini``: ``testpaths = tests``, ``--benchmark-skip``). Run::

    python -m pytest benchmarks --benchmark-only                       # table per op
    python -m pytest benchmarks --benchmark-only --benchmark-autosave  # keep a baseline in .benchmarks/
    python -m pytest benchmarks --benchmark-only --benchmark-compare --benchmark-compare-fail=median:20%

Each test first checks that the provider's result matches eager's (the harness' tolerance), then
times the same work the benchmark scripts time (the provider's first call, which compiles for
``compile``, happens before timing).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks import registry
from benchmarks.common import PROVIDERS, compare, resolve_args

# The op benchmarks' base variants, from the registry: name -> (module, its arguments).
OPS = {b.name: (importlib.import_module(f"benchmarks.{b.script}"), b.args) for b in registry.ops() if b.pytest}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=list(OPS))
def case(request):
    """The op's small case on this device (its inputs stay alive for every provider's test)."""
    module, extra = OPS[request.param]
    args = module.parse_args([*extra, "--quick", "--device", DEVICE])
    device, shapes, dtypes, _ = resolve_args(args, module.SIZES)
    return request.param, next(module.cases(shapes[:1], dtypes[:1], device, args))


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_op(benchmark, case, provider):
    op, case = case
    fn = case.run[provider]
    out, ref = fn(), case.run["eager"]()
    select = case.checked or (lambda o: o)
    assert compare(select(out), select(ref), case.dtype)["check"] == "ok"
    benchmark.group = f"{op} {case.label} {case.dtype}"
    benchmark.extra_info.update(bytes_moved=case.bytes_moved, shape=list(case.shape))

    def run():
        fn()
        _sync()

    benchmark.pedantic(run, rounds=20, warmup_rounds=2, iterations=1)
