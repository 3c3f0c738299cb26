"""Hardening of the trainer's files: no code runs from a checkpoint, corrupt checkpoints fall back,
torn or half-rewritten logs, a disk that fills up at chosen points, kill -9 at random points, folders
the run does not own, strict JSON logs and non-finite weights."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from euphonium import checkpointing as cp
from euphonium.rewards.prm import LatentRewardModel
from euphonium.toy import build_toy_model, save_toy_model
from euphonium.train import Trainer, load_config
from euphonium.train import checkpoint as ckpt
from euphonium.train.__main__ import main
from euphonium.train.logging import MetricsLogger

STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    transformer, text_encoder = build_toy_model(seed=int(torch.randint(0, 2**31, ())))
    save_toy_model(transformer, text_encoder, root / "toy")
    LatentRewardModel(in_channels=3, text_dim=text_encoder.config.dim).save_pretrained(root / "prm")
    return root


def overrides(assets, **extra):
    values = {
        "model.path": str(assets / "toy"),
        "prm_path": str(assets / "prm"),
        "prompts_per_step": 2,
        "group_size": 2,
        "sampler.num_steps": 4,
        "sampler.guidance_start": 2,
        "max_steps": STEPS,
        "checkpoint_every": 1,
        "keep_checkpoints": 3,
        "num_eval_samples": 1,
        "eval_every": 1,
        "eval_prompts": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


class Disk:
    """Stands in for ``checkpointing._open``: counts the bytes written (and where), and with a
    ``budget`` fails like a full disk once it is spent (the failing write lands partly, as a real one)."""

    def __init__(self, budget=None):
        self.budget, self.used, self.events = budget, 0, []

    def open(self, path, mode):
        self.events.append((Path(path).name, self.used))
        return _File(open(path, mode), self, Path(path))


class _File:
    def __init__(self, f, disk, path):
        self.f, self.disk, self.path = f, disk, path

    def write(self, data):
        data = bytes(memoryview(data).cast("B"))
        disk = self.disk
        if disk.budget is not None and disk.used + len(data) > disk.budget:
            room = disk.budget - disk.used
            self.f.write(data[:room])
            self.f.flush()
            disk.used = disk.budget
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        disk.used += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def rows(path, drop=("seconds",)):
    out = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line, parse_constant=lambda c: pytest.fail(f"{path}: bare {c} in strict JSON"))
        out.append({k: v for k, v in row.items() if k not in drop})
    return out


def weights(run, step, name="trainable"):
    return load_file(str(run / "checkpoints" / f"step-{step}" / f"{name}.safetensors"))


def assert_same_run(a, b, step=STEPS):
    """Bit for bit: the weights and EMA at ``step``, and every logged row but the timings."""
    for name in ("trainable", "ema"):
        wa, wb = weights(a, step, name), weights(b, step, name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert rows(a / "metrics.jsonl") == rows(b / "metrics.jsonl")
    assert rows(a / "eval.jsonl") == rows(b / "eval.jsonl")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Every run here is compared bit for bit with the reference run, and the killed runs are subprocesses
    # with one thread: CPU matmuls may round differently with another thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(assets, tmp_path_factory):
    """One uninterrupted run (every write counted), the reference for every resumed one."""
    out = tmp_path_factory.mktemp("base") / "run"
    out.mkdir()
    (out / "train.log").write_text("the shell's own log\n")  # not the run's: left alone
    disk = Disk()
    original = cp._open
    cp._open = disk.open
    try:
        assert main(["--output-dir", str(out), *overrides(assets)]) == 0
    finally:
        cp._open = original
    assert (out / "train.log").read_text() == "the shell's own log\n"
    return out, disk.events


def copy_run(base, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base[0], dst)
    return dst


def refresh_manifest(folder):
    """Rewrite ``manifest.json`` for the files as they are now (an attacker, or a corruption the
    manifest cannot see), so that the readers themselves must catch the problem."""
    (folder / cp.MANIFEST).write_text(json.dumps({"files": cp._manifest(folder, {})}))


# --------------------------------------------------------------------------------------------------
# 1. No code runs from a checkpoint


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_a_checkpoint_never_runs(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    marker = tmp_path / "pwned"
    step = run / "checkpoints" / f"step-{STEPS}"
    torch.save({"optimizer": Evil(marker), "scheduler": {}}, step / "optim.pt")
    # The planted file is live: an unrestricted unpickler runs it.
    torch.load(step / "optim.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    for folder in sorted((run / "checkpoints").iterdir()):
        torch.save({"torch": Evil(marker)}, folder / "rng.pt")
        refresh_manifest(folder)  # the manifest agrees: only the safe loader stands in the way
    with pytest.warns(UserWarning, match=r"optim.pt: cannot be read safely"):
        assert main(["--output-dir", str(run), "--resume", *overrides(base[0].parent.parent)]) in (2,)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no usable checkpoint in") and "rng.pt: cannot be read safely" in err
    assert not marker.exists()


def test_no_unrestricted_torch_load_in_the_library():
    root = Path(__file__).parents[1]
    offenders = []
    for folder in ("euphonium", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            if "weights_only=False" in text or "pickle.load" in text:
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_prm_checkpoints_are_atomic_checked_and_safe(tmp_path):
    from euphonium.rewards.prm import PRMTrainConfig, PRMTrainer
    from euphonium.rewards.prm.data import PRMDataset

    tiny = dict(in_channels=3, text_dim=8, channels=(8, 16), blocks=(1, 1), cond_dim=16, sigma_freq_dim=16)
    data = PRMDataset(x0=torch.randn(8, 3, 2, 8, 8), prompt_embeds=torch.randn(8, 8), rewards=torch.rand(8))
    config = PRMTrainConfig(steps=2, batch_size=4, warmup_steps=0, eval_every=1, checkpoint_every=1, keep_checkpoints=3)
    trainer = PRMTrainer(LatentRewardModel(**tiny, norm_groups=4), config, output_dir=tmp_path)
    trainer.fit(data, progress=False)
    root = tmp_path / "checkpoints"
    assert [p.name for _, p in cp.step_dirs(root)] == ["step-1", "step-2"]
    # A crafted trainer.pt in the newest one: refused, never run; the older one is taken.
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "optimizer": Evil(marker), "scheduler": None, "generator": None}, root / "step-2/trainer.pt")
    refresh_manifest(root / "step-2")
    with pytest.warns(UserWarning, match=r"step-2/trainer.pt: cannot be read safely"):
        assert trainer.latest_checkpoint() == root / "step-1"
    assert not marker.exists()
    # A truncated model file is named by the manifest.
    model_file = next((root / "step-1" / "model").glob("*.safetensors"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(cp.CheckpointError, match=r"no usable checkpoint.*safetensors: truncated \(100 bytes"):
        with pytest.warns(UserWarning):
            trainer.latest_checkpoint()
    # A full disk while saving: one-line error, nothing partial, the orphans of killed writers gone.
    (root / ".tmp-step-7-99999").mkdir()
    (root / ".step-8.tmp").mkdir()
    disk = Disk(budget=1000)
    original, cp._open = cp._open, disk.open
    try:
        with pytest.raises(cp.WriteError, match=r"could not write checkpoint .*step-2 \(trainer.pt\): disk full"):
            trainer.save_checkpoint()
    finally:
        cp._open = original
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]
    trainer.save_checkpoint()
    assert PRMTrainer.read_checkpoint(root / "step-2")["state"]["step"] == 2


# --------------------------------------------------------------------------------------------------
# 2. A corrupt newest checkpoint: the newest complete one, with a warning naming the file and reason


def _truncate(name, keep=0.5):
    def corrupt(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return corrupt


def _bad_header(folder):
    data = bytearray((folder / "trainable.safetensors").read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    (folder / "trainable.safetensors").write_bytes(bytes(data))
    refresh_manifest(folder)


def _flip_bit(folder):
    data = bytearray((folder / "trainable.safetensors").read_bytes())
    data[-5] ^= 0x01
    (folder / "trainable.safetensors").write_bytes(bytes(data))


def _nan_weight(folder):
    tensors = load_file(str(folder / "trainable.safetensors"))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "trainable.safetensors"))
    refresh_manifest(folder)  # a bit flip the manifest did not see: the finite check does


def _then_refresh(corrupt):
    def both(folder):
        corrupt(folder)
        refresh_manifest(folder)

    return both


CORRUPTIONS = {
    "truncated weights": (_truncate("trainable.safetensors"), r"trainable.safetensors: truncated"),
    "empty weights": (_truncate("trainable.safetensors", 0), r"trainable.safetensors: empty"),
    "empty weights, no manifest": (
        lambda f: (_truncate("trainable.safetensors", 0)(f), (f / cp.MANIFEST).unlink()),
        r"trainable.safetensors: empty",
    ),
    "bad safetensors header": (_bad_header, r"trainable.safetensors: not a readable safetensors file"),
    "flipped bit": (_flip_bit, r"trainable.safetensors: contents differ from what was written"),
    "NaN weight": (_nan_weight, r"trainable.safetensors: tensor '.*' has non-finite values"),
    "truncated optimizer": (_truncate("optim.pt", 0.9), r"optim.pt: truncated"),
    "truncated optimizer, manifest agrees": (_then_refresh(_truncate("optim.pt", 0.9)), r"optim.pt: cannot be read"),
    "broken state.json": (lambda f: (f / "state.json").write_text('{"step": '), r"state.json: not valid JSON"),
    "missing rng": (lambda f: (f / "rng.pt").unlink(), r"rng.pt: missing"),
    "broken manifest": (lambda f: (f / cp.MANIFEST).write_text("{"), r"manifest.json: unreadable manifest"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_skipped_with_the_file_and_reason(base, tmp_path, case):
    run = copy_run(base, tmp_path)
    corrupt, reason = CORRUPTIONS[case]
    corrupt(run / "checkpoints" / f"step-{STEPS}")
    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*step-{STEPS}: .*{reason}"):
        path, loaded = ckpt.find_checkpoint(run)
    assert path.name == f"step-{STEPS - 1}" and loaded["state"]["step"] == STEPS - 1


def test_resume_falls_back_and_still_equals_the_uninterrupted_run(assets, base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    _truncate("trainable.safetensors")(run / "checkpoints" / f"step-{STEPS}")
    (run / "checkpoints" / f"step-{STEPS - 1}" / "state.json").write_text("")
    with pytest.warns(UserWarning, match=r"skipping checkpoint"):
        assert main(["--output-dir", str(run), "--resume", *overrides(assets)]) == 0
    assert f"resumed from {run / 'checkpoints' / f'step-{STEPS - 2}'}" in capsys.readouterr().out
    assert_same_run(base[0], run)
    # None left: a one-line error naming every checkpoint and why.
    for _, folder in cp.step_dirs(run / "checkpoints"):
        (folder / "state.json").write_text("")
    with pytest.warns(UserWarning):
        assert main(["--output-dir", str(run), "--resume", *overrides(assets)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no usable checkpoint in") and "\n" not in err and err.count("not valid JSON") == 3


# --------------------------------------------------------------------------------------------------
# 3. Torn and half-rewritten logs


def test_a_torn_last_line_does_not_block_resume(assets, base, tmp_path):
    run = copy_run(base, tmp_path)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS}")  # the crash came after step 3's row, before its checkpoint
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward_mean": 0.5')  # the disk filled up mid-line
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipping its last line"):
        assert main(["--output-dir", str(run), "--resume", *overrides(assets)]) == 0
    assert_same_run(base[0], run)


def test_the_resume_time_rewrite_is_atomic(base, tmp_path, monkeypatch):
    run = copy_run(base, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    logger = MetricsLogger(run, enabled=False)
    logger.enabled = True  # the file part only (no TensorBoard writer)
    monkeypatch.setattr(cp, "_open", Disk(budget=10).open)
    with pytest.raises(cp.WriteError, match=r"could not write .*metrics.jsonl: disk full"):
        logger.truncate("metrics", after=1)
    assert (run / "metrics.jsonl").read_bytes() == before
    monkeypatch.undo()

    def killed(*args):
        raise KeyboardInterrupt  # a kill between the temporary file and the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.truncate("metrics", after=1)
    monkeypatch.undo()
    assert (run / "metrics.jsonl").read_bytes() == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp-")] == []
    logger.truncate("metrics", after=1)
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1]


def test_non_finite_metrics_are_written_as_null_and_reported(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False)
    logger.enabled = True
    with pytest.warns(UserWarning, match=r"metrics.jsonl step 1: non-finite loss=nan, grad_norm=inf written as null"):
        logger.writer = type("W", (), {"add_scalar": lambda *a: None, "flush": lambda *a: None})()
        logger.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4})
    assert rows(logger.path) == [
        {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-4, "non_finite": ["loss", "grad_norm"]}
    ]


# --------------------------------------------------------------------------------------------------
# 4. A full disk: at chosen points of a checkpoint write, and in a whole run


def test_a_full_disk_at_any_point_of_a_checkpoint_leaves_nothing_partial(assets, tmp_path, monkeypatch):
    trainer = Trainer(load_config(None, overrides(assets, max_steps=1)), tmp_path / "run")
    trainer.step = 1
    counting = Disk()
    monkeypatch.setattr(cp, "_open", counting.open)
    good = trainer.save()
    monkeypatch.undo()
    total = counting.used
    starts = [used for _, used in counting.events]  # where each file began
    points = sorted({0, 1, total // 2, total - 1, *[s + 7 for s in starts]})
    for step, budget in [(2, b) for b in points] + [(1, total // 3)]:  # the last replaces step-1 itself
        trainer.step = step
        monkeypatch.setattr(cp, "_open", Disk(budget=budget).open)
        with pytest.raises(cp.WriteError) as info:
            trainer.save()
        monkeypatch.undo()
        message = str(info.value)
        assert (
            "\n" not in message and f"could not write checkpoint {tmp_path / 'run/checkpoints'}/step-{step}" in message
        )
        assert "disk full (no space left on device)" in message
        assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-1"], budget
        assert ckpt.read_checkpoint(good)["state"]["step"] == 1
    trainer.step = 2
    assert ckpt.read_checkpoint(trainer.save())["state"]["step"] == 2


@pytest.mark.parametrize("where", ["optim.pt", "metrics.jsonl"])
def test_a_run_that_fills_the_disk_stops_in_one_line_and_resumes_exactly(assets, base, tmp_path, capsys, where):
    out = tmp_path / "run"
    # The byte at which the uninterrupted run began writing ``where`` for the second time, plus a few.
    budget = [used for name, used in base[1] if name == where][1] + 5
    disk = Disk(budget=budget)
    original, cp._open = cp._open, disk.open
    try:
        assert main(["--output-dir", str(out), *overrides(assets)]) == 1
    finally:
        cp._open = original
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not write") and "disk full (no space left on device)" in err
    assert (where == "optim.pt") == ("checkpoint" in err) and where in err
    assert not [p for p in out.rglob(".tmp-*")]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn line
    (out / "checkpoints" / ".tmp-step-9-4242").mkdir()  # and an orphan a kill left (removed at start)
    (out / ".tmp-metrics.jsonl-4242").write_text("half")
    assert main(["--output-dir", str(out), "--resume", *overrides(assets)]) == 0
    assert not (out / "checkpoints" / ".tmp-step-9-4242").exists() and not (out / ".tmp-metrics.jsonl-4242").exists()
    assert_same_run(base[0], out)


# --------------------------------------------------------------------------------------------------
# kill -9 at random points, then --resume: the same run bit for bit


def test_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(assets, base, tmp_path):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "euphonium.train", "--output-dir", str(out), *overrides(assets)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    history = []
    for attempt in range(2):
        proc = subprocess.Popen(
            command + (["--resume"] if attempt else []), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        delay = rng.uniform(0, 2.5)  # a step takes ~0.7 s here: anywhere in the steps and their writes
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
        lines = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
        history.append(f"attempt {attempt}: killed {delay:.2f}s in (rc {proc.returncode}): {found}, {lines} rows")
    context = f"seed {seed}; " + "; ".join(history)
    assert main(["--output-dir", str(out), "--resume", *overrides(assets)]) == 0, context
    try:
        assert_same_run(base[0], out)
        assert [p.name for _, p in cp.step_dirs(out / "checkpoints")] == [f"step-{s}" for s in range(1, STEPS + 1)]
    except AssertionError as err:
        raise AssertionError(f"{context}: {err}") from err


# --------------------------------------------------------------------------------------------------
# 5-7, 11. Non-finite weights, the checkpoint's tensors, folders the run does not own, keep_checkpoints


def test_an_update_that_makes_the_weights_non_finite_stops_the_run(assets, tmp_path):
    trainer = Trainer(load_config(None, overrides(assets)), tmp_path / "run")
    step = trainer.optimizer.step

    def poisoned(*args, **kwargs):
        out = step(*args, **kwargs)
        with torch.no_grad():
            trainer.params[1].view(-1)[0] = float("inf")
        return out

    trainer.optimizer.step = poisoned
    name = trainer.trainable_names[1]
    with pytest.raises(ckpt.RunAborted, match=rf"^step 1: the update made the weights non-finite \({name}"):
        trainer.train_step()


def test_foreign_files_are_never_overwritten_and_resume_on_nothing_starts_fresh(assets, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"my": "own config"}\n')
    for resume in ([], ["--resume"]):
        assert main(["--output-dir", str(folder), *resume, *overrides(assets)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: output dir {folder} holds config.json that no euphonium run wrote (no euphonium-run.json); "
            "the run would overwrite them: choose another --output-dir"
        )
    assert (folder / "config.json").read_text() == '{"my": "own config"}\n'
    (folder / "config.json").unlink()
    (folder / "checkpoints" / "step-1").mkdir(parents=True)  # another tool's checkpoints
    assert main(["--output-dir", str(folder), *overrides(assets)]) == 2
    assert "holds checkpoints that no euphonium run wrote" in capsys.readouterr().err
    # --resume on a folder that does not exist yet: a fresh run, said so (relaunch scripts rely on it).
    run = tmp_path / "new"
    assert main(["--output-dir", str(run), "--resume", *overrides(assets, max_steps=1, **{"model.lora_rank": 2})]) == 0
    assert f"--resume: {run} holds no run yet; starting a fresh run there" in capsys.readouterr().err
    # 6. Another lora_rank than the checkpoint's: one line naming it, before any optimizer exists.
    assert main(["--output-dir", str(run), "--resume", *overrides(assets, max_steps=2, **{"model.lora_rank": 4})]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: cannot resume {run / 'checkpoints' / 'step-1'}")
    assert "model.lora_rank=2 there, 4 here" in err


def test_resume_trims_to_keep_checkpoints(assets, base, tmp_path):
    """A kill right after a checkpoint's rename leaves keep_checkpoints + 1 of them: the resume trims."""
    run = copy_run(base, tmp_path)
    assert len(cp.step_dirs(run / "checkpoints")) == 3
    with pytest.warns(UserWarning, match="differ from the checkpoint's config.json: keep_checkpoints"):
        assert main(["--output-dir", str(run), "--resume", *overrides(assets, keep_checkpoints=2)]) == 0
    assert [p.name for _, p in cp.step_dirs(run / "checkpoints")] == [f"step-{STEPS - 1}", f"step-{STEPS}"]
