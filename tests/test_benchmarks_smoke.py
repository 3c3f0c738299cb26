"""Smoke test of ``benchmarks/``: every op benchmark, the training-step breakdown and the README table
run end to end on one small CPU case, so the scripts cannot rot. Timings here are meaningless; the
compile provider uses dynamo's ``eager`` backend to skip inductor's C++ compile, and the scripts run
on one thread (restored afterwards), which avoids OpenMP stalls on a shared CI machine."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks import advantages, grpo_loss, make_readme_table, reward_grad, sde_log_prob, sde_step, train_step  # noqa: E402
from benchmarks.common import PROVIDERS, Case, TimingOptions, compare, describe_device, run_case, saved_for_backward  # noqa: E402

OPS = [sde_step, sde_log_prob, reward_grad, advantages, grpo_loss]
DIFFERENTIABLE = {sde_log_prob, grpo_loss}


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_thread):
    """Run every op benchmark once (quick, CPU) into one results directory."""
    root = tmp_path_factory.mktemp("results")
    payloads = {}
    for module in OPS:
        payloads[module] = module.main(["--device", "cpu", "--quick", "--compile-backend", "eager", "--out", str(root),
                                        *one_thread])
    return root, payloads


@pytest.mark.parametrize("module", OPS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_op_benchmark_writes_checked_results(module, results):
    root, payloads = results
    payload = payloads[module]
    assert payload["cases"], "no case ran"
    for case in payload["cases"]:
        assert set(case["providers"]) == set(PROVIDERS)
        for name, r in case["providers"].items():
            assert r["check"] == "ok", f"{name} differs from eager: {r['check']}"
            assert r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
            assert r["gbps"] > 0 and r["copy_fraction"] > 0
            assert r["speedup_vs_eager"] == pytest.approx(case["providers"]["eager"]["median_ms"] / r["median_ms"])
            if module in DIFFERENTIABLE:
                # Every provider saves something for its backward (at least its inputs).
                assert r["saved_bytes"] > 0 and 0 <= r["saved_new_bytes"] <= r["saved_bytes"]
            else:
                assert "saved_bytes" not in r
    stem = root / describe_device(torch.device("cpu"))["slug"] / payload["bench"]
    assert json.loads(stem.with_suffix(".json").read_text())["cases"] == payload["cases"]
    with open(stem.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(PROVIDERS) * len(payload["cases"])
    assert stem.with_suffix(".png").stat().st_size > 0


def test_readme_table_lists_every_case(results):
    root, payloads = results
    text = make_readme_table.build(root)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(p["cases"]) for p in payloads.values())
    assert "AMD" in text or "Intel" in text or describe_device(torch.device("cpu"))["name"] in text


def test_train_step_breakdown_adds_up(tmp_path, one_thread):
    rows = train_step.main(["--device", "cpu", "--batch", "4", "--group-size", "2", "--num-steps", "2",
                            "--guided-steps", "1", "--steps", "1", "--out", str(tmp_path), *one_thread])
    assert [r["category"] for r in rows] == list(train_step.CATEGORIES)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    for category in ("model forward (rollout)", "model forward (train)", "model backward", "euphonium ops", "PRM gradient"):
        assert next(r for r in rows if r["category"] == category)["mean_s"] > 0, category
    files = list(tmp_path.glob("*/train_step_toy.*"))
    assert sorted(f.suffix for f in files) == [".csv", ".json", ".png"]


def test_saved_for_backward_counts_new_storage_once():
    x = torch.randn(64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    # x * w saves both operands (inputs: not new); exp saves its fp32 output (new, 256 bytes).
    counts = saved_for_backward(lambda: ((x * w).exp()).sum(), [x, w])
    assert counts == {"saved_bytes": 3 * 256, "saved_new_bytes": 256}


def test_a_provider_that_disagrees_with_eager_is_flagged():
    x = torch.randn(8, 16)
    case = Case(label="t", dtype="fp32", shape=(8, 16), bytes_moved=x.numel() * 8,
                run={"eager": lambda: x * 2, "compile": lambda: x * 2, "euphonium": lambda: x * 2 + 1e-2})
    result = run_case(case, torch.device("cpu"), PROVIDERS, TimingOptions(cpu_min_time_s=0, cpu_min_reps=2), 10.0)
    assert result["providers"]["compile"]["check"] == "ok"
    assert result["providers"]["euphonium"]["check"] != "ok"
    assert result["providers"]["euphonium"]["max_abs_err"] == pytest.approx(1e-2, rel=1e-3)
    assert compare((x, x), (x,), "fp32")["check"].startswith("different outputs")
