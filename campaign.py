"""campaign.py: long CPU work cut into resumable segments whose whole state is committed under campaign/.

A session of this workplace lasts hours and a run that outlives it dies, so the long runs of the story
(model01 to the paper's 3280 epochs, L_5000 re-scores of the published checkpoints) go in segments: every
job is an ordinary `modelNN.py` command with `--segment-minutes`, whose out-dir lives in campaign/ and is
committed after the session. A segment ends by saving the run's full state -- ckpt.pt (weights, Adam, EMA,
data order, every RNG state) or test_eval.pt (the per-image bounds so far and the random state) -- and
exiting 75; the next session runs the same command and continues bit for bit (tests/test_segments.py).
A job that finishes publishes its result (--publish), and README's tables are regenerated.

    python campaign.py status                  # every job: steps, validation bound, test progress, result
    python campaign.py status --record         # ... and append it to campaign/sessions.jsonl (run does, at start and end)
    python campaign.py run --minutes 150       # the jobs in order on --lanes 2 processes of 1 thread each
    python campaign.py run --minutes 40 --lanes 1 --threads 2 --only JOB   # one job on both cores, to finish it
    python campaign.py command JOB             # one job's command line, to run or inspect by hand
    python campaign.py history                 # the per-session report: every record of sessions.jsonl
    python campaign.py curves --every 100      # the training jobs' best validation bounds at equal epochs

After `run`: commit campaign/ (and results/, assets/, checkpoints/, README.md when a job finished).
Resuming bit-exactly needs the same device type, torch build and training precision: model01 trains with
--cpu-bf16 only on CPUs with native bf16, so a segment on another kind of CPU continues the same run in
float32 (its checkpoint's precision_history and result.json's train_precision_history say which steps ran how).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parent
CAMPAIGN_DIR = "campaign"
EXIT_SEGMENT_END = 75  # runtime.EXIT_SEGMENT_END (not imported: status must work without torch's start-up)


@dataclass
class Job:
    name: str  # also the out-dir under campaign/
    script: str
    args: list[str]
    why: str
    # --cpu-bf16 only on a CPU with native bf16 (AVX512-BF16/AMX), where it is faster than float32; elsewhere
    # torch emulates bf16 and it is several times slower. The run's checkpoint records each segment's precision.
    bf16_where_native: bool = False
    # a re-score is done once its checkpoint's published result is at S >= 5000, whoever published it (a GPU session),
    # and, for a per-image job, once that result carries its per-image values (see `rescored`)
    published_result: str | None = None
    needs_per_image: bool = False

    @property
    def out_dir(self) -> str:
        return f"{CAMPAIGN_DIR}/{self.name}"

    def _precision_flags(self) -> list[str]:
        if not self.bf16_where_native:
            return []
        from runtime import cpu_has_native_bf16  # (torch's start-up only for the job that needs it)
        return ["--cpu-bf16"] if cpu_has_native_bf16() else []

    def command(self, minutes: float | None, data_dir: str | None) -> list[str]:
        cmd = ["python", self.script, *self.args, *self._precision_flags(), "--device", "cpu", "--out-dir",
               self.out_dir, "--publish"]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        if minutes:
            cmd += ["--segment-minutes", f"{minutes:g}"]
        return cmd


def rescore(checkpoint: str, per_image: bool = False) -> Job:
    """L_5000 of a published checkpoint on the full test set; `per_image`: again, for a row published at S=5000 before
    evaluations kept each test image's value (its own out-dir: the first re-score's result.json stays as it is)."""
    script = checkpoint.split("_", 1)[0] + ".py"
    why = (f"per-image test L_5000 of the published {checkpoint} (published at S=5000 without them), for paired "
           f"comparisons on the same test images" if per_image else
           f"L_5000 on the full test set of the published {checkpoint} (published with S=100 before)")
    return Job(f"{'perimage' if per_image else 'eval5000'}_{checkpoint}", script,
               # --eval-chunk explicit: the published model04 checkpoints carry 2048 in their config
               ["--eval-only", "--checkpoint", f"checkpoints/{checkpoint}.pt", "--eval-samples", "5000",
                "--eval-chunk", "128"],
               why, published_result=f"results/{checkpoint}.json", needs_per_image=per_image)


def rescored(result: dict, per_image: bool) -> bool:
    """Whether a published result needs no re-score: at S >= 5000 and, when `per_image`, with its per-image values.
    (scripts/gpu_campaign.sh asks this too, with per_image=True, before re-scoring a checkpoint on a GPU.)"""
    return result.get("eval_samples", 0) >= 5000 and (not per_image or bool(result.get("test_ll_per_image")))


# In order: a free lane takes the first job that is neither finished nor running.
JOBS = [
    Job("model01_binarized-mnist_iwae_k5_seed0", "model01.py",
        ["--importance-samples", "5", "--epochs", "3280", "--lr-schedule", "iwae",
         "--val-every", "5900", "--checkpoint-every", "5900", "--log-every", "1000"],
        "model01 k=5 to Burda et al.'s 3280 epochs and 8-stage schedule (batch 100, not 20), bf16 CPU steps "
        "where the CPU has native bf16, L_5000 on the 10k test images", bf16_where_native=True),
    rescore("model03_fashion-mnist_iwae_k5_seed0"),
    rescore("model02_fashion-mnist_iwae_k5_seed0"),
    rescore("model03_fashion-mnist_iwae_k5_unbounded_seed0"),
    rescore("model02_fashion-mnist_iwae_k5_unbounded_seed0"),
    rescore("model04_fashion-mnist_vae_k1_L6_seed0"),
    rescore("model04_binarized-mnist_vae_k1_L6_seed0"),
    # The batch-100 run again with the paper's initialisation (model01 --init burda: Glorot-uniform weights, zero
    # biases, Bernoulli output bias at the logit of the mean training pixel), as in the paper's code (yburda/iwae)
    # and in nbip/IWAE, which reproduced the paper's -85.5 at k=5; our runs had PyTorch's default initialisation.
    # It comes before the batch-20 run: that one's best validation bound has stayed within 0.2 nats of the
    # batch-100 run's at the same epoch (`python campaign.py curves`), so 5x the updates do not close the gap.
    # Same seed, schedule, batch and precision as the run above: the two logs are a paired comparison of the init.
    Job("model01_binarized-mnist_iwae_k5_initburda_seed0", "model01.py",
        ["--importance-samples", "5", "--epochs", "3280", "--lr-schedule", "iwae", "--init", "burda",
         "--val-every", "5900", "--checkpoint-every", "5900", "--log-every", "1000"],
        "model01 k=5 as the first job (batch 100, 3280 epochs, 8-stage schedule, bf16 CPU steps where native) but "
        "with the paper's code's initialisation (--init burda), L_5000 on the 10k test images", bf16_where_native=True),
    # Neither the batch-100 runs nor the batch-20 run below has the whole recipe of the two reproductions of the
    # paper's k=5 number (yburda/iwae, and nbip/IWAE's -85.50): batch 20 *and* their initialisation. This one has
    # both; it is the batch-20 run below with --init burda (same seed, schedule and precision: a paired comparison
    # of the init at batch 20, as the batch-100 pair is at batch 100). About 16 hours of one thread at the speed
    # its first segment had on the CPU with native bf16 (about 168 steps/s), more on the AVX2-only ones. It was queued last
    # and moved before the batch-20 run's remaining epochs on 2026-12-06: by epoch 1200 the batch-20 run was 0.09
    # nats ahead of the batch-100 run and --init burda 0.19 (`python campaign.py curves`), so the two together are
    # the campaign's one chance at the paper's number; the batch-20 run is their pair and runs after (or beside) it.
    Job("model01_binarized-mnist_iwae_k5_b20_initburda_seed0", "model01.py",
        ["--importance-samples", "5", "--batch-size", "20", "--epochs", "3280", "--lr-schedule", "iwae",
         "--init", "burda", "--val-every", "29500", "--checkpoint-every", "29500", "--log-every", "5000"],
        "model01 k=5 with both the paper's batch of 20 and its code's initialisation (--init burda), float32, "
        "L_5000 on the 10k test images"),
    # The first model01 run (batch 100) ended at -86.02 nats, half a nat short of the paper's -85.54 with 5x fewer updates:
    # this one has the paper's batch (20, 9.7M updates; PyTorch's default initialisation), float32 because at batch 20 --cpu-bf16
    # gains nothing that holds even on a CPU with native bf16 (results/bench_cpu_b20.json: 3% faster at one thread;
    # 16% slower in the report it replaced). Validation and
    # checkpoints every 10 epochs, as above.
    Job("model01_binarized-mnist_iwae_k5_b20_seed0", "model01.py",
        ["--importance-samples", "5", "--batch-size", "20", "--epochs", "3280", "--lr-schedule", "iwae",
         "--val-every", "29500", "--checkpoint-every", "29500", "--log-every", "5000"],
        "model01 k=5 at the paper's batch of 20 (9.7M updates over Burda et al.'s 3280 epochs and 8-stage schedule), "
        "float32, L_5000 on the 10k test images"),
    # Rows published at S=5000 before evaluations kept each test image's value (results/per_image/), scored again for
    # paired comparisons (compare.py --paired). model03 bounded vs unbounded first: their L_5000 differ by 0.83 nats
    # with an unpaired SE of 7.5, which says nothing (model01's paired SE was a tenth of its unpaired one). model02's
    # pair differ by 105 nats, clear already. model04 on binarized MNIST pairs with model01 (same fixed-seed test
    # binarization), but its L_5000 likely takes as long as model04 on Fashion-MNIST did (18.86 h of one CPU thread):
    # a GPU session does all five in minutes (scripts/gpu_campaign.sh step 4 asks the same `rescored`).
    *[rescore(checkpoint, per_image=True) for checkpoint in (
        "model03_fashion-mnist_iwae_k5_seed0", "model03_fashion-mnist_iwae_k5_unbounded_seed0",
        "model02_fashion-mnist_iwae_k5_seed0", "model02_fashion-mnist_iwae_k5_unbounded_seed0",
        "model04_binarized-mnist_vae_k1_L6_seed0")],
]


# ----------------------------------------------------------------------------- status


def _torch_load(path: Path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def job_status(job: Job) -> dict:
    """What the job's out-dir says: finished (result), training progress (ckpt.pt) and test progress (test_eval.pt)."""
    out = REPO_ROOT / job.out_dir
    status = {"job": job.name, "state": "not started"}
    if (out / "result.json").exists():
        result = json.loads((out / "result.json").read_text())
        bpd = f", {result['test_bpd']:.4f} bits/dim" if result.get("test_bpd") is not None else ""
        return {**status, "state": "finished",
                "detail": f"test L_{result['eval_samples']} = {result['test_ll_nats']:.2f} ± "
                          f"{result['test_ll_stderr']:.2f} nats{bpd} on {result['n_test']} images, "
                          f"{result['wall_time_s'] / 3600:.2f} h in all"}
    if job.published_result and (REPO_ROOT / job.published_result).exists():
        published = json.loads((REPO_ROOT / job.published_result).read_text())
        if rescored(published, job.needs_per_image):  # then a partial re-score here is redundant: left as it is
            partial = "; this job's partial test_eval.pt is redundant" if (out / "test_eval.pt").exists() else ""
            return {**status, "state": "finished",
                    "detail": f"published at L_{published['eval_samples']} = {published['test_ll_nats']:.2f} nats on "
                              f"{published['n_test']} images by another run"
                              f"{' with per-image values' if job.needs_per_image else ''} ({job.published_result}, "
                              f"{published.get('device')}){partial}"}
    details = []
    if (out / "ckpt.pt").exists():
        ckpt = _torch_load(out / "ckpt.pt")
        total = _total_steps(ckpt)
        details.append(f"step {ckpt['step']:,}/{total:,} ({ckpt['epochs']:.0f} epochs), best validation bound "
                       f"{ckpt['best_val_bound_nats']:.2f} nats at step {ckpt['best_step']:,}, training "
                       f"{ckpt['train_time_s'] / 3600:.2f} h" + _precision_note(ckpt)
                       + (_time_left(out, total - ckpt["step"]) if ckpt["step"] < total else ""))
        status["state"] = "training" if ckpt["step"] < total else "evaluating"
    for path in sorted(out.glob("test_eval*.pt")):
        state = _torch_load(path)
        done, n = state["progress"]["done"], state["identity"]["n_test"]
        details.append(f"test L_{state['identity']['eval_samples']}: {done:,}/{n:,} images in "
                       f"{state['segments']} segment(s), {state['eval_time_s'] / 3600:.2f} h")
        status["state"] = "evaluating"
    if details:
        status["detail"] = "; ".join(details)
    return status


