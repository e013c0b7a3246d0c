"""torchrun: 2 processes (gloo on CPU) train exactly what one process trains on the same global batch.

The importance samples differ between processes and a single process (each draws its own noise), so
the exact comparison uses a test rung without sampling (every "importance sample" is the encoder's
output): then 2 x 20 images per step must give the parameters of 1 x 40 images per step to float
tolerance. That checks the batch sharding, DDP's gradient averaging, the skip logic (a NaN on one
process only must skip the step on both, as the NaN in the global batch skips it in one process),
the EMA, the sharded validation and test evaluation with gather, and that only process 0 writes: the
test rung records every file each process opens for writing or renames into place. model01 itself
then runs under torchrun for a few steps, to show the real script works distributed.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script

import evaluation
import runtime
import training

TINY_RUNG = textwrap.dedent('''
    """A deterministic rung for the torchrun test: no sampling, so any process layout gives the same run."""
    import argparse, builtins, io, os, sys
    sys.path.insert(0, {root!r})
    import torch
    from torch import nn
    import config
    import training

    RANK = os.environ.get("RANK", "0")
    _open, _replace = builtins.open, os.replace

    def _note(path):  # every write of this process, one path per line
        with _open(os.path.join({record_dir!r}, f"writes_rank{{RANK}}.txt"), "a") as f:
            f.write(f"{{path}}\\n")

    def recording_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _note(file)
        return _open(file, mode, *args, **kwargs)

    def recording_replace(src, dst, *args, **kwargs):
        _note(dst)
        return _replace(src, dst, *args, **kwargs)

    builtins.open = io.open = recording_open  # pathlib, PIL and torch.save all open through these
    os.replace = recording_replace

    if RANK == os.environ.get("TINY_NAN_RANK"):  # fault injection on this process only
        os.environ["VAE_INJECT_NAN"] = os.environ["TINY_NAN_STEP"]


    class Deterministic(nn.Module):
        """z = encoder(x) for every importance sample; log q(z|x) = 0; Bernoulli-style log p(x|z)."""

        def __init__(self, cfg, info):
            super().__init__()
            self.image_shape = info.shape
            self.encoder = nn.Linear(info.num_dims, 4)
            self.decoder = nn.Linear(4, info.num_dims)

        def forward(self, x, k):
            z = self.encoder(x.flatten(1))  # [B, 4]
            logits = self.decoder(torch.tanh(z))  # [B, D]
            log_px_z = -nn.functional.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(1)
            log_pz = -0.5 * (z ** 2).sum(1)
            return {{"log_px_z": log_px_z.expand(k, -1), "log_pz": log_pz.expand(k, -1),
                     "log_qz": torch.zeros(k, x.shape[0], device=x.device)}}  # each [k, B]

        def reconstruct(self, x):
            return torch.sigmoid(self.decoder(torch.tanh(self.encoder(x.flatten(1))))).reshape(-1, *self.image_shape)

        def sample(self, n):
            z = torch.linspace(-2, 2, n * 4).reshape(n, 4)
            return torch.sigmoid(self.decoder(torch.tanh(z))).reshape(n, *self.image_shape)


    RUNG = training.Rung(name="tiny", config_class=config.TrainConfig, build_model=Deterministic,
                         likelihood=lambda cfg, info: "bernoulli-test")

    if __name__ == "__main__":
        parser = argparse.ArgumentParser()
        config.add_common_args(parser, config.TrainConfig(dataset="mnist"))
        training.run_script(RUNG, parser)
''')

TRAIN_FLAGS = ["--dataset", "mnist", "--device", "cpu", "--max-steps", "6", "--batch-size", "40", "--lr", "0.01",
               "--lr-schedule", "constant", "--log-every", "2", "--checkpoint-every", "3", "--val-every", "3",
               "--val-samples", "2", "--eval-samples", "3", "--n-test", "31", "--ema-decay", "0.5"]
NAN_STEP = "3"  # step index whose loss is NaN (on process 1 only under torchrun; in the whole batch otherwise)
EXPECTED_FILES = {"config.json", "log.jsonl", "ckpt.pt", "best.pt", "result.json", "test_ll_nats.npy", "tiny_imgs.png",
                  "tiny_recs.png", "tiny_samples.png"}


def torchrun(script, *args, env=None, timeout=300):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *map(str, args)], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def failure(proc) -> str:
    """The workers' own error (torchrun's summary at the end of stderr hides it) and the output tails."""
    start = proc.stderr.find("Traceback")
    # what came before the first traceback too: a worker killed by a signal (a C++ abort in gloo, say) prints its
    # reason there, and the first traceback is then torchrun's own
    before = proc.stderr[max(0, start - 2000):start] if start > 0 else ""
    return (before + "\n...\n" + (proc.stderr[start:start + 4000] if start >= 0 else "") + "\n...\n"
            + proc.stdout[-1500:] + proc.stderr[-1500:])


def records(out_dir, record_type):
    lines = (out_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == record_type]


def test_two_processes_train_what_one_process_trains(tmp_path, data_dir):
    record_dir = tmp_path / "writes"
    record_dir.mkdir()
    script = tmp_path / "tiny.py"
    script.write_text(TINY_RUNG.format(root=str(ROOT), record_dir=str(record_dir)))
    single, double = tmp_path / "single", tmp_path / "double"
    flags = [*TRAIN_FLAGS, "--data-dir", data_dir]

    one = run_script(str(script), *flags, "--out-dir", single, env={"VAE_INJECT_NAN": NAN_STEP, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, failure(one)
    (record_dir / "writes_rank0.txt").rename(record_dir / "single_process.txt")
    two = torchrun(script, *flags, "--out-dir", double, env={"TINY_NAN_RANK": "1", "TINY_NAN_STEP": NAN_STEP})
    assert two.returncode == 0, failure(two)

    # parameters, EMA and optimizer state after 6 steps (one of them skipped) agree to float tolerance
    a = torch.load(single / "ckpt.pt", weights_only=False)
    b = torch.load(double / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert a["n_skipped"] == b["n_skipped"] == 1
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b["ema"][key], a["ema"][key], rtol=1e-4, atol=1e-6)
    best_a = torch.load(single / "best.pt", weights_only=False)
    best_b = torch.load(double / "best.pt", weights_only=False)
    assert best_a["best_step"] == best_b["best_step"] and best_a["step"] == best_b["step"]
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert state_a["step"].item() == state_b["step"].item() == 5  # the NaN step moved nothing
        torch.testing.assert_close(state_b["exp_avg_sq"], state_a["exp_avg_sq"], rtol=1e-3, atol=1e-9)

    # the logged (global-batch) losses, validation and test bounds agree; the test set was split and gathered
    for kind, field in (("train", "loss"), ("val", "val_bound_nats")):
        values_a = [r[field] for r in records(single, kind)]
        values_b = [r[field] for r in records(double, kind)]
        assert len(values_a) == len(values_b) > 0
        assert [v is None for v in values_a] == [v is None for v in values_b]
        assert values_b == pytest.approx(values_a, rel=1e-5)
    result_a, result_b = (json.loads((d / "result.json").read_text()) for d in (single, double))
    assert (result_a["world_size"], result_b["world_size"]) == (1, 2)
    assert result_a["n_test"] == result_b["n_test"] == 31
    assert result_b["test_ll_nats"] == pytest.approx(result_a["test_ll_nats"], rel=1e-5)
    assert result_b["test_ll_stderr"] == pytest.approx(result_a["test_ll_stderr"], rel=1e-4)
    # image by image, in test-set order: process r evaluated images r, r + 2, ...; gathered, they are put back
    per_image_a, per_image_b = (np.load(d / r["test_ll_per_image"])
                                for d, r in ((single, result_a), (double, result_b)))
    assert per_image_a.shape == per_image_b.shape == (31,)
    np.testing.assert_allclose(per_image_b, per_image_a, rtol=1e-5)
    assert per_image_a.mean() == pytest.approx(result_a["test_ll_nats"], rel=1e-12)

    # only process 0 wrote, each record once
    assert not (record_dir / "writes_rank1.txt").exists(), (record_dir / "writes_rank1.txt").read_text()
    written = (record_dir / "writes_rank0.txt").read_text().split()
    assert written and all(p.startswith(str(double)) for p in written)
    assert {os.path.basename(p) for p in written} >= EXPECTED_FILES
    assert {p.name for p in double.iterdir()} == {p.name for p in single.iterdir()} == EXPECTED_FILES
    for kind in ("config", "done", "test"):
        assert len(records(double, kind)) == 1
    assert len(records(double, "train")) == len(records(single, "train")) == 3
    assert two.stdout.count("test L_3 on 31 images") == 1


def test_model01_under_torchrun(tmp_path, data_dir):
    out = tmp_path / "run"
    proc = torchrun("model01.py", "--data-dir", data_dir, "--device", "cpu", "--max-steps", "4", "--batch-size", "20",
                    "--val-every", "4", "--val-samples", "2", "--n-test", "10", "--eval-samples", "5",
                    "--log-every", "2", "--out-dir", out)
    assert proc.returncode == 0, failure(proc)
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["n_test"] == 10 and result["steps"] == 4
    assert -800 < result["test_ll_nats"] < -100  # an untrained model on binarized MNIST: about -540 nats
    assert result["n_skipped"] == 0
    for kind, count in (("config", 1), ("train", 2), ("val", 1), ("done", 1), ("test", 1)):
        assert len(records(out, kind)) == count, kind
    assert {p.name for p in out.iterdir()} == {"config.json", "log.jsonl", "ckpt.pt", "best.pt", "result.json",
                                              "test_ll_nats.npy", "model01_imgs.png", "model01_recs.png", "model01_samples.png"}
    assert proc.stdout.count("test L_5 on 10 images") == 1


def test_two_processes_continue_segments_and_a_partial_test_evaluation(tmp_path, data_dir):
    """Under torchrun each process keeps its own test_eval.rank<r>.pt; the processes agree on when a segment ends
    (here every log step and every evaluation pass: VAE_INJECT_SEGMENT_END), and the chain of segments gives the
    test number of one uninterrupted 2-process run. The ranks hold 16 and 15 test images, 5 per pass, so rank 1
    finishes one segment before rank 0 and must keep its finished values meanwhile."""
    record_dir = tmp_path / "writes"
    record_dir.mkdir()
    script = tmp_path / "tiny.py"
    script.write_text(TINY_RUNG.format(root=str(ROOT), record_dir=str(record_dir)))
    flags = [*TRAIN_FLAGS, "--data-dir", data_dir, "--eval-chunk", "15", "--segment-minutes", "60"]
    whole, segmented = tmp_path / "whole", tmp_path / "segmented"
    proc = torchrun(script, *flags, "--out-dir", whole)
    assert proc.returncode == 0, failure(proc)
    codes = []
    while not codes or codes[-1] == runtime.EXIT_SEGMENT_END:
        assert len(codes) < 12, failure(proc)
        proc = torchrun(script, *flags, "--out-dir", segmented, env={"VAE_INJECT_SEGMENT_END": "1"})
        # torchrun exits 1 whenever a worker exits non-zero; its summary names the workers' own status
        ended = proc.returncode == 1 and f"exitcode  : {runtime.EXIT_SEGMENT_END}" in proc.stderr \
            and "Run the same command again" in proc.stderr
        codes.append(runtime.EXIT_SEGMENT_END if ended else proc.returncode)
    assert codes[-1] == 0, failure(proc)
    # training segments end at steps 2 and 4; the third trains to 6 and evaluates a pass; 3 more passes on rank 0
    assert len(codes) == 6, codes
    got, want = (json.loads((d / "result.json").read_text()) for d in (segmented, whole))
    assert got["test_ll_nats"] == want["test_ll_nats"] and got["n_test"] == want["n_test"] == 31
    assert got["eval_segments"] == 4
    assert not list(segmented.glob("test_eval*.pt"))


def test_an_out_dir_in_use_stops_every_process_with_the_same_error(tmp_path, data_dir):
    """Process 0 takes the out-dir's lock for all; when another run holds it, every process must stop with status
    2 before training, not process 0 alone while the other goes on into its first collective and aborts."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        proc = torchrun("model01.py", "--data-dir", data_dir, "--device", "cpu", "--max-steps", "4", "--batch-size",
                        "20", "--out-dir", out, timeout=120)
    finally:
        os.close(holder)
    assert proc.returncode == 1, failure(proc)  # torchrun's status when a worker fails
    # the first to exit 2 makes torchrun SIGTERM the other, which may not have exited yet: one "exitcode : 2" at least
    assert "exitcode  : 2" in proc.stderr and "SIGABRT" not in proc.stderr, failure(proc)
    assert "is in use by another running process" in proc.stderr
    assert list(out.iterdir()) == []


