"""Smoke test of ``benchmarks/``: every op benchmark, the training-step breakdown and the README table
run end to end on one small CPU case, so the scripts cannot rot. Timings here are meaningless; the
compile provider uses dynamo's ``eager`` backend to skip inductor's C++ compile, and the scripts run
on one thread (restored afterwards), which avoids OpenMP stalls on a shared CI machine."""

import csv
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root holds benchmarks/

from benchmarks import make_readme_table, registry, run_all, train_step  # noqa: E402
from benchmarks.common import PROVIDERS, Case, TimingOptions, compare, describe_device, run_case, saved_for_backward  # noqa: E402

# Every op benchmark of a CPU --quick run, from the registry.
OPS = [b for b in registry.ops() if "cpu" in b.devices and b.quick]
DIFFERENTIABLE = {"sde_log_prob", "grpo_loss"}


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
    for bench in OPS:
        module = importlib.import_module(f"benchmarks.{bench.script}")
        payloads[bench.name] = module.main(
            [*bench.args, "--device", "cpu", "--quick", "--compile-backend", "eager", "--out", str(root), *one_thread]
        )
    return root, payloads


@pytest.mark.parametrize("bench", OPS, ids=lambda b: b.name)
def test_op_benchmark_writes_checked_results(bench, results):
    root, payloads = results
    payload = payloads[bench.name]
    assert payload["bench"] == bench.name, "the registry's name is the results file's"
    assert payload["cases"], "no case ran"
    for case in payload["cases"]:
        assert set(case["providers"]) == set(PROVIDERS)
        for name, r in case["providers"].items():
            assert r["check"] == "ok", f"{name} differs from eager: {r['check']}"
            assert r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
            assert r["gbps"] > 0 and r["copy_fraction"] > 0
            assert r["speedup_vs_eager"] == pytest.approx(case["providers"]["eager"]["median_ms"] / r["median_ms"])
            if bench.name in DIFFERENTIABLE or case["params"].get("mode") == "train":
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


def test_registry_lists_every_benchmark_script_once():
    names = [b.name for b in registry.REGISTRY]
    assert len(names) == len(set(names))
    on_disk = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    for b in registry.REGISTRY:
        assert b.script in on_disk, f"{b.name}: no benchmarks/{b.script}.py"
        assert b.part in registry.PARTS and b.kind in registry.KINDS
    # A script built on the harness (it defines cases) that the registry does not name would be
    # left out of run_all, the README table, the pytest-benchmark suite and the device run.
    harness = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if "\ndef cases(" in p.read_text()}
    assert harness and harness == set(registry.scripts(registry.ops()))
    # Every entry runs in some part of device_run.sh; the parts together are the registry.
    by_part = [b for part in registry.PARTS for b in registry.entries(part=part)]
    assert sorted(by_part, key=lambda b: names.index(b.name)) == list(registry.REGISTRY)


