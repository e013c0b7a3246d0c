"""campaign.py: every job is a valid command of its script, and `status` reads what segmented runs leave behind."""
import dataclasses
import importlib
import json
import os
from pathlib import Path

import pytest
import torch

import campaign
import campaign_jobs
import config
import run_files
import runtime
from conftest import ROOT, run_script
from test_segments import SEGMENTED, in_process  # noqa: F401  (fixture)


def _published_checkpoints(root):
    """The checkpoints the fashion-mnist re-scores read, as files under a stand-in repository root: a re-score whose
    checkpoint does not exist waits for it (job_status)."""
    (root / "checkpoints").mkdir(exist_ok=True)
    for name in ("model02_fashion-mnist_iwae_k5_seed0", "model03_fashion-mnist_iwae_k5_seed0"):
        (root / "checkpoints" / f"{name}.pt").write_bytes(b"weights")


@pytest.mark.parametrize("job", campaign.JOBS, ids=lambda job: job.name)
def test_every_job_is_a_valid_command_of_its_script(job):
    cmd = job.command(minutes=150, data_dir="../shared/data")
    assert cmd[:2] == ["python", job.script] and cmd[-2:] == ["--segment-minutes", "150"]
    assert ("--publish" in cmd) != job.pilot  # a pilot never publishes
    module = importlib.import_module(job.script[:-3])
    args = module.build_parser().parse_args(cmd[2:])  # a typo in a flag exits here
    cfg = module.RUNG.config_class.from_dict(vars(args))
    config.validate_config(cfg)
    assert cfg.out_dir == f"campaign/{job.name}" and cfg.device == "cpu"
    if job.pilot:  # validation only, for an hour of training
        assert cfg.no_test and cfg.max_train_minutes == campaign.PILOT_MINUTES and job.name.startswith("pilot_")
    elif cfg.eval_only:  # a re-score: of a published checkpoint (or one a training job before it publishes)
        trained_before = [j.name for j in campaign.JOBS[:campaign.JOBS.index(job)] if not j.pilot]
        assert (ROOT / cfg.checkpoint).is_file() or Path(cfg.checkpoint).stem in trained_before
        assert cfg.eval_samples == 5000 and cfg.n_test == 0  # the story's S, on the whole test set
        assert job.name == f"{'perimage' if job.needs_per_image else 'eval5000'}_{Path(cfg.checkpoint).stem}"
        assert job.published_result == f"results/{Path(cfg.checkpoint).stem}.json"
    else:  # a training job keeps the run's name, so publishing replaces the row it improves
        assert job.name == config.run_name(module.RUNG, cfg)