def _log_rows(out: Path) -> list[dict]:
    """The records of a job's log.jsonl (none when it has no log yet)."""
    log = out / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def _time_left(out: Path, steps_left: int) -> str:
    """The rate of the run's last finished segment (its last two segment_end records in log.jsonl; the first segment
    counts from step 0) and the training time left at that rate: the machine changes between sessions, so the last
    segment says more about the next one than the run's average does. '' before a segment has ended."""
    ends = [r for r in _log_rows(out) if r.get("type") == "segment_end"]
    if not ends:
        return ""
    before = ends[-2] if len(ends) > 1 else {"step": 0, "train_time_s": 0.0}
    steps, seconds = ends[-1]["step"] - before["step"], ends[-1]["train_time_s"] - before["train_time_s"]
    if steps <= 0 or seconds <= 0:
        return ""
    rate = steps / seconds
    return (f"; last segment {steps:,} steps in {seconds / 3600:.2f} h of training ({rate:.0f} steps/s): "
            f"{steps_left:,} steps left, about {steps_left / rate / 3600:.1f} h at that rate")


def _precision_note(ckpt: dict) -> str:
    """', float32' for one precision throughout, ', float32 since step 776,567' after a change (older: '')."""
    history = ckpt.get("precision_history")
    if not history:
        return ""
    first_step, precision = history[-1]
    return f", {precision}" + (f" since step {first_step:,}" if len(history) > 1 else "")