def test_registry_command_line_and_its_readers():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.registry", "--scripts", "--part", "ops"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == registry.scripts(registry.entries(part="ops")) and "reward_grad" in out
    names = subprocess.run(
        [sys.executable, "-m", "benchmarks.registry", "--names"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert names == [b.name for b in registry.REGISTRY]
    # run_all's plan is the registry's: on a CPU every op benchmark marked for it, then the toy step.
    ops, train = run_all.plan("cpu", quick=False)
    assert ops == [b.command() for b in registry.ops() if "cpu" in b.devices]
    assert train == [["train_step.py", "--model", "toy"]]
    cuda_ops, cuda_train = run_all.plan("cuda", quick=False)
    assert cuda_ops[: len(ops)] == ops, "each op's base run comes before the CUDA-only variants"
    assert ["sde_step.py", "--noise", "drawn"] in cuda_ops and len(cuda_train) == 2
    assert run_all.plan("cuda", quick=True) == (ops, [registry.get("train_step_toy").command(quick=True)])
    with pytest.raises(SystemExit, match="unknown scripts"):
        run_all.main(["--only", "no_such_benchmark"])
    assert make_readme_table.BENCH_ORDER == tuple(b.name for b in registry.ops())
    # device_run.sh takes its parts from the registry and rejects an unknown part before doing anything.
    script = (ROOT / "benchmarks" / "device_run.sh").read_text()
    assert "benchmarks.registry --scripts --part" in script and "--only $only" in script
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh"), "no_such_part"], capture_output=True)
    assert bad.returncode == 2 and b"usage" in bad.stderr


def test_benchmark_scripts_run_as_files_from_anywhere(tmp_path):
    for script in ("sde_step.py", "run_all.py"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr


def test_readme_table_lists_every_case(results, tmp_path):
    root, payloads = results
    text = make_readme_table.build(root)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(p["cases"]) for p in payloads.values())
    # Rows in registry order, each titled as the registry says.
    expected = [
        registry.get(name).title
        for name in make_readme_table.BENCH_ORDER
        if name in payloads
        for _ in payloads[name]["cases"]
    ]
    assert [row.split(" | ")[0][2:] for row in rows] == expected
    assert "AMD" in text or "Intel" in text or describe_device(torch.device("cpu"))["name"] in text
    assert "`euphonium` = the ops' PyTorch paths (the CPU default)" in text
    # The README's block between the markers is replaced, the text around it kept.
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n{make_readme_table.BEGIN}\nold numbers\n{make_readme_table.END}\n## After\n")
    make_readme_table.main(["--results", str(root), "--readme", str(readme)])
    updated = readme.read_text()
    assert updated.startswith("# Title\n") and updated.endswith(f"{make_readme_table.END}\n## After\n")
    assert "old numbers" not in updated and "### Results" in updated and rows[0] in updated
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- benchmarks"):
        make_readme_table.main(["--results", str(root), "--readme", str(readme)])


def test_train_step_breakdown_adds_up(tmp_path, one_thread):
    rows = train_step.main(
        [
            "--device",
            "cpu",
            "--batch",
            "4",
            "--group-size",
            "2",
            "--num-steps",
            "2",
            "--guided-steps",
            "1",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
            *one_thread,
        ]
    )
    assert [r["category"] for r in rows] == list(train_step.CATEGORIES)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    for category in (
        "model forward (rollout)",
        "model forward (train)",
        "model backward",
        "euphonium ops",
        "PRM gradient",
    ):
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
    case = Case(
        label="t",
        dtype="fp32",
        shape=(8, 16),
        bytes_moved=x.numel() * 8,
        run={"eager": lambda: x * 2, "compile": lambda: x * 2, "euphonium": lambda: x * 2 + 1e-2},
    )
    result = run_case(case, torch.device("cpu"), PROVIDERS, TimingOptions(cpu_min_time_s=0, cpu_min_reps=2), 10.0)
    assert result["providers"]["compile"]["check"] == "ok"
    assert result["providers"]["euphonium"]["check"] != "ok"
    assert result["providers"]["euphonium"]["max_abs_err"] == pytest.approx(1e-2, rel=1e-3)
    assert compare((x, x), (x,), "fp32")["check"].startswith("different outputs")


def test_convergence_measures_and_speedups():
    from benchmarks import convergence

    steps = [0, 10, 20, 30]
    assert convergence.steps_to_threshold(steps, [0.1, 0.4, 0.6, 0.8], 0.5) == pytest.approx(15.0)
    assert convergence.steps_to_threshold(steps, [0.1, 0.2, 0.3, 0.4], 0.5) is None
    assert convergence.auc(steps, [0.0, 0.3, 0.3, 0.3]) == pytest.approx((1.5 + 3 + 3) / 30)

    def method(reached, seconds=1.0):
        return {
            "seeds": [
                {"seed": s, "steps_to_threshold": {"0.5": r}, "seconds_per_step": seconds}
                for s, r in enumerate(reached)
            ]
        }

    # Paired by seed; "not reached" counts as the budget (30) and is flagged.
    row = convergence.speedup(method([10.0, 15.0, None]), method([20.0, 30.0, None], 0.5), 0.5, 30)
    assert row["per_seed"] == pytest.approx([2.0, 2.0, 1.0])
    assert row["mean"] == pytest.approx(5 / 3) and row["ci95"][0] <= row["mean"] <= row["ci95"][1]
    assert row["wall_clock_mean"] == pytest.approx(5 / 6)
    assert row["not_reached"] == {"subject": [2], "baseline": [2], "counted_as": 30}


def test_convergence_runs_the_trainer_on_the_mixture(tmp_path, one_thread):
    from benchmarks import convergence

    spec = convergence.run_spec("mixture", "euphonium_fast", ["algorithm=euphonium_fast"], 3, 1e-3, 2, "oracle")
    spec["overrides"] += ["prompts_per_step=2", "group_size=2", "eval_prompts=8"]
    spec.update(eval_every=1, kl_samples=2)
    out = convergence.train_one(spec)
    assert out["eval_steps"] == [0, 1, 2] and out["eval_jsonl_matches"]
    assert all(0 < e < 1 for e in out["eval_reward"]) and len(out["train_reward"]) == 2
    assert out["kl_to_base"] >= 0 and out["w2_coupled"] >= 0 and out["guidance_rho_mean"] == pytest.approx(0.5)
    assert out["process_advantage"] == "td" and out["sampler"]["logprob_mean"] == "guided"
    # The cache and the summary: a cached run is found by its spec; the rest is listed as not run.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{convergence.spec_key(spec)}.json").write_text(json.dumps(out))
    assert convergence.load_cached(cache, spec)["eval_reward"] == out["eval_reward"]
    payload = convergence.main(["--no-run", "--seeds", "3", "--cache", str(cache), "--out", str(tmp_path / "c.json")])
    assert payload["methods"] == {} and payload["not_run"]
    assert json.loads((tmp_path / "c.json").read_text())["thresholds"] == [0.5, 0.7]


def test_convergence_toy_path_kl(one_thread):
    """The toy's KL to the base: zero for the base itself, positive after training; the run's curves do
    not depend on whether it is measured (it is drawn after the last evaluation)."""
    from benchmarks import convergence
    from euphonium.train.config import load_config
    from euphonium.train.trainer import Trainer

    spec = convergence.run_spec("toy", "grpo_fast", ["algorithm=grpo_fast"], 3, 3e-4, 2, "oracle")
    spec["overrides"] += ["prompts_per_step=2", "group_size=2", "eval_prompts=2"]
    spec.update(eval_every=1, kl_samples=2)
    assert convergence.run_spec("toy", "x", [], convergence.LR_SEED, 1e-4, 2, "oracle")["kl_samples"] == 0

    config = load_config(None, [*spec["overrides"], "device=cpu"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out)
        base = convergence._frozen_copy(trainer)
        at_start = convergence._toy_path_kl(trainer, base, trainer.evaluator.eval_set, 5)
        trainer.logger.close()
    assert at_start["kl"] == 0.0 and len(at_start["kl_per_step"]) == 19  # the last of the 20 steps is an ODE step

    measured = convergence.train_one(spec)
    assert measured["kl_to_base"] > 0 and measured["kl_to_base"] == pytest.approx(sum(measured["kl_per_step"]))
    unmeasured = convergence.train_one({**spec, "kl_samples": 0})
    assert unmeasured["kl_to_base"] is None
    assert unmeasured["eval_reward"] == measured["eval_reward"]
    assert unmeasured["train_reward"] == measured["train_reward"]
