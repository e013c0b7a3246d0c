"""Checkpoints written by the code before training.py was split into config.py, runtime.py, run_files.py,
evaluation.py and publishing.py (commit PRE_SPLIT) resume bit-exactly with the code of this tree.

How: the pre-split code is taken from git history (`git archive PRE_SPLIT`) into a temporary folder and runs a tiny
model01 and model04 run whose first segment ends at once (VAE_INJECT_SEGMENT_END=1: at the first log step, 10 of 20
steps); this tree's code then continues the same out-dir to the end. Weights, EMA weights, Adam moments, data order,
random state and counters of ckpt.pt, the best weights and every per-image test bound must equal those of an
uninterrupted run of this tree's code.

Why history rather than a committed fixture checkpoint: a fixture pins one file written once, and its expected
hashes would have to be regenerated (by the old code) whenever the data or a model changes; running the old code
itself checks the real format, every key the old code wrote, and follows the data as it is. It needs the commit in
the clone: a shallow clone skips with the reason (CI checks out the full history).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from test_reliability import assert_same_training_state, load

PRE_SPLIT = "799411e"  # the last commit whose training.py held the whole loop (1,622 lines)
PRE_SPLIT_CODE = ["training.py", "data.py", "distributions.py", "layers.py", "model01.py", "model04.py"]

# 20 steps, logged and checkpointed every 10, validated every 10; EMA on, so the resume must restore it too.
# --segment-minutes 60 is never reached by itself; VAE_INJECT_SEGMENT_END=1 ends the first segment at step 10.
COMMON = ["--max-steps", "20", "--log-every", "10", "--checkpoint-every", "10", "--val-every", "10",
          "--val-samples", "2", "--n-test", "20", "--eval-samples", "5", "--eval-chunk", "50",
          "--lr-schedule", "constant", "--ema-decay", "0.9", "--device", "cpu", "--segment-minutes", "60"]
RUNGS = {
    "model01": ["--batch-size", "50"],
    "model04": ["--dataset", "binarized-mnist", "--batch-size", "16", "--width", "8", "--latent-channels", "2",
                "--latent-layers", "2", "--downsamplings", "2", "--encoder-blocks", "1", "--warmup-steps", "0"],
}
ENV = {"OMP_NUM_THREADS": "1", "VAE_INJECT_NAN": "", "VAE_INJECT_KILL_DURING_SAVE": "", "VAE_INJECT_SEGMENT_END": ""}


def pre_split_env() -> dict:
    """The pre-split run's environment: without PYTHONPATH (which could reach this tree's modules), its first
    segment ending at once."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **ENV, "VAE_INJECT_SEGMENT_END": "1"}


@pytest.fixture(scope="module")
def pre_split_code(tmp_path_factory):
    """The pre-split scripts, extracted from git history into a folder of their own."""
    found = subprocess.run(["git", "cat-file", "-e", f"{PRE_SPLIT}^{{commit}}"], cwd=ROOT, capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {PRE_SPLIT} (the code before the split) is not in this clone's history, e.g. a shallow "
                    f"clone; fetch the full history (`git fetch --unshallow`) to run this test")
    folder = tmp_path_factory.mktemp("pre_split")
    archive = subprocess.run(["git", "archive", PRE_SPLIT, *PRE_SPLIT_CODE], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    assert len((folder / "training.py").read_text().splitlines()) > 1000  # really the code before the split
    return folder


@pytest.mark.parametrize("rung", list(RUNGS))
def test_a_checkpoint_written_before_the_split_resumes_bit_exactly(rung, pre_split_code, data_dir, tmp_path):
    flags = ["--data-dir", data_dir, *COMMON, *RUNGS[rung]]
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    proc = run_script(f"{rung}.py", *flags, "--out-dir", reference, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr

    old = subprocess.run([sys.executable, f"{rung}.py", *map(str, flags), "--out-dir", str(out)], cwd=pre_split_code,
                         env=pre_split_env(), capture_output=True, text=True,
                         timeout=600)
    assert old.returncode == 75, old.stderr  # the pre-split code's segment end
    written_before = load(out / "ckpt.pt")
    assert written_before["step"] == 10 and not (out / "result.json").exists()

    proc = run_script(f"{rung}.py", *flags, "--out-dir", out, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming {out} at step 10" in proc.stdout
    assert_same_training_state(load(out / "ckpt.pt"), load(reference / "ckpt.pt"))
    got_best, want_best = load(out / "best.pt"), load(reference / "best.pt")
    assert got_best["best_step"] == want_best["best_step"]
    for name, value in want_best["ema"].items():
        assert torch.equal(got_best["ema"][name], value), f"best.pt ema.{name} differs"
    got, want = (json.loads((d / "result.json").read_text()) for d in (out, reference))
    assert got["test_ll_nats"] == want["test_ll_nats"]
    assert (out / got["test_ll_per_image"]).read_bytes() == (reference / want["test_ll_per_image"]).read_bytes()