class _Exited(Exception):
    pass


def test_run_script_leaves_a_torchrun_worker_through_os_exit_with_mains_status(monkeypatch, capsys):
    """A torchrun worker skips interpreter shutdown, where gloo threads that DDP keeps alive abort the process
    now and then (training.run_script); the exit status must still be main's, whatever way main ends."""
    statuses = []

    def fake_os_exit(status):
        statuses.append(status)
        raise _Exited

    def broken_main(rung, parser):
        raise RuntimeError("a bug in main")

    def bad_flags(rung, parser):
        raise SystemExit(2)  # what argparse raises after printing its usage

    monkeypatch.setattr(training.os, "_exit", fake_os_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for main, expected in ((lambda rung, parser: 0, 0), (lambda rung, parser: 3, 3), (broken_main, 1),
                           (bad_flags, 2)):
        monkeypatch.setattr(training, "main", main)
        with pytest.raises(_Exited):
            training.run_script(None, None)
        assert statuses[-1] == expected
    assert "RuntimeError: a bug in main" in capsys.readouterr().err  # the traceback is shown, not swallowed

    # one process without torchrun: a plain sys.exit, interpreter shutdown as usual
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(training, "main", lambda rung, parser: 4)
    with pytest.raises(SystemExit) as exited:
        training.run_script(None, None)
    assert exited.value.code == 4 and len(statuses) == 4


@pytest.mark.parametrize("n, world_size", [(10, 3), (31, 2), (5, 1), (2, 4)])
def test_gathered_per_image_values_go_back_to_test_set_order(n, world_size):
    images = torch.arange(n, dtype=torch.float64)  # each image's value is its index
    split = training.data_lib.Split(images, True, False)
    shards = [evaluation.shard(split, runtime.DistInfo(rank, world_size, rank)).images
              for rank in range(world_size)]
    gathered = torch.cat(shards)  # what gather_per_image returns: process 0's values, then process 1's, ...
    assert torch.equal(evaluation.in_split_order(gathered, world_size), images)
