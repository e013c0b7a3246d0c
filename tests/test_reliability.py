"""Reliability by fault injection: interruption and exact resume, crashes mid-write, non-finite losses,
bad input and a failing wandb. Every run is model01 on real MNIST with tiny explicit settings.

Runs that must be real processes (signals, SIGKILL, a fake wandb on PYTHONPATH, exit statuses) go
through subprocesses; the many bad-input cases call `training.main` in-process (no torch start-up per
case), where an escaping exception would fail the test just as a traceback would.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script

import config
import model01
import run_files
import runtime
import training

# Tiny but complete: checkpoints at 10, 20, 30, 40; validation (and best.pt) at 20 and 40; EMA on, so
# resume must restore it too. Constant lr: a run stopped early may be resumed with another --max-steps
# and still follow the same trajectory (the cosine schedule depends on the total number of steps).
SMALL = ["--max-steps", "40", "--log-every", "10", "--checkpoint-every", "10", "--val-every", "20",
         "--val-samples", "2", "--n-test", "50", "--eval-samples", "5", "--batch-size", "50",
         "--lr-schedule", "constant", "--ema-decay", "0.9", "--device", "cpu"]


def with_steps(args: list[str], max_steps: int) -> list[str]:
    args = list(args)
    args[args.index("--max-steps") + 1] = str(max_steps)
    return args


def run_model01(out_dir: Path, data_dir: Path, *args, env: dict | None = None):
    """`python model01.py --out-dir OUT --data-dir DATA ARGS` (later flags win, so ARGS may override DATA)."""
    return run_script("model01.py", "--out-dir", out_dir, "--data-dir", data_dir, *args, timeout=240,
                      env={"VAE_INJECT_NAN": "", "VAE_INJECT_KILL_DURING_SAVE": "", **(env or {})})


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative paths), to show a failed run changed nothing."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_training_state(a: dict, b: dict):
    """Bit-identical weights, EMA weights, Adam moments, data order and RNG states (CPU runs are deterministic)."""
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), f"optimizer {pid}.{name} differs"
    assert a["batcher"]["epoch"] == b["batcher"]["epoch"] and a["batcher"]["position"] == b["batcher"]["position"]
    assert torch.equal(a["batcher"]["perm"], b["batcher"]["perm"])
    assert torch.equal(a["batcher"]["generator"], b["batcher"]["generator"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["step"] == b["step"] and a["n_skipped"] == b["n_skipped"]
    assert a["best_val_bound_nats"] == b["best_val_bound_nats"] and a["best_step"] == b["best_step"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted SMALL run: the reference for every resumed run."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    proc = run_model01(out, data_dir, *SMALL)
    assert proc.returncode == 0, proc.stderr
    return out


# ----------------------------------------------------------------------------- signals and resume


def test_sigterm_mid_training_then_resume_matches_uninterrupted_run(baseline, data_dir, tmp_path):
    out = tmp_path / "run"
    # A long run, SIGTERMed from outside as soon as its first log line (step 10) appears.
    cmd = [sys.executable, "model01.py", *with_steps(SMALL, 100_000), "--out-dir", str(out), "--data-dir",
           str(data_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "VAE_INJECT_NAN": "", "VAE_INJECT_KILL_DURING_SAVE": ""})
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if log.exists() and '"type": "train"' in log.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert "SIGTERM received: stopped after step" in stderr and "Run the same command again" in stderr
    stopped_at = int(stderr.split("stopped after step ")[1].split(",")[0])
    assert stopped_at >= 10
    ckpt = run_files.load_checkpoint(out / "ckpt.pt", "model01")
    assert ckpt["step"] == stopped_at  # the step in progress was finished and checkpointed
    assert not (out / "result.json").exists()

    reference = baseline
    total = 40
    if stopped_at >= total:  # a very slow machine let the run pass step 40: compare further on
        total = stopped_at + 10
        reference = tmp_path / "reference"
        assert run_model01(reference, data_dir, *with_steps(SMALL, total)).returncode == 0
    # The same command with the same out-dir continues (no --resume needed), here to step `total`.
    resumed = run_model01(out, data_dir, *with_steps(SMALL, total))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step {stopped_at}" in resumed.stdout
    assert_same_training_state(load(out / "ckpt.pt"), load(reference / "ckpt.pt"))
    assert_same_training_state(load(out / "best.pt") | {"optimizer": {"state": {}}},  # best.pt: no optimizer
                               load(reference / "best.pt") | {"optimizer": {"state": {}}})
    got, want = (json.loads((d / "result.json").read_text()) for d in (out, reference))
    assert got["test_ll_nats"] == want["test_ll_nats"]
    assert got["n_skipped"] == want["n_skipped"] == 0
    assert any(r["type"] == "resume" and r["step"] == stopped_at for r in read_log(out))


def test_sigint_finishes_the_step_checkpoints_and_exits_130(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "model01.py", *with_steps(SMALL, 100_000), "--out-dir", str(out), "--data-dir",
           str(data_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "VAE_INJECT_NAN": "", "VAE_INJECT_KILL_DURING_SAVE": ""})
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (out / "ckpt.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "SIGINT received: stopped after step" in stderr
    stopped_at = int(stderr.split("stopped after step ")[1].split(",")[0])
    assert run_files.load_checkpoint(out / "ckpt.pt", "model01")["step"] == stopped_at >= 10


def test_signal_outside_the_training_steps_stops_with_a_message(in_process, monkeypatch, baseline, data_dir,
                                                                tmp_path):
    """SIGTERM while the data loads (as in evaluation): exit 143 with one paragraph; the run is intact."""
    import data as data_lib

    def load_data_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the SIGTERM handler should have stopped the run")

    monkeypatch.setattr(data_lib, "load_data", load_data_then_sigterm)
    out = unfinished_copy(baseline, tmp_path / "run")
    before = file_hashes(tmp_path)
    status, _, err = in_process(*SMALL, "--out-dir", out, "--data-dir", data_dir)
    assert status == 128 + signal.SIGTERM
    assert err.startswith("SIGTERM received outside a training step: stopped.") and "Traceback" not in err
    assert file_hashes(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is not runtime.interrupt_now  # main() restored the handlers


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(baseline, data_dir, tmp_path):
    out = tmp_path / "run"
    # Saves in order: ckpt@10, best@20, ckpt@20 <- killed halfway through writing this one's temp file.
    killed = run_model01(out, data_dir, *SMALL, env={"VAE_INJECT_KILL_DURING_SAVE": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert run_files.load_checkpoint(out / "ckpt.pt", "model01")["step"] == 10
    stale = list(out.glob(".ckpt.pt.tmp*"))
    assert len(stale) == 1, "the injected kill should leave a half-written temp file"
    with pytest.raises(Exception):
        torch.load(stale[0], map_location="cpu", weights_only=False)

    # --resume continues from step 10, clears the stale temp file, and ends where the uninterrupted run ends.
    again = run_model01(out, data_dir, *SMALL, "--resume")
    assert again.returncode == 0, again.stderr
    assert f"resuming {out} at step 10" in again.stdout
    assert not list(out.glob(".*.tmp*"))
    assert_same_training_state(load(out / "ckpt.pt"), load(baseline / "ckpt.pt"))


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path, monkeypatch):
    """An exception inside torch.save (as from a signal or a full disk) keeps the old file, removes the temp."""
    path = tmp_path / "ckpt.pt"
    run_files.atomic_torch_save({"step": 1}, path)
    run_files.atomic_write_json(tmp_path / "result.json", {"a": 1})

    def failing_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        run_files.atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert load(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "result.json"]


# ----------------------------------------------------------------------------- non-finite losses


@pytest.fixture
def in_process(monkeypatch, capsys):
    """Call model01 through training.main in this process: returns (exit status, stdout, stderr)."""
    validate = torch.distributions.Distribution._validate_args  # main() switches it off globally
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocess runs: these tiny runs gain nothing from a second thread
    monkeypatch.delenv("VAE_INJECT_NAN", raising=False)
    monkeypatch.delenv("VAE_INJECT_KILL_DURING_SAVE", raising=False)

    def call(*args):
        capsys.readouterr()
        status = training.main(model01.RUNG, model01.build_parser(), [str(a) for a in args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield call
    torch.distributions.Distribution.set_default_validate_args(validate)
    torch.set_num_threads(threads)


def test_nan_loss_at_one_step_is_skipped_and_counted(in_process, monkeypatch, data_dir, tmp_path):
    monkeypatch.setenv("VAE_INJECT_NAN", "14")  # the 15th update (steps count from 1 in logs)
    out = tmp_path / "run"
    status, _, err = in_process(*SMALL, "--out-dir", out, "--data-dir", data_dir)
    assert status == 0, err
    train = {r["step"]: r for r in read_log(out) if r["type"] == "train"}
    assert [train[s]["skipped_total"] for s in (10, 20, 30, 40)] == [0, 1, 1, 1]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in train.values())  # finite means
    assert json.loads((out / "result.json").read_text())["n_skipped"] == 1
    ckpt = load(out / "ckpt.pt")
    assert ckpt["n_skipped"] == 1
    # Adam took 39 of the 40 updates: the skipped one left its moments and step count untouched.
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {39}
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_forever_stops_with_the_step_and_last_finite_metrics(in_process, monkeypatch, data_dir, tmp_path):
    monkeypatch.setenv("VAE_INJECT_NAN", "25:")  # every update from the 26th on
    out = tmp_path / "run"
    status, _, err = in_process(*with_steps(SMALL, 100), "--max-consecutive-skips", "10", "--out-dir", out,
                                "--data-dir", data_dir)
    assert status == 3
    # Skips are read every min(--log-every, --max-consecutive-skips) = 10 steps: 15 in a row at step 40.
    assert "15 consecutive updates were skipped" in err and "from step 26 to step 40" in err
    last_finite = json.loads(err.split("Last finite metrics: ")[1].split("}")[0] + "}")
    assert last_finite["step"] == 30 and last_finite["loss"] > 0  # 5 finite updates in steps 21..30
    assert err.strip().splitlines()[-1].startswith("error: 15 consecutive") and "Traceback" not in err  # one line
    ckpt = run_files.load_checkpoint(out / "ckpt.pt", "model01")  # the last checkpoint is kept, usable
    assert ckpt["step"] == 30 and ckpt["n_skipped"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {25}
    stop = [r for r in read_log(out) if r["type"] == "stop"]
    assert stop and stop[-1]["step"] == 40 and stop[-1]["skipped_total"] == 15
    assert not (out / "result.json").exists()


def test_consecutive_skip_count_survives_resume(in_process, monkeypatch, data_dir, tmp_path):
    """A streak of skips that spans an interruption still stops the run at the same step."""
    out = tmp_path / "run"
    monkeypatch.setenv("VAE_INJECT_NAN", "25:")
    args = [*with_steps(SMALL, 100), "--max-consecutive-skips", "10", "--log-every", "5",
            "--checkpoint-every", "5", "--out-dir", out, "--data-dir", data_dir]
    # Stop the first run at step 30 via --max-steps (a run-control flag), then continue to 100.
    status, _, err = in_process(*with_steps(args, 30))
    assert status == 0, err
    status, _, err = in_process(*args, "--resume")
    assert status == 3, err
    # 5 skips before the checkpoint at 30 + 5 after it: the limit of 10 is reached at step 35.
    assert "10 consecutive updates were skipped" in err and "from step 26 to step 35" in err
    assert '"step": 25' in err.split("Last finite metrics: ")[1]  # remembered across the resume
    assert read_log(out)[-1] == {**read_log(out)[-1], "type": "stop", "step": 35, "skipped_total": 10}


# ----------------------------------------------------------------------------- bad input


def flipped_mnist(tmp_path: Path, data_dir: Path) -> Path:
    """A copy of MNIST/raw with one byte of the test images flipped (same size, wrong md5)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    original = data_dir / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte.gz").symlink_to(original / "train-images-idx3-ubyte.gz")
    payload = bytearray((original / "t10k-images-idx3-ubyte.gz").read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(payload))
    return tmp_path / "data"