@pytest.mark.parametrize("native", [True, False, None])
def test_model01_trains_in_bf16_only_where_the_cpu_has_it_natively(native, monkeypatch):
    """Emulated bf16 is several times slower than float32, so the job asks for it only on a CPU with
    AVX512-BF16/AMX (None: cannot tell, then float32)."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    job = next(j for j in campaign.JOBS if j.script == "model01.py")
    cmd = job.command(minutes=10, data_dir=None)
    assert ("--cpu-bf16" in cmd) == bool(native)
    args = importlib.import_module("model01").build_parser().parse_args(cmd[2:])
    assert args.cpu_bf16 == bool(native) and args.out_dir == job.out_dir
    assert all("--cpu-bf16" not in j.command(10, None) for j in campaign.JOBS if not j.bf16_where_native)


def test_cpu_has_native_bf16_reads_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    expected = None if flags is None else ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert runtime.cpu_has_native_bf16() is expected


def test_a_rescore_published_at_s5000_by_another_run_is_finished(monkeypatch, tmp_path):
    """The GPU script may publish a re-score first (gpu_campaign_unpack.sh --apply): then the CPU job is done."""
    job = campaign.rescore("model03_fashion-mnist_iwae_k5_seed0")
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [job])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model03_fashion-mnist_iwae_k5_seed0.pt").write_bytes(b"weights")
    (tmp_path / "results").mkdir()
    published = tmp_path / job.published_result
    published.write_text(json.dumps({"eval_samples": 100, "test_ll_nats": -1950.2, "n_test": 10000, "device": "CPU"}))
    assert campaign.job_status(job)["state"] == "not started"
    lanes = campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path)
    assert lanes.next_job() is job
    published.write_text(json.dumps({"eval_samples": 5000, "test_ll_nats": -1948.7, "n_test": 10000, "device": "H200"}))
    status = campaign.job_status(job)
    assert status["state"] == "finished" and "L_5000 = -1948.70 nats on 10000 images by another run" in status["detail"]
    assert campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path).next_job() is None


def test_a_per_image_rescore_runs_until_the_published_row_has_per_image_values(monkeypatch, tmp_path):
    """A row published at S=5000 without per-image values: its S=5000 re-score is finished, its per-image re-score
    (another out-dir) is not, until a result with them is published (by this job, or the GPU script)."""
    name = "model03_fashion-mnist_iwae_k5_seed0"
    first, again = campaign.rescore(name), campaign.rescore(name, per_image=True)
    assert again.name != first.name and again.command(None, None) == [
        *first.command(None, None)[:-3], "--out-dir", again.out_dir, "--publish"]
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [first, again])
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / f"{name}.pt").write_bytes(b"weights")
    (tmp_path / "results").mkdir()
    published = tmp_path / again.published_result
    row = {"eval_samples": 5000, "test_ll_nats": -1937.61, "n_test": 10000, "device": "CPU"}
    published.write_text(json.dumps(row))
    assert campaign.job_status(first)["state"] == "finished"
    assert campaign.job_status(again)["state"] == "not started"
    assert campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path).next_job() is again
    published.write_text(json.dumps({**row, "test_ll_per_image": f"per_image/{name}.npy"}))
    status = campaign.job_status(again)
    assert status["state"] == "finished" and "by another run with per-image values" in status["detail"], status
    assert campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path).next_job() is None
    assert not campaign.rescored({**row, "eval_samples": 100, "test_ll_per_image": "x.npy"}, per_image=True)


def test_job_names_are_unique():
    names = [job.name for job in campaign.JOBS]
    assert len(names) == len(set(names))


def test_status_reads_training_evaluation_and_result(in_process, monkeypatch, data_dir, tmp_path):  # noqa: F811
    job = campaign.Job("tiny", "model01.py", [], "a test run")
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [job])
    out = tmp_path / job.out_dir
    assert campaign.job_status(job) == {"job": "tiny", "state": "not started"}

    monkeypatch.setenv("VAE_INJECT_SEGMENT_END", "1")  # one log interval or pass
    flags = ["--out-dir", out, "--data-dir", data_dir, *SEGMENTED]
    assert in_process(*flags)[0] == runtime.EXIT_SEGMENT_END
    status = campaign.job_status(job)
    assert status["state"] == "training" and "step 10/40" in status["detail"], status
    assert status["detail"].split("; ")[0].endswith(" h, float32"), status  # (then the last segment's rate)
    while in_process(*flags)[0] == runtime.EXIT_SEGMENT_END and not (out / "test_eval.pt").exists():
        pass
    status = campaign.job_status(job)
    assert status["state"] == "evaluating" and "test L_5: 10/50 images in 1 segment(s)" in status["detail"], status
    while in_process(*flags)[0] == runtime.EXIT_SEGMENT_END:
        pass
    status = campaign.job_status(job)
    result = json.loads((out / "result.json").read_text())
    assert status["state"] == "finished" and f"{result['test_ll_nats']:.2f}" in status["detail"]

    campaign.print_status(record=True, note="test")
    entry = json.loads((tmp_path / "campaign" / "history.jsonl").read_text().splitlines()[-1])
    assert entry["note"] == "test" and entry["jobs"] == [status]
    assert entry["machine"] == f"{os.cpu_count()} cores, {runtime.cpu_description()}"
    assert runtime.device_name(torch.device("cpu")).startswith(f"CPU ({runtime.cpu_description()}, ")


def test_run_continues_a_job_across_invocations_and_publishes_it(monkeypatch, data_dir, tmp_path, capsys):
    """`campaign.py run` end to end, in a copy of the code (its --publish writes into the copy's results/): a first
    `campaign.py run` whose segment ends at once (VAE_INJECT_SEGMENT_END) leaves the job training; a second one
    finishes it."""
    for name in ("model01.py", "training.py", "config.py", "runtime.py", "run_files.py", "evaluation.py",
                 "publishing.py", "data.py", "image_folder.py", "distributions.py", "discretized.py", "mixture.py",
                 "layers.py", "compare.py"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    small = [a for a in SEGMENTED[:SEGMENTED.index("--segment-minutes")] if a != "--device" and a != "cpu"]
    model01 = importlib.import_module("model01")
    cfg = model01.Config.from_dict(vars(model01.build_parser().parse_args(small)))
    job = campaign.Job(config.run_name(model01.RUNG, cfg), "model01.py", small, "a tiny run")  # as it publishes
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [job])

    monkeypatch.setenv("VAE_INJECT_SEGMENT_END", "1")
    lanes = campaign.Lanes(minutes=5, lanes=2, data_dir=str(data_dir), log_dir=tmp_path, note="first machine")
    assert lanes.run() == 0
    assert "segment ended, state saved in campaign/model01" in capsys.readouterr().out
    assert campaign.job_status(job)["state"] == "training"
    assert not (tmp_path / "results").exists()

    monkeypatch.delenv("VAE_INJECT_SEGMENT_END")
    assert campaign.Lanes(minutes=5, lanes=2, data_dir=str(data_dir), log_dir=tmp_path).run() == 0
    assert "finished and published" in capsys.readouterr().out
    assert campaign.job_status(job)["state"] == "finished"
    published = json.loads((tmp_path / "results" / f"{job.name}.json").read_text())
    assert "--segment-minutes" in published["command"] and published["steps"] == 40
    records = [json.loads(line) for line in (tmp_path / "campaign" / "history.jsonl").read_text().splitlines()]
    # each run records its start and its end: a run cut off mid-way (its time limit) still leaves its start record
    assert [(s["at"], s["jobs"][0]["state"]) for s in records] == [
        ("start", "not started"), ("end", "training"), ("start", "training"), ("end", "finished")]
    assert records[0]["note"] == records[1]["note"] == "campaign.py run --minutes 5 --lanes 2: first machine"
    capsys.readouterr()
    campaign.print_history()
    report = capsys.readouterr().out.splitlines()
    assert len(report) == 7 and report[0].endswith("(start of the run)  campaign.py run --minutes 5 --lanes 2: first machine")
    assert report[1].endswith("(end of the run)  campaign.py run --minutes 5 --lanes 2: first machine") and "commit" in report[1]
    assert report[2].startswith(f"    {job.name}: training -- step ") and "best validation bound" in report[2]
    assert report[4].startswith(f"    {job.name}: training -- step ")
    assert report[6].startswith(f"    {job.name}: finished -- test L_5 = ")


def test_a_job_running_elsewhere_is_skipped_not_run_twice(monkeypatch, tmp_path, capsys):
    """Two `campaign.py run` at once (two shells, one that did not see the other) must not run one job
    twice: the first holds a lock on the job's log file while it runs it, and a job whose out-dir a process
    holds (a command started by hand) is skipped too. The next free job is taken instead."""
    first, second = campaign.rescore("model03_fashion-mnist_iwae_k5_seed0"), campaign.rescore("model02_fashion-mnist_iwae_k5_seed0")
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    _published_checkpoints(tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [first, second])
    one = campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path)
    assert one.next_job() is first
    other = campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path)
    assert other.next_job() is second and other.next_job() is None  # each tried once per run
    assert f"{first.name}: skipped, another campaign.py run is running it" in capsys.readouterr().out

    one.release(first)
    other.release(second)
    out_dir = tmp_path / first.out_dir
    out_dir.mkdir(parents=True)
    hold = run_files.OutDir()
    hold.take(out_dir)  # the lock a modelNN.py run on that out-dir holds
    try:
        assert campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path).next_job() is second
        assert f"{first.name}: skipped, another process is running on its out-dir" in capsys.readouterr().out
    finally:
        hold.release()
    assert campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path).next_job() is first  # free again


def test_a_job_that_cannot_start_is_counted_failed_and_frees_its_lock(monkeypatch, tmp_path, capsys):
    """A lane that cannot start a job (a command that cannot be built, an executable that will not run) must
    report it, release the job's log lock so a later run can take it, and go on with the next job."""
    first, second = campaign.rescore("model03_fashion-mnist_iwae_k5_seed0"), campaign.rescore("model02_fashion-mnist_iwae_k5_seed0")
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    _published_checkpoints(tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [first, second])
    started = []

    class Finished:  # a child that has already exited 0
        def wait(self):
            return 0

        def poll(self):
            return 0

    def popen(cmd, **kwargs):
        if first.out_dir in cmd:
            raise OSError("exec format error")
        started.append(cmd)
        return Finished()

    monkeypatch.setattr(campaign.subprocess, "Popen", popen)
    lanes = campaign.Lanes(minutes=5, lanes=1, data_dir=None, log_dir=tmp_path)
    lanes.lane(0)
    out = capsys.readouterr().out
    assert lanes.failed == [first.name] and lanes.finished == [second.name] and len(started) == 1
    assert f"{first.name}: could not start: OSError('exec format error')" in out
    assert lanes.logs == {}  # every log file closed, so every lock dropped
    assert campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path).next_job() is first