def _total_steps(ckpt: dict) -> int:
    cfg = ckpt["config"]
    if cfg["max_steps"] > 0:
        return cfg["max_steps"]
    per_epoch = round(ckpt["step"] / ckpt["epochs"]) if ckpt["epochs"] else 0
    return cfg["epochs"] * per_epoch


def machine_description() -> str:
    """The machine a session ran on, read from it rather than typed into --note: cores and the CPU's model name and
    vector unit (runtime.cpu_description). It decides the speed of a segment and whether model01 trains in bf16."""
    from runtime import cpu_description  # (torch's start-up only when a record is written)
    return f"{os.cpu_count()} cores, {cpu_description()}"


def print_status(record: bool = False, note: str = "", at: str | None = None):
    """Print every job's status; `record`: also append it to campaign/sessions.jsonl (the per-session report),
    with `at` = "start" or "end" when `run` writes it (a record by hand has none)."""
    statuses = [job_status(job) for job in JOBS]
    for s in statuses:
        print(f"{s['job']}: {s['state']}" + (f" -- {s['detail']}" if "detail" in s else ""))
    if record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip()
        entry = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": commit,
                 "machine": machine_description(), **({"at": at} if at else {}), "note": note, "jobs": statuses}
        path = REPO_ROOT / CAMPAIGN_DIR / "sessions.jsonl"
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"appended to {path.relative_to(REPO_ROOT)}")