def unfinished_copy(baseline: Path, dest: Path) -> Path:
    """The baseline run without its result.json: a run that the same command would resume."""
    dest.mkdir(parents=True)
    for name in ("config.json", "log.jsonl", "ckpt.pt", "best.pt"):
        (dest / name).write_bytes((baseline / name).read_bytes())
    return dest


def _case_setup(case: str, baseline: Path, data_dir: Path, tmp: Path) -> tuple[Path, list]:
    """-> (out_dir, extra args) for one bad-input case; the out-dir holds something worth keeping."""
    out = tmp / "run"
    if case == "data-dir-missing":
        (tmp / "a-file").write_text("not a directory\n")
        return unfinished_copy(baseline, out), ["--data-dir", tmp / "a-file" / "data"]
    if case == "data-corrupted":
        return unfinished_copy(baseline, out), ["--data-dir", flipped_mnist(tmp, data_dir)]
    if case in ("ckpt-garbage", "ckpt-truncated", "ckpt-other-model", "ckpt-weights-only"):
        unfinished_copy(baseline, out)
        ckpt = (baseline / "ckpt.pt").read_bytes()
        if case == "ckpt-garbage":
            (out / "ckpt.pt").write_bytes(b"this is not a checkpoint\n" * 100)
        elif case == "ckpt-truncated":
            (out / "ckpt.pt").write_bytes(ckpt[:len(ckpt) // 2])
        elif case == "ckpt-other-model":
            torch.save({**load(baseline / "ckpt.pt"), "model_name": "model02"}, out / "ckpt.pt")
        else:  # best.pt (weights only, no optimizer) put where a training checkpoint belongs
            (out / "ckpt.pt").write_bytes((baseline / "best.pt").read_bytes())
        return out, []
    if case == "ckpt-other-config":
        return unfinished_copy(baseline, out), ["--hidden", "100"]
    if case == "finished-run":
        out.mkdir()
        for p in baseline.iterdir():
            (out / p.name).write_bytes(p.read_bytes())
        return out, []
    if case == "resume-nothing":
        out.mkdir()
        (out / "notes.txt").write_text("keep me\n")
        return out, ["--resume"]
    if case == "out-dir-not-writable":  # as root chmod does not stop writes; a path under a file does
        (tmp / "a-file").write_text("not a directory\n")
        return tmp / "a-file" / "run", []
    if case == "eval-only-truncated":
        ckpt = (baseline / "best.pt").read_bytes()
        (tmp / "half.pt").write_bytes(ckpt[:len(ckpt) // 3])
        return unfinished_copy(baseline, out), ["--eval-only", "--checkpoint", tmp / "half.pt"]
    if case == "cuda":  # --device may change on resume: the unfinished run is what must stay intact
        return unfinished_copy(baseline, out), ["--device", "cuda"]
    # bad numbers for a new run (in an existing run's out-dir the config check would answer first)
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    return out, {"k0": ["-k", "0"], "batch0": ["--batch-size", "0"], "batch-too-big": ["--batch-size", "100000"],
                 "eval-samples0": ["--eval-samples", "0"], "val-samples0": ["--val-samples", "0"],
                 "max-skips0": ["--max-consecutive-skips", "0"]}[case]


BAD_INPUT = {  # case -> words the one-paragraph message must contain
    "data-dir-missing": "data not found",
    "data-corrupted": "corrupted data file",
    "ckpt-garbage": "is unreadable",
    "ckpt-truncated": "is unreadable",
    "ckpt-other-model": "was written by model02.py, not model01.py",
    "ckpt-weights-only": "holds no optimizer state",
    "ckpt-other-config": "comes from a different config (hidden: checkpoint 200 vs now 100)",
    "finished-run": "holds a finished run",
    "resume-nothing": "--resume: nothing to resume",
    "out-dir-not-writable": "is not writable",
    "k0": "--importance-samples must be >= 1",
    "batch0": "--batch-size must be >= 1",
    "batch-too-big": "exceeds the 59000 training images",
    "eval-samples0": "--eval-samples must be >= 1",
    "val-samples0": "--val-samples must be >= 1",
    "max-skips0": "--max-consecutive-skips must be >= 1",
    "cuda": "no CUDA GPU is visible",
    "eval-only-truncated": "is unreadable",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_one_paragraph_and_changes_nothing(case, in_process, baseline, data_dir, tmp_path):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so --device cuda is not bad input here")
    out, extra = _case_setup(case, baseline, data_dir, tmp_path)
    before = file_hashes(tmp_path)
    status, _, err = in_process(*SMALL, "--out-dir", out, "--data-dir", data_dir, *extra)
    assert status == 2, err
    assert err.startswith("error: ") and BAD_INPUT[case] in err, err
    assert len(err.strip().splitlines()) == 1, err  # one paragraph, no traceback
    assert file_hashes(tmp_path) == before  # nothing written, nothing damaged, nothing left behind


def test_bad_input_exits_2_from_the_command_line(baseline, data_dir, tmp_path):
    """The same, as a real process: exit status 2, one paragraph on stderr, no traceback."""
    out, extra = _case_setup("ckpt-truncated", baseline, data_dir, tmp_path)
    before = file_hashes(tmp_path)
    proc = run_model01(out, data_dir, *SMALL, *extra)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: checkpoint {out / 'ckpt.pt'} is unreadable"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert file_hashes(tmp_path) == before


FAILED_STARTS = {  # case -> (script, flags, words of its one message); none of them can start a run
    "data-missing": ("model02.py", ["--data-dir", "{tmp}/no-data"], "error: data not found"),
    "batch-too-big": ("model01.py", ["--batch-size", "100000"], "exceeds the 59000 training images"),
    "flag-not-a-number": ("model02.py", ["--batch-size", "many"], "error: argument --batch-size: invalid int value"),
    "flag-out-of-range": ("model02.py", ["-k", "0"], "error: --importance-samples must be >= 1"),
}


@pytest.mark.parametrize("case", list(FAILED_STARTS))
def test_a_start_that_fails_leaves_no_out_dir_behind(case, data_dir, tmp_path):
    """The out-dir (and its missing parents) appear when a run starts; when the start fails after creating them
    (no data, a batch larger than the data), they go again. Folders that existed before stay (see the bad-input
    cases above, whose out-dirs exist and keep every file, and the lock test below)."""
    script, flags, message = FAILED_STARTS[case]
    out = tmp_path / "new" / "run"
    proc = run_script(script, "--data-dir", data_dir, "--max-steps", "1", "--device", "cpu", "--out-dir", out,
                      *[f.format(tmp=tmp_path) for f in flags], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if not case.startswith("flag-not"):  # (argparse's own message comes after its usage lines)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "new").exists()


def test_a_start_that_fails_leaves_no_default_out_dir_behind(tmp_path):
    """The same for the default out-dir runs/<run name> (a seed no other run uses names a folder of its own)."""
    import model02
    flags = ["--data-dir", str(tmp_path / "no-data"), "--seed", "7130529", "--device", "cpu"]
    cfg = model02.Config.from_dict(vars(model02.build_parser().parse_args(flags)))
    default = ROOT / "runs" / config.run_name(model02.RUNG, cfg)
    runs_existed = (ROOT / "runs").exists()
    assert not default.exists(), f"{default} exists before the test"
    proc = run_script("model02.py", *flags, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: data not found"), proc.stderr
    assert not default.exists()
    assert (ROOT / "runs").exists() == runs_existed  # a runs/ made for this start goes with it


# ----------------------------------------------------------------------------- wandb


def fake_wandb(init) -> types.ModuleType:
    """A stand-in `wandb` module whose init is `init`."""
    module = types.ModuleType("wandb")
    module.Settings = lambda **kwargs: kwargs
    module.init = init
    return module


FAKE_WANDB_INIT_RAISES = '''
"""Stands in for wandb on a machine without network or key: init fails."""
class Settings:
    def __init__(self, **kwargs):
        pass

def init(**kwargs):
    raise ConnectionError("fake wandb: no network")
'''


def test_wandb_init_failure_downgrades_with_one_warning(data_dir, tmp_path):
    fake = tmp_path / "fake"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(FAKE_WANDB_INIT_RAISES)
    out = tmp_path / "run"
    proc = run_model01(out, data_dir, *with_steps(SMALL, 20), "--wandb",
                       env={"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: wandb") == 1, proc.stderr
    warning = next(line for line in proc.stderr.splitlines() if line.startswith("warning: wandb"))
    assert "fake wandb: no network" in warning and "continuing without wandb" in warning
    assert (out / "result.json").exists()


def test_wandb_log_failure_downgrades_with_one_warning(in_process, monkeypatch, data_dir, tmp_path):
    """A run object whose log() and finish() raise (a dropped connection mid-run)."""
    calls = []

    class BrokenRun:
        def log(self, values, step=None):
            calls.append(step)
            raise OSError("fake wandb: connection reset")

        def finish(self):
            raise OSError("fake wandb: connection reset")

    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(lambda **kwargs: BrokenRun()))
    out = tmp_path / "run"
    status, _, err = in_process(*with_steps(SMALL, 20), "--wandb", "--out-dir", out, "--data-dir", data_dir)
    assert status == 0, err
    assert len(calls) == 1  # after the first failure wandb is dropped, the JSONL log goes on
    assert err.count("warning: wandb") == 1 and "continuing without wandb" in err
    assert [r["type"] for r in read_log(out)][-2:] == ["done", "test"]


def test_wandb_online_failure_falls_back_to_offline_then_to_none(monkeypatch, capsys, tmp_path):
    """With a key but no network: one warning, offline logging; if offline fails too: one warning, no wandb."""
    modes = []

    def init_online_fails(mode, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise TimeoutError("fake wandb: no route to host\n(retried for 30 s)")
        return "offline run"

    monkeypatch.setenv("WANDB_API_KEY", "fake-key")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(init_online_fails))
    assert run_files.init_wandb(model01.Config(), "run", tmp_path) == "offline run"
    assert modes == ["online", "offline"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: wandb could not start online (TimeoutError: fake wandb:")
    assert "logging offline" in err

    def init_always_fails(mode, **kwargs):
        raise RuntimeError(f"fake wandb: {mode} broken")

    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(init_always_fails))
    assert run_files.init_wandb(model01.Config(), "run", tmp_path) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "online broken" in err and "continuing without wandb" in err


@pytest.mark.skipif(os.environ.get("VAE_SLOW_TESTS") != "1",
                    reason="a real offline wandb run costs ~20 s (service start-up); set VAE_SLOW_TESTS=1")
def test_real_wandb_offline_never_prompts(data_dir, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no key: offline
    proc = subprocess.run([sys.executable, "model01.py", *with_steps(SMALL, 20), "--wandb", "--out-dir", str(out),
                           "--data-dir", str(data_dir)], cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert list((out / "wandb").glob("offline-run-*"))
    assert (out / "result.json").exists()


def test_a_second_run_on_an_out_dir_in_use_is_refused_and_the_lock_ends_with_the_run(data_dir, tmp_path, capsys):
    """Two processes writing one out-dir (a campaign started twice, one command in two shells) would interleave
    their checkpoints: the second stops before writing anything. The lock is the kernel's (flock), held until the
    run returns, so a finished or killed run leaves nothing that blocks the next."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)  # another process's lock on the folder (its own open file)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        code = training.main(model01.RUNG, model01.build_parser(),
                             ["--out-dir", str(out), "--data-dir", str(data_dir), *SMALL])
        assert code == 2 and "is in use by another running process" in capsys.readouterr().err
        assert list(out.iterdir()) == []  # nothing written
    finally:
        os.close(holder)
    # a run that takes the lock and then fails (no data there) releases it when main returns
    code = training.main(model01.RUNG, model01.build_parser(),
                         ["--out-dir", str(out), "--data-dir", str(tmp_path / "no-data"), *SMALL])
    assert code == 2 and "in use" not in capsys.readouterr().err
    assert out.is_dir()  # it existed before this failed start: empty, it still stays
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the run still held it
    finally:
        os.close(fd)


def test_train_records_come_every_log_every_steps_whatever_the_skip_check(data_dir, tmp_path):
    """Consecutive skips are read every min(--log-every, --max-consecutive-skips) steps; a log line is due every
    --log-every steps even when that is no multiple of the skip check (500 vs 200 wrote one line per 1000)."""
    out = tmp_path / "run"
    proc = run_script("model01.py", "--quick", "--data-dir", data_dir, "--device", "cpu", "--max-steps", "60",
                      "--log-every", "30", "--max-consecutive-skips", "20", "--val-every", "60", "--n-test", "10",
                      "--eval-samples", "2", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [30, 60]