def test_only_runs_the_named_jobs_with_the_threads_asked_for(monkeypatch, tmp_path, capsys):
    """--only JOB --threads 2: one job given both cores to finish it; the queue's other jobs are left alone, the
    child gets OMP_NUM_THREADS=2, and the run's record says how it ran."""
    first, second = campaign.rescore("model03_fashion-mnist_iwae_k5_seed0"), campaign.rescore("model02_fashion-mnist_iwae_k5_seed0")
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    _published_checkpoints(tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [first, second])
    monkeypatch.setattr(campaign, "print_status", lambda record, note, at=None: notes.append(note))
    started, notes = [], []

    class Finished:  # a child that has already exited 0
        def wait(self):
            return 0

        def poll(self):
            return 0

    def popen(cmd, env, **kwargs):
        started.append((cmd, env["OMP_NUM_THREADS"]))
        return Finished()

    monkeypatch.setattr(campaign.subprocess, "Popen", popen)
    monkeypatch.setattr(campaign.subprocess, "run", lambda *a, **k: None)  # compare.py --update-readme
    lanes = campaign.Lanes(minutes=5, lanes=1, data_dir=None, log_dir=tmp_path, threads=2, only=[second.name])
    assert lanes.run() == 0
    assert [(second.out_dir in cmd, threads) for cmd, threads in started] == [(True, "2")]
    assert lanes.finished == [second.name]
    assert notes == [f"campaign.py run --minutes 5 --lanes 1 --threads 2 --only {second.name}"] * 2
    with pytest.raises(SystemExit):
        campaign.main(["run", "--minutes", "5", "--threads", "0"])
    with pytest.raises(SystemExit):
        campaign.main(["run", "--minutes", "5", "--only", "no_such_job"])
    assert "invalid choice: 'no_such_job'" in capsys.readouterr().err