def print_history(path: Path | None = None):
    """Every record of campaign/sessions.jsonl, oldest first: when, at which commit, the note, and each started
    job's state (steps, best validation bound, training hours, test progress) -- the per-session report."""
    path = path or REPO_ROOT / CAMPAIGN_DIR / "sessions.jsonl"
    if not path.exists():
        print(f"no campaign session recorded yet ({path.relative_to(REPO_ROOT)} does not exist)")
        return
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        print(f"{entry['date']}  commit {entry['git_commit']}" + (f"  [{entry['machine']}]" if "machine" in entry else "")
              + (f"  ({entry['at']} of the run)" if "at" in entry else "") + (f"  {entry['note']}" if entry.get("note") else ""))
        for job in entry["jobs"]:
            if job["state"] != "not started":
                print(f"    {job['job']}: {job['state']}" + (f" -- {job['detail']}" if "detail" in job else ""))


def validation_curve(job: Job) -> tuple[float, list[tuple[float, float]]] | None:
    """(steps per epoch, [(epoch, best validation bound so far in nats)] at each validation) of a training job, read
    from its log.jsonl; None for a re-score or a job without validations yet. The best-so-far bound is what
    checkpoint selection sees, so curves of runs at different batch sizes compare at equal epochs."""
    out = REPO_ROOT / job.out_dir
    if not (out / "log.jsonl").exists():
        return None
    if (out / "result.json").exists():
        result = json.loads((out / "result.json").read_text())
        steps_per_epoch = result["steps"] / result["epochs"]
    elif (out / "ckpt.pt").exists():
        ckpt = _torch_load(out / "ckpt.pt")
        steps_per_epoch = ckpt["step"] / ckpt["epochs"] if ckpt["epochs"] else 0
    else:
        return None
    validations = sorted((r["step"], r["val_bound_nats"]) for r in _log_rows(out) if r.get("type") == "val")
    if not validations or not steps_per_epoch:
        return None
    curve, best = [], float("-inf")
    for step, bound in validations:  # a resumed segment may log a validation twice: harmless for a running max
        best = max(best, bound)
        curve.append((step / steps_per_epoch, best))
    return steps_per_epoch, curve


