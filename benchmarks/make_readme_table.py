"""The README's benchmark section, generated from the result files (never hand-copied numbers).

Reads ``benchmarks/results/<device>/*.json`` (written by the op benchmarks and ``train_step.py``) and
``benchmarks/results/aot-*/kernel_report.json``, and prints Markdown: per device one table of every
op case (median times, speedups over eager and compile, achieved bandwidth as a share of the copy
bandwidth measured in the same run, bytes saved for backward), the training-step breakdown, and the
kernel resource table. ``--output FILE`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py` from anywhere

from benchmarks.common import RESULTS_DIR  # noqa: E402
from benchmarks.kernel_report import markdown as kernel_markdown  # noqa: E402

# Op benchmarks in README order (files that are absent are skipped).
BENCH_ORDER = ("sde_step", "sde_step_drawn", "sde_step_guided", "sde_log_prob", "sde_log_prob_kl", "reward_grad",
               "group_advantages", "grpo_loss", "grpo_loss_kl")
BENCH_TITLES = {
    "sde_step": "`sde_step`", "sde_step_drawn": "`sde_step` (noise drawn)", "sde_step_guided": "`sde_step` (guided)",
    "sde_log_prob": "`sde_log_prob` fwd+bwd", "sde_log_prob_kl": "`sde_log_prob` fwd+bwd, KL",
    "reward_grad": "`reward_grad` normalise/clip", "group_advantages": "`group_advantages`",
    "grpo_loss": "`grpo_loss` fwd+bwd", "grpo_loss_kl": "`grpo_loss` fwd+bwd, KL",
}


def _ms(x) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}" if n < 2**30 else f"{n / 2**30:.2f} Gi"


def _saved(providers) -> str:
    e, f = providers.get("eager", {}), providers.get("euphonium", {})
    if "saved_new_bytes" not in e or "saved_new_bytes" not in f:
        return ""
    return (f"{_mib(e['saved_new_bytes'])} → {_mib(f['saved_new_bytes'])} "
            f"({_mib(e['saved_bytes'])} → {_mib(f['saved_bytes'])})")


def op_table(payloads) -> list:
    lines = ["| op | shape | dtype | eager ms | compile ms | euphonium ms | vs eager | vs compile "
             "| euphonium GB/s (% copy) | saved for bwd MiB, new (all): eager → euphonium |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for payload in payloads:
        for case in payload["cases"]:
            p = case["providers"]
            f = p.get("euphonium", {})
            bad = [name for name, r in p.items() if r.get("check", "ok") != "ok"]
            flag = f" ⚠ differs from eager: {', '.join(bad)}" if bad else ""
            speed = lambda key: f"{f[key]:.2f}x" if key in f else "-"  # noqa: E731
            pct = 100 * f.get("copy_fraction", 0.0)
            bw = f"{f['gbps']:.3g} ({pct:.0f}%)" if pct >= 10 else f"{f['gbps']:.3g} ({pct:.2g}%)" if "gbps" in f else "-"
            lines.append(
                f"| {BENCH_TITLES.get(payload['bench'], payload['bench'])} | {case['case']} "
                f"`{'x'.join(map(str, case['shape']))}` | {case['dtype']} | {_ms(p.get('eager', {}).get('median_ms'))} "
                f"| {_ms(p.get('compile', {}).get('median_ms'))} | {_ms(f.get('median_ms'))} | {speed('speedup_vs_eager')} "
                f"| {speed('speedup_vs_compile')} | {bw} | {_saved(p)}{flag} |"
            )
    return lines


def train_table(payload) -> list:
    c = payload["config"]
    lines = [f"Training step, {payload['model']}: batch {c['batch']} (groups of {c['group_size']}), latent "
             f"`{'x'.join(map(str, c['latent']))}`, {c['num_steps']} rollout steps ({c['guided_steps']} PRM-guided), "
             f"{c['train_steps']} trained, step noise `{c['step_noise']}`; mean of {c['timed_steps']} steps: "
             f"**{payload['total_s']:.2f} s**.", "", "| part | s / step | share |", "|---|---:|---:|"]
    lines += [f"| {r['category']} | {r['mean_s']:.3f} | {100 * r['share']:.1f}% |" for r in payload["breakdown"]]
    return lines


def device_section(directory: Path) -> list:
    payloads = {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}
    ops = [payloads[b] for b in BENCH_ORDER if b in payloads]
    ops += [p for name, p in payloads.items() if name not in BENCH_ORDER and "cases" in p]
    trains = [p for name, p in payloads.items() if name.startswith("train_step")]
    if not ops and not trains:
        return []
    first = (ops or trains)[0]
    dev = first["device"]
    head = f"#### {dev['name']}"
    lines = [head, ""]
    if ops:
        backend = ops[0]["euphonium_backend"]
        what = {"triton": "the fused Triton kernels", "torch": "the ops' PyTorch paths (the CPU default)",
                "reference": "the eager reference (EUPHONIUM_BACKEND=reference)"}[backend]
        copy = ops[0]["copy_bandwidth"]["gbps"]
        threads = f", {dev['threads']} thread{'s' if dev['threads'] > 1 else ''}" if "threads" in dev else ""
        lines += [f"torch {dev['torch']}, triton {dev['triton']}{threads}; `euphonium` = {what}; copy bandwidth "
                  f"{copy:.1f} GB/s; timing: {ops[0]['timing']}. Commands: "
                  + ", ".join(f"`python benchmarks/{p['command']}`" for p in ops) + ".", ""]
        lines += op_table(ops) + [""]
    for t in trains:
        lines += train_table(t) + [""]
    return lines


def kernel_section(root: Path) -> list:
    lines = []
    for path in sorted(root.glob("aot-*/kernel_report.json")):
        payload = json.loads(path.read_text())
        lines += [f"#### Kernels compiled ahead of time for {', '.join(payload['archs'])} (triton {payload['triton']})",
                  "", "`python benchmarks/kernel_report.py`: registers, spills and shared memory per thread block "
                  "from `cuobjdump`, global access widths from the SASS.", "", kernel_markdown(payload["kernels"]), ""]
    return lines


def build(root: Path = RESULTS_DIR) -> str:
    lines = ["### Benchmarks", "",
             "Regenerate everything with `python benchmarks/run_all.py` (this table: "
             "`python benchmarks/make_readme_table.py`). `eager` is each op's reference in `euphonium/ops` "
             "(written as peer trainers write it: whole-tensor fp32 upcasts, one op at a time), `compile` is "
             "`torch.compile` of it, `euphonium` the library on that device. Bandwidth = minimal bytes read + "
             "written / median time; `saved for bwd`: bytes autograd keeps for the backward beyond the op's "
             "inputs (all saved tensors in brackets).", ""]
    for directory in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("aot-")):
        lines += device_section(directory)
    lines += kernel_section(root)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="results root (default benchmarks/results)")
    parser.add_argument("--output", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        raise SystemExit(f"no results at {args.results}: run python benchmarks/run_all.py first")
    text = build(args.results)
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return text


if __name__ == "__main__":
    main()