def test_curves_compare_runs_at_equal_epochs_by_their_best_validation_bound(monkeypatch, tmp_path, capsys):
    """A batch-100 run (590 steps per epoch, finished) and a batch-20 run (2950, still training) side by side: each
    row is the best bound validated by that epoch, a duplicated validation (a resumed segment) changes nothing,
    and a run that has not reached an epoch shows '-'. The re-score (no log) has no column."""
    jobs = [campaign.Job("b100", "model01.py", [], ""), campaign.Job("b20", "model01.py", [], ""),
            campaign.rescore("model03_fashion-mnist_iwae_k5_seed0")]
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    _published_checkpoints(tmp_path)
    monkeypatch.setattr(campaign, "JOBS", jobs)

    def write_log(job, validations):
        out = tmp_path / job.out_dir
        out.mkdir(parents=True)
        rows = [{"type": "config", "step": 0}] + [{"type": "train", "step": s, "loss": 1.0} for s, _ in validations]
        rows += [{"type": "val", "step": s, "val_bound_nats": b} for s, b in validations]
        (out / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return out

    out = write_log(jobs[0], [(590, -100.0), (1180, -95.0), (1770, -96.0), (2360, -94.0)])
    (out / "result.json").write_text(json.dumps({"steps": 2360, "epochs": 4.0}))
    out = write_log(jobs[1], [(2950, -99.0), (5900, -97.0), (5900, -97.0), (8850, -93.5)])
    import torch
    torch.save({"step": 8850, "epochs": 3.0}, out / "ckpt.pt")

    assert campaign.validation_curve(jobs[0]) == (590, [(1, -100), (2, -95), (3, -95), (4, -94)])
    assert campaign.validation_curve(jobs[1])[1] == [(1, -99), (2, -97), (2, -97), (3, -93.5)]
    assert campaign.validation_curve(jobs[2]) is None
    assert campaign.main(["curves", "--every", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1] == " " and line.split()[0].isdigit()]
    assert rows == [["1", "-100.00", "-99.00"], ["2", "-95.00", "-97.00"], ["3", "-95.00", "-93.50"],
                    ["4", "-94.00", "-"]]


def test_status_gives_the_last_segments_rate_and_the_time_left_at_it(monkeypatch, tmp_path):
    """Two finished segments: the rate is the second's (700 steps in 2 s of training, not the run's average), the
    steps left are the checkpoint's; with one segment it counts from step 0; none ended yet: no estimate."""
    job = campaign.Job("tiny", "model01.py", [], "a test run")
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    out = tmp_path / job.out_dir
    out.mkdir(parents=True)
    torch.save({"step": 1900, "epochs": 19.0, "config": {"max_steps": 0, "epochs": 100}, "best_val_bound_nats": -90.0,
                "best_step": 1800, "train_time_s": 7200.0}, out / "ckpt.pt")
    segment_ends = [{"type": "segment_end", "step": 1000, "train_time_s": 4.0},
                    {"type": "segment_end", "step": 1700, "train_time_s": 6.0}]
    for ends, expected in [([], None), (segment_ends[:1], "last segment 1,000 steps in 0.00 h of training (250 steps/s)"),
                           (segment_ends, "last segment 700 steps in 0.00 h of training (350 steps/s)")]:
        rows = [{"type": "config", "step": 0}, {"type": "val", "step": 1800, "val_bound_nats": -90.0}, *ends]
        (out / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        detail = campaign.job_status(job)["detail"]
        assert detail.startswith("step 1,900/10,000 (19 epochs)"), detail
        if expected is None:
            assert "last segment" not in detail and "left" not in detail, detail
        else:
            rate = float(expected.split("(")[1].split()[0])
            assert f"; {expected}: 8,100 steps left, about {8100 / rate / 3600:.1f} h at that rate" in detail, detail


def test_records_under_the_older_file_name_are_migrated_once(monkeypatch, tmp_path, capsys):
    """Campaign state written before campaign/history.jsonl had its name stays readable: the first read or record
    moves the records over (date, commit, machine, at, jobs as they were; of a note only the command `run` wrote
    at its head) and removes the old file; the next record is appended after them."""
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [])
    monkeypatch.setattr(campaign, "machine_description", lambda: "2 cores, test CPU")
    (tmp_path / "campaign").mkdir()
    job = {"job": "a", "state": "training", "detail": "step 10/40"}
    old = [{"date": "2020-01-01T00:00:00Z", "git_commit": "abc1234", "note": "free text about the run", "jobs": [job]},
           {"date": "2020-01-02T00:00:00Z", "git_commit": "def5678", "machine": "2 cores, test CPU", "at": "start",
            "note": "campaign.py run --minutes 80 --lanes 2: free text", "jobs": [job]}]
    legacy = tmp_path / "campaign" / campaign.LEGACY_HISTORY
    legacy.write_text("".join(json.dumps(r) + "\n" for r in old))
    campaign.print_history()
    out = capsys.readouterr().out
    assert "migrated 2 records" in out and "free text" not in out
    assert "2020-01-02T00:00:00Z  commit def5678  [2 cores, test CPU]  (start of the run)  campaign.py run --minutes 80 --lanes 2" in out
    assert not legacy.exists()
    records = [json.loads(line) for line in (tmp_path / "campaign" / "history.jsonl").read_text().splitlines()]
    assert records == [{"date": "2020-01-01T00:00:00Z", "git_commit": "abc1234", "note": "", "jobs": [job]},
                       {"date": "2020-01-02T00:00:00Z", "git_commit": "def5678", "machine": "2 cores, test CPU",
                        "at": "start", "note": "campaign.py run --minutes 80 --lanes 2", "jobs": [job]}]
    campaign.print_status(record=True, note="by hand")
    lines = (tmp_path / "campaign" / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["note"] == "by hand" and not legacy.exists()


def test_a_pilot_validates_only_and_its_table_compares_at_equal_training_time(monkeypatch, data_dir, tmp_path):
    """A pilot job runs its script with --no-test: it trains, validates (each validation records its training time)
    and ends without a test pass or result.json; `pilots` tabulates the best bound by minutes of training."""
    job = campaign.pilot("g", "tiny", "model01.py", ["--dataset", "binarized-mnist", "--max-steps", "40",
                                                     "--val-every", "20", "--val-samples", "2", "--log-every", "10"],
                         "a tiny pilot")
    assert "--no-test" in job.command(None, None) and "--publish" not in job.command(None, None)
    monkeypatch.setattr(campaign, "PILOTS", [job])
    out = tmp_path / "pilot"
    cmd = [a for a in job.command(None, str(data_dir)) if a not in ("python", "model01.py")]
    proc = run_script("model01.py", *[str(out) if a == job.out_dir else a for a in cmd])
    assert proc.returncode == 0 and "the test set was not used" in proc.stdout, proc.stdout + proc.stderr
    assert not (out / "result.json").exists() and (out / "best.pt").exists()
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert not any(r["type"] == "test" for r in rows)
    vals = [r for r in rows if r["type"] == "val"]
    assert [v["step"] for v in vals] == [20, 40] and all(v["train_time_s"] >= 0 for v in vals)
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(campaign, "CAMPAIGN_DIR", ".")
    monkeypatch.setattr(campaign_jobs, "CAMPAIGN_DIR", ".")  # (where a job's out-dir is)
    (tmp_path / job.name).symlink_to(out)
    assert campaign.job_status(job)["state"] == "finished"
    table = campaign.pilot_table()
    best = max(v["val_bound_nats"] for v in vals)
    assert f"| tiny | 40 | " in table and f"{best:.2f}" in table  # within 15 minutes of training: every column
    row = next(line for line in table.splitlines() if line.startswith("| tiny |"))
    assert row.endswith(f"| {best:.2f} |") and "The common step: 40." in table  # by its last validation, step 40
    stopped = [r for r in rows if r["type"] != "done"]  # a pilot stopped before its end, its resume state not kept
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stopped))
    (out / "ckpt.pt").unlink(missing_ok=True)
    status = campaign.job_status(job)
    assert status["state"] == "finished" and status["detail"].startswith("pilot stopped at step 40 after")
    assert "pilots_g.png" not in table and not (tmp_path / "assets" / "pilots_g.png").exists()  # printing draws nothing
    drawn = campaign.pilot_table(draw=True)  # `pilots --write`: the group's curves in assets/, under its table
    assert "![validation bound of the g pilots against minutes and steps](assets/pilots_g.png)" in drawn
    assert (tmp_path / "assets" / "pilots_g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _config_of(job):
    module = importlib.import_module(job.script[:-3])
    return module.RUNG.config_class.from_dict(vars(module.build_parser().parse_args(job.command(None, None)[2:])))


@pytest.mark.parametrize("job", [j for j in campaign.JOBS if j.continues], ids=lambda job: job.name)
def test_a_job_continues_only_a_pilot_of_its_own_config(job):
    """A job that starts from a pilot's state has the pilot's config but for run control (the resume allows no
    other difference), and comes after the pilot in the queue."""
    pilot = campaign._job(job.continues)
    assert pilot.pilot and campaign.JOBS.index(pilot) < campaign.JOBS.index(job)
    assert config.config_differences(dataclasses.asdict(_config_of(pilot)), dataclasses.asdict(_config_of(job)),
                                     config.RUN_CONTROL_KEYS) == []


def test_a_job_starts_from_its_finished_pilots_state_and_continues_it(monkeypatch, data_dir, tmp_path):
    """continue_pilots copies a finished pilot's ckpt.pt, best.pt and log.jsonl into the job's out-dir (and does
    nothing more once the job has them); the job's command then resumes at the pilot's last step and finishes. While
    the pilot is still training the job waits for it."""
    common = ["--dataset", "binarized-mnist", "--val-every", "20", "--val-samples", "2", "--log-every", "10",
              "--checkpoint-every", "20", "--max-steps", "40"]
    pilot = campaign.pilot("g", "tiny", "model01.py", common, "a tiny pilot")
    # (the job trains 20 steps longer than its pilot, to show that it goes on from the pilot's last step)
    job = campaign_jobs.Job("model01_tiny", "model01.py", [*common, "--max-steps", "60", "--n-test", "20",
                                                           "--eval-samples", "3"], "the pilot's run, tested",
                            continues=pilot.name)
    monkeypatch.setattr(campaign, "JOBS", [pilot, job])
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    assert campaign.job_status(job)["state"] == "not started"  # the pilot has not started: the job would start afresh
    real = campaign.job_status
    monkeypatch.setattr(campaign, "job_status", lambda j: {"job": j.name, "state": "training"} if j is pilot else real(j))
    status = campaign.job_status(job)  # the pilot is training: the job waits for its state
    assert status["state"] == "waiting" and pilot.name in status["detail"]
    monkeypatch.setattr(campaign, "job_status", real)
    cmd = pilot.command(None, str(data_dir))
    (tmp_path / "campaign").mkdir()
    proc = run_script("model01.py", *[str(tmp_path / a) if a == pilot.out_dir else a for a in cmd[2:]])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pilot_dir = tmp_path / pilot.out_dir
    assert campaign.job_status(pilot)["state"] == "finished" and (pilot_dir / "best.pt").exists()
    (pilot_dir / "done.keep").write_text("")  # (nothing but CONTINUED_FILES is taken over)
    assert campaign.continue_pilots() == [f"model01_tiny: continues {pilot.name} from its step 40"]
    job_dir = tmp_path / job.out_dir
    assert sorted(p.name for p in job_dir.iterdir()) == sorted(campaign.CONTINUED_FILES)
    assert campaign.job_status(job)["detail"].startswith("step 40/40")  # the pilot's state (and its step count)
    assert campaign.continue_pilots() == []  # once
    cmd = [a for a in job.command(None, str(data_dir)) if a != "--publish"]
    proc = run_script("model01.py", *[str(tmp_path / a) if a == job.out_dir else a for a in cmd[2:]])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((job_dir / "result.json").read_text())
    assert result["steps"] == 60 and result["n_test"] == 20 and result["eval_samples"] == 3
    rows = [json.loads(line) for line in (job_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "val"] == [20, 40, 60]  # the pilot's two, then the job's


def test_a_rescore_waits_for_the_checkpoint_its_training_job_publishes(monkeypatch, tmp_path):
    """A re-score queued behind the training job that publishes its checkpoint is not taken (it would fail) until
    the checkpoint exists; a published result on fewer test images than the whole set still needs it."""
    job = campaign.rescore("model03_cifar10-jpeg_iwae_k1_seed0")
    monkeypatch.setattr(campaign, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(campaign, "JOBS", [job])
    status = campaign.job_status(job)
    assert status["state"] == "waiting" and "checkpoints/model03_cifar10-jpeg_iwae_k1_seed0.pt" in status["detail"]
    assert campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path).next_job() is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model03_cifar10-jpeg_iwae_k1_seed0.pt").write_bytes(b"weights")
    (tmp_path / "results").mkdir()
    row = {"eval_samples": 5000, "test_ll_nats": -6000.0, "n_test": 1000, "device": "CPU"}
    (tmp_path / job.published_result).write_text(json.dumps(row))
    assert campaign.job_status(job)["state"] == "not started"
    assert campaign.Lanes(minutes=1, lanes=1, data_dir=None, log_dir=tmp_path).next_job() is job
    assert not campaign.rescored(row, per_image=False) and campaign.rescored({**row, "n_test": 10000}, per_image=False)