def print_curves(every: float):
    """Best validation bound by epoch E of every training job, side by side, at E = every, 2 every, ..."""
    curves = {job.name: c for job in JOBS if (c := validation_curve(job)) is not None}
    if not curves:
        print("no training job has validated yet")
        return
    last_epoch = max(c[1][-1][0] for c in curves.values())
    print("best validation bound (nats) by epoch; a column per training job (steps per epoch in brackets)")
    for name, (steps_per_epoch, _) in curves.items():
        print(f"  {name} ({steps_per_epoch:g})")
    print("epoch  " + "  ".join(f"{i + 1:>8}" for i in range(len(curves))))
    epoch = every
    while epoch <= last_epoch + 1e-9:
        cells = []
        for _, curve in curves.values():
            reached = [bound for e, bound in curve if e <= epoch + 1e-9]
            cells.append(f"{reached[-1]:8.2f}" if reached and curve[-1][0] >= epoch - 1e-9 else f"{'-':>8}")
        print(f"{epoch:5g}  " + "  ".join(cells))
        epoch += every


# ----------------------------------------------------------------------------- run


class Lanes:
    """`lanes` worker threads, each running one job at a time as a subprocess with `threads` CPU threads
    (OMP_NUM_THREADS), taking the jobs of JOBS in order (those named in `only`, when given)."""

    def __init__(self, minutes: float, lanes: int, data_dir: str | None, log_dir: Path, note: str = "",
                 threads: int = 1, only: list[str] | None = None):
        self.deadline, self.minutes, self.note = time.time() + 60 * minutes, minutes, note
        self.lanes, self.data_dir, self.log_dir = lanes, data_dir, log_dir
        self.threads, self.only = threads, only
        self.lock = threading.Lock()
        self.claimed: set[str] = set()
        self.logs = {}  # job name -> its open, locked log file while a lane runs it
        self.children: list[subprocess.Popen] = []
        self.finished, self.failed = [], []
        self.stopping = False

    def next_job(self) -> Job | None:
        """The first job that is not finished and not taken: by another lane of this process (self.claimed), by
        another `campaign.py run` (it holds a lock on the job's log file while the job runs), or by any process
        running on the job's out-dir (the scripts lock it). Taking it locks its log file until release(job)."""
        with self.lock:
            for job in JOBS:
                if self.only is not None and job.name not in self.only:
                    continue
                if job.name in self.claimed or job_status(job)["state"] == "finished":
                    continue
                self.claimed.add(job.name)  # tried once per session, whether it runs here or elsewhere
                log, why_not = self._take(job)
                if log is None:
                    print(f"[campaign] {job.name}: skipped, {why_not}", flush=True)
                    continue
                self.logs[job.name] = log
                return job
        return None

    def _take(self, job: Job):
        """(the job's log file, opened for append and locked, None) or (None, why another process has the job)."""
        log = open(self.log_dir / f"{job.name}.log", "a")
        if fcntl is None:  # no flock (Windows): the out-dir lock of the scripts still stops a second writer
            return log, None
        try:
            fcntl.flock(log.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.close()
            return None, f"another campaign.py run is running it (it holds {self.log_dir / job.name}.log)"
        out_dir = REPO_ROOT / job.out_dir
        if out_dir.is_dir():  # a process started by hand on the out-dir: probe the scripts' lock, do not keep it
            fd = os.open(out_dir, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.close()
                return None, f"another process is running on its out-dir {job.out_dir}"
            finally:
                os.close(fd)  # closing drops the probe's lock, if taken
        return log, None

    def release(self, job: Job):
        self.logs.pop(job.name).close()  # closing the log file drops its lock

    def lane(self, index: int):
        while not self.stopping:
            minutes_left = (self.deadline - time.time()) / 60
            if minutes_left < 1:
                return
            job = self.next_job()
            if job is None:
                return
            try:  # from here on the job's log lock is held: whatever fails below must release it
                cmd = job.command(round(minutes_left, 1), self.data_dir)
                log = self.logs[job.name]
                print(f"[lane {index}] {' '.join(cmd)}  (output: {log.name})", flush=True)
                # a session of its own: a Ctrl-C reaches the child once, forwarded by run(), not twice. The child
                # shares the locked log file, so the job stays taken while it runs even if this process dies.
                child = subprocess.Popen([sys.executable, *cmd[1:]], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "OMP_NUM_THREADS": str(self.threads),
                                              "PYTHONUNBUFFERED": "1"},
                                         start_new_session=True)
                self.children.append(child)
                code = child.wait()
            except Exception as error:  # e.g. a job whose command cannot be built or started: count it, go on
                self.failed.append(job.name)
                print(f"[lane {index}] {job.name}: could not start: {error!r}", flush=True)
                continue
            finally:
                self.release(job)
            if code == 0:
                self.finished.append(job.name)
                print(f"[lane {index}] {job.name}: finished and published", flush=True)
            elif code == EXIT_SEGMENT_END or (self.stopping and code in (128 + signal.SIGINT, 128 + signal.SIGTERM)):
                how = "segment ended" if code == EXIT_SEGMENT_END else "stopped by a signal"
                print(f"[lane {index}] {job.name}: {how}, state saved in {job.out_dir}", flush=True)
                return
            else:
                self.failed.append(job.name)
                print(f"[lane {index}] {job.name}: exit {code}, see {log}", flush=True)

    def run(self) -> int:
        def forward(signum, frame):  # children save their state on SIGINT/SIGTERM
            self.stopping = True
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, forward)
        note = (f"campaign.py run --minutes {self.minutes:g} --lanes {self.lanes}"
                + (f" --threads {self.threads}" if self.threads != 1 else "")
                + (f" --only {' '.join(self.only)}" if self.only else "") + (f": {self.note}" if self.note else ""))
        # a record at the start too: a session cut off before its end (its process killed with it) still leaves
        # its command, commit and machine in the working tree, and the next session's start record its progress
        print_status(record=True, note=note, at="start")
        print()
        threads = [threading.Thread(target=self.lane, args=(i,)) for i in range(self.lanes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.finished:
            subprocess.run([sys.executable, "compare.py", "--update-readme"], cwd=REPO_ROOT, check=False)
        print()
        print_status(record=True, note=note, at="end")
        print(f"\nnow commit the state: git add {CAMPAIGN_DIR} results assets checkpoints README.md && git commit")
        return 1 if self.failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    status = sub.add_parser("status", help="what every job has done")
    status.add_argument("--record", action="store_true", help="append the status to campaign/sessions.jsonl")
    status.add_argument("--note", default="", help="with --record: a note for the entry (e.g. how the segments ran)")
    run = sub.add_parser("run", help="run the jobs in segments for up to --minutes")
    run.add_argument("--minutes", type=float, required=True, help="wall-clock minutes for this session's segments")
    run.add_argument("--lanes", type=int, default=os.cpu_count() or 1, help="jobs at once, 1 thread each (default: cores)")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads per job (OMP_NUM_THREADS, default 1): more to finish one job sooner, e.g. "
                          "--lanes 1 --threads 2 --only JOB; a resumed run's numbers then differ in the last digits")
    run.add_argument("--only", nargs="+", default=None, choices=[job.name for job in JOBS], metavar="JOB",
                     help="run only these jobs (in queue order); default every job")
    run.add_argument("--data-dir", default=None, help="data root (default: $VAE_DATA_DIR, then ./data)")
    run.add_argument("--log-dir", default="runs/campaign_logs", help="where each job's output goes (default runs/campaign_logs)")
    run.add_argument("--note", default="", help="a note for this session's record in sessions.jsonl (the record names the machine itself)")
    sub.add_parser("history", help="print every session's record of campaign/sessions.jsonl")
    curves = sub.add_parser("curves", help="every training job's best validation bound by epoch, side by side")
    curves.add_argument("--every", type=float, default=100, help="epochs between rows (default 100)")
    command = sub.add_parser("command", help="print one job's command line")
    command.add_argument("job", choices=[job.name for job in JOBS], help="job name")
    command.add_argument("--minutes", type=float, default=None, help="add --segment-minutes")
    command.add_argument("--data-dir", default=None, help="add --data-dir")
    args = parser.parse_args(argv)
    if args.action == "status":
        print_status(args.record, args.note)
        return 0
    if args.action == "history":
        print_history()
        return 0
    if args.action == "curves":
        if args.every <= 0:
            parser.error("--every must be > 0")
        print_curves(args.every)
        return 0
    if args.action == "command":
        job = next(j for j in JOBS if j.name == args.job)
        print(" ".join(job.command(args.minutes, args.data_dir)))
        return 0
    if args.minutes <= 0 or args.lanes < 1 or args.threads < 1:
        parser.error("--minutes must be > 0, --lanes >= 1 and --threads >= 1")
    log_dir = REPO_ROOT / args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    return Lanes(args.minutes, args.lanes, args.data_dir, log_dir, args.note, args.threads, args.only).run()


if __name__ == "__main__":
    sys.exit(main())
