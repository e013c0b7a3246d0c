"""Long runs cut into segments (--segment-minutes): training and the test evaluation stop at a deadline, save
their state and exit 75, and the same command continues them; the chained segments must give exactly what
one uninterrupted run gives. The partial test evaluation (test_eval.pt) belongs to one set of weights and
settings, and survives SIGINT/SIGTERM.

The deadline is made deterministic by VAE_INJECT_SEGMENT_END=1, which makes runtime.segment_deadline "already
passed": each invocation then trains up to the next log step, or evaluates one pass, and stops.
"""
import json
import math

import pytest
import torch

import evaluation
import model01
import runtime
from data import Split
from test_reliability import SMALL, assert_same_training_state, file_hashes, in_process, load, read_log  # noqa: F401

SEGMENTED = [*SMALL, "--eval-chunk", "50", "--segment-minutes", "60"]  # 50 latents per pass: 10 images of S=5


def test_chained_segments_match_an_uninterrupted_run(in_process, monkeypatch, data_dir, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "segmented"
    flags = ["--data-dir", data_dir, *SEGMENTED]
    status, _, err = in_process("--out-dir", reference, *flags)  # 60 minutes: never reached
    assert status == 0, err

    monkeypatch.setenv("VAE_INJECT_SEGMENT_END", "1")  # always already passed
    statuses, messages = [], []
    while not statuses or statuses[-1] == runtime.EXIT_SEGMENT_END:
        assert len(statuses) < 20, messages[-1]
        status, _, err = in_process("--out-dir", out, *flags)
        statuses.append(status)
        messages.append(err)
    assert statuses[-1] == 0, messages[-1]
    # 40 steps logged every 10: 3 training segments end at steps 10, 20, 30; the 4th trains to 40 and evaluates one
    # pass (10 of 50 test images); 4 more passes, the last of which writes result.json
    assert len(statuses) == 8
    assert "the segment ended after step 10/40" in messages[0] and "Run the same command again" in messages[0]
    assert "the segment ended during the test evaluation" in messages[3]
    assert not (out / "test_eval.pt").exists()  # removed once result.json is written

    got, want = (json.loads((d / "result.json").read_text()) for d in (out, reference))
    assert got["test_ll_nats"] == want["test_ll_nats"] and got["test_ll_stderr"] == want["test_ll_stderr"]
    # every image's bound, not only their mean: the file is byte-identical (hence also its sha256 in result.json)
    assert (out / got["test_ll_per_image"]).read_bytes() == (reference / want["test_ll_per_image"]).read_bytes()
    assert got["test_ll_per_image_sha256"] == want["test_ll_per_image_sha256"]
    assert (got["eval_segments"], want["eval_segments"]) == (5, 1)
    # where each evaluating invocation started: at 0 and after each pass of 10 images, on this machine
    assert [seg["from_image"] for seg in got["eval_segment_log"]] == [0, 10, 20, 30, 40]
    assert {seg["device"] for seg in got["eval_segment_log"]} == {runtime.device_name(torch.device("cpu"))}
    assert [seg["from_image"] for seg in want["eval_segment_log"]] == [0]
    assert got["steps"] == want["steps"] == 40 and got["best_step"] == want["best_step"]
    assert_same_training_state(load(out / "ckpt.pt"), load(reference / "ckpt.pt"))
    log = read_log(out)
    assert [r["step"] for r in log if r["type"] == "segment_end"] == [10, 20, 30]
    assert sum(r["type"] == "done" for r in log) == 1  # the resumed evaluations do not repeat it
    assert sum(r["type"] == "resume" for r in log) == 7


def test_a_partial_test_evaluation_belongs_to_its_settings(in_process, monkeypatch, data_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--out-dir", out, "--data-dir", data_dir, *SEGMENTED]
    assert in_process(*flags)[0] == 0
    evaluation = tmp_path / "eval"
    eval_flags = ["--eval-only", "--checkpoint", out / "best.pt", "--out-dir", evaluation, "--data-dir", data_dir,
                  "--eval-samples", "5", "--eval-chunk", "50", "--segment-minutes", "60"]
    monkeypatch.setenv("VAE_INJECT_SEGMENT_END", "1")
    status, _, err = in_process(*eval_flags)
    assert status == runtime.EXIT_SEGMENT_END, err
    assert (evaluation / "test_eval.pt").exists() and not (evaluation / "result.json").exists()
    before = file_hashes(evaluation)
    for changed in (["--eval-samples", "6"], ["--eval-chunk", "25"], ["--seed", "3"]):
        status, _, err = in_process(*eval_flags, *changed)
        assert status == 2 and "belongs to other weights or settings" in err, err
        assert "delete it to start the test evaluation over" in err
        assert file_hashes(evaluation) == before  # nothing lost
    (evaluation / "test_eval.pt").write_bytes(b"not a checkpoint")
    status, _, err = in_process(*eval_flags)
    assert status == 2 and "is unreadable" in err, err


def test_a_state_saved_before_the_segment_log_existed_continues_with_its_device_unknown(in_process, monkeypatch,
                                                                                         data_dir, tmp_path):
    out = tmp_path / "run"
    assert in_process("--out-dir", out, "--data-dir", data_dir, *SEGMENTED)[0] == 0
    evaluation = tmp_path / "eval"
    eval_flags = ["--eval-only", "--checkpoint", out / "best.pt", "--out-dir", evaluation, "--data-dir", data_dir,
                  "--eval-samples", "5", "--eval-chunk", "50", "--segment-minutes", "60"]
    with monkeypatch.context() as m:
        m.setenv("VAE_INJECT_SEGMENT_END", "1")  # one pass of 10 images
        assert in_process(*eval_flags)[0] == runtime.EXIT_SEGMENT_END
    state = load(evaluation / "test_eval.pt")
    assert [seg["from_image"] for seg in state["segment_log"]] == [0]
    del state["segment_log"]  # as the code of an earlier commit wrote it
    torch.save(state, evaluation / "test_eval.pt")
    status, _, err = in_process(*eval_flags)
    assert status == 0, err
    log = json.loads((evaluation / "result.json").read_text())["eval_segment_log"]
    assert log[0] == {"from_image": 0, "device": None, "git_commit": None}
    assert log[1]["from_image"] == 10 and log[1]["device"] == runtime.device_name(torch.device("cpu"))


def test_segment_minutes_must_not_be_negative(in_process, data_dir, tmp_path):
    status, _, err = in_process("--out-dir", tmp_path / "run", "--data-dir", data_dir, *SMALL, "--segment-minutes", "-1")
    assert status == 2 and "--segment-minutes must be >= 0" in err


# ----------------------------------------------------------------------------- evaluate_bound on its own


class NoisyModel(torch.nn.Module):
    """log w = x-dependent offset + Gaussian noise drawn inside forward (as a real model draws z)."""

    def __init__(self, raise_on_call: int = 0):
        super().__init__()
        self.calls, self.raise_on_call = 0, raise_on_call

    def forward(self, x, k):
        self.calls += 1
        if self.calls == self.raise_on_call:
            raise runtime.Interrupted("SIGTERM", 15)
        noise = torch.randn(k, x.shape[0])
        return {"log_px_z": x.flatten(1).sum(1) + noise, "log_pz": torch.zeros(k, x.shape[0]),
                "log_qz": torch.zeros(k, x.shape[0])}


@pytest.fixture
def split():
    images = torch.randint(0, 2, (23, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Split(images, binary=True, dynamic_binarize=False)


def test_evaluate_bound_resumes_bit_identically_after_a_deadline(split):
    want = evaluation.evaluate_bound(NoisyModel(), split, 30, seed=4, chunk=90)  # 3 images of 30 samples per pass
    records, calls, progress = [], 0, None
    while True:
        calls += 1
        got = evaluation.evaluate_bound(NoisyModel(), split, 30, seed=4, chunk=90, resume=progress,
                                      deadline=-math.inf, on_save=records.append)
        if got is not None:
            break
        progress = records[-1]
        assert progress["done"] == min(3 * calls, 23)  # one pass per in_process, then the deadline
    assert calls == 8
    assert torch.equal(got, want)


def test_evaluate_bound_saves_its_progress_when_interrupted(split):
    want = evaluation.evaluate_bound(NoisyModel(), split, 30, seed=4, chunk=90)
    records = []
    with pytest.raises(runtime.Interrupted):  # in the middle of the 4th pass
        evaluation.evaluate_bound(NoisyModel(raise_on_call=4), split, 30, seed=4, chunk=90, on_save=records.append)
    assert len(records) == 1 and records[0]["done"] == 9  # the three passes that finished
    assert torch.equal(records[0]["ll"], want[:9])
    rest = evaluation.evaluate_bound(NoisyModel(), split, 30, seed=4, chunk=90, resume=records[0])
    assert torch.equal(rest, want)
    # and the caller's random state is untouched by all of it
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    evaluation.evaluate_bound(NoisyModel(), split, 30, seed=4, chunk=90, resume=records[0])
    assert torch.equal(torch.rand(3), expected)
