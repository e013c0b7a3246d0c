"""campaign.py: long CPU work cut into resumable segments whose whole state is committed under campaign/.

For machines with a job time limit (a Slurm allocation, a preemptible instance): the long runs of the story
(model01 to the paper's 3280 epochs, L_5000 re-scores of the published checkpoints) go in segments that each fit
one allocation. Every job is an ordinary `modelNN.py` command with `--segment-minutes`, whose out-dir lives in
campaign/ and is committed after the segment. A segment ends by saving the run's full state -- ckpt.pt (weights,
Adam, EMA, data order, every RNG state) or test_eval.pt (the per-image bounds so far and the random state) -- and
exiting 75; the next allocation runs the same command and continues bit for bit (tests/test_segments.py).
A job that finishes publishes its result (--publish), and README's tables are regenerated. The jobs themselves, in
queue order and each with why it runs, are in campaign_jobs.py.

    python campaign.py status                  # every job: steps, validation bound, test progress, result
    python campaign.py status --record         # ... and append it to campaign/history.jsonl (run does, at start and end)
    python campaign.py run --minutes 150       # the jobs in order on --lanes 2 processes of 1 thread each
    python campaign.py run --minutes 40 --lanes 1 --threads 2 --only JOB   # one job on both cores, to finish it
    python campaign.py command JOB             # one job's command line, to run or inspect by hand
    python campaign.py history                 # every segment record of campaign/history.jsonl
    python campaign.py curves --every 100      # the training jobs' best validation bounds at equal epochs

After `run`: commit campaign/ (and results/, assets/, checkpoints/, README.md when a job finished).
Resuming bit-exactly needs the same device type, torch build and training precision: model01 trains with
--cpu-bf16 only on CPUs with native bf16, so a segment on another kind of CPU continues the same run in
float32 (its checkpoint's precision_history and result.json's train_precision_history say which steps ran how).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from campaign_jobs import (CAMPAIGN_DIR, JOBS, PILOT_MINUTES, PILOTS, Job,  # noqa: F401
                           pilot, rescore, rescored)  # (re-exported: tests and scripts/gpu_campaign.sh use them here)

REPO_ROOT = Path(__file__).resolve().parent
EXIT_SEGMENT_END = 75  # runtime.EXIT_SEGMENT_END (not imported: status must work without torch's start-up)


# ----------------------------------------------------------------------------- status


def _torch_load(path: Path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def job_status(job: Job) -> dict:
    """What the job's out-dir says: finished (result), training progress (ckpt.pt) and test progress (test_eval.pt)."""
    out = REPO_ROOT / job.out_dir
    status = {"job": job.name, "state": "not started"}
    rows = _log_rows(out) if job.pilot else []
    done = [r for r in rows if r.get("type") == "done"]
    if done:
        return {**status, "state": "finished",
                "detail": f"pilot: step {done[-1]['step']:,} after {done[-1]['train_time_s'] / 60:.0f} min of training, "
                          f"best validation bound {done[-1]['best_val_bound_nats']:.2f} nats at step "
                          f"{done[-1]['best_step']:,} (no test set)"}
    vals = _pilot_validations(rows)
    if vals and not (out / "ckpt.pt").exists():
        # a pilot whose resume state was not kept (too large to commit, or lost with its machine) cannot go on: it
        # ended where it stopped, and the table shows the minutes it reached
        best = max(vals, key=lambda v: v["val_bound_nats"])
        return {**status, "state": "finished",
                "detail": f"pilot stopped at step {vals[-1]['step']:,} after {vals[-1]['train_time_s'] / 60:.0f} min "
                          f"of training, its resume state not kept: best validation bound "
                          f"{best['val_bound_nats']:.2f} nats at step {best['step']:,} (no test set)"}
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
    if job.continues and not (out / "ckpt.pt").exists() and job_status(_job(job.continues))["state"] == "training":
        return {**status, "state": "waiting", "detail": f"for its pilot {job.continues}, whose state it continues"}
    checkpoint = job.args[job.args.index("--checkpoint") + 1] if "--checkpoint" in job.args else None
    if checkpoint and not (REPO_ROOT / checkpoint).exists():  # a re-score of a row its training job has not published
        return {**status, "state": "waiting", "detail": f"for {checkpoint}, which its training job publishes"}
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


def _job(name: str) -> Job:
    return next(job for job in JOBS if job.name == name)


# what a job takes over from the pilot it continues: the resume state, the best weights so far and the log
CONTINUED_FILES = ("ckpt.pt", "best.pt", "log.jsonl")


def continue_pilots() -> list[str]:
    """Start every job that `continues` a finished pilot from the pilot's state: copy CONTINUED_FILES into the job's
    out-dir, so its first segment resumes at the pilot's last step (its config is the pilot's but for run control,
    which the resume checks). Only for a job that has not started, and a pilot that kept its files (a pilot's
    best.pt is not committed: on another machine the job starts afresh). -> what was done, a line per job."""
    done = []
    for job in JOBS:
        if not job.continues:
            continue
        pilot, out = _job(job.continues), REPO_ROOT / job.out_dir
        source = REPO_ROOT / pilot.out_dir
        if (job_status(pilot)["state"] != "finished" or any((out / name).exists() for name in CONTINUED_FILES)
                or (out / "result.json").exists() or not all((source / name).exists() for name in CONTINUED_FILES)):
            continue
        out.mkdir(parents=True, exist_ok=True)
        for name in CONTINUED_FILES:
            shutil.copy2(source / name, out / name)
        done.append(f"{job.name}: continues {pilot.name} from its step {_torch_load(out / 'ckpt.pt')['step']:,}")
    return done


def _log_rows(out: Path) -> list[dict]:
    """The records of a job's log.jsonl (none when it has no log yet)."""
    log = out / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def _time_left(out: Path, steps_left: int) -> str:
    """The rate of the run's last finished segment (its last two segment_end records in log.jsonl; the first segment
    counts from step 0) and the training time left at that rate: the machine may change between segments, so the last
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
    """The machine a segment ran on, read from it rather than typed into --note: cores and the CPU's model name and
    vector unit (runtime.cpu_description). It decides the speed of a segment and whether model01 trains in bf16."""
    from runtime import cpu_description  # (torch's start-up only when a record is written)
    return f"{os.cpu_count()} cores, {cpu_description()}"


HISTORY = "history.jsonl"  # one record per `campaign.py run` start and end (and per `status --record`)
LEGACY_HISTORY = "sessions.jsonl"  # its name before; read once, migrated, then removed


def history_path(campaign_dir: Path | None = None) -> Path:
    """campaign/history.jsonl; campaign state written under the older name is migrated into it first."""
    campaign_dir = campaign_dir or REPO_ROOT / CAMPAIGN_DIR
    path, legacy = campaign_dir / HISTORY, campaign_dir / LEGACY_HISTORY
    if legacy.exists() and not path.exists():
        records = [migrate_record(json.loads(line)) for line in legacy.read_text().splitlines() if line.strip()]
        tmp = path.with_name(f".{HISTORY}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)
        legacy.unlink()
        print(f"migrated {len(records)} records from {legacy.name} to {path.name} (notes kept as the command only)")
    return path


def migrate_record(entry: dict) -> dict:
    """A record of the older file in the current form: date, commit, machine, at, jobs as they were; of the free-text
    note only the command that `run` wrote at its head ("campaign.py run --minutes 80 --lanes 2")."""
    note = entry.get("note") or ""
    command = note.split(":", 1)[0].strip() if note.startswith("campaign.py ") else ""
    keep = {k: entry[k] for k in ("date", "git_commit", "machine", "at") if k in entry}
    return {**keep, "note": command, "jobs": entry.get("jobs", [])}


def print_status(record: bool = False, note: str = "", at: str | None = None):
    """Print every job's status; `record`: also append it to campaign/history.jsonl (the segment records), with
    `at` = "start" or "end" when `run` writes it (a record by hand has none)."""
    statuses = [job_status(job) for job in JOBS]
    for s in statuses:
        print(f"{s['job']}: {s['state']}" + (f" -- {s['detail']}" if "detail" in s else ""))
    if record:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip()
        entry = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": commit,
                 "machine": machine_description(), **({"at": at} if at else {}), "note": note, "jobs": statuses}
        (REPO_ROOT / CAMPAIGN_DIR).mkdir(exist_ok=True)
        path = history_path()
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"appended to {path.relative_to(REPO_ROOT)}")


def print_history(path: Path | None = None):
    """Every record of campaign/history.jsonl, oldest first: when, at which commit, on which machine, the note, and
    each started job's state (steps, best validation bound, training hours, test progress)."""
    path = path or history_path()
    if not path.exists():
        print(f"no campaign segment recorded yet ({path.relative_to(REPO_ROOT)} does not exist)")
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


PILOT_TABLE = "pilots.md"  # campaign/pilots.md: the committed table of every pilot group
PILOT_CHECKPOINTS_MIN = (15, 30, 45, 60)  # minutes of training at which the table compares the candidates


def _pilot_validations(rows: list[dict]) -> list[dict]:
    """The validation records of a pilot's log.jsonl rows (each with the training time it came at)."""
    return [r for r in rows if r.get("type") == "val" and "train_time_s" in r]


def pilot_row(job: Job, common_step: int | None = None) -> list[str] | None:
    """[variant, steps, epochs, images/s, best validation bound at each of PILOT_CHECKPOINTS_MIN, best validation bound
    by step `common_step`] from the pilot's log.jsonl (its validations record the training time they came at); None
    before its first validation."""
    rows = _log_rows(REPO_ROOT / job.out_dir)
    validations = _pilot_validations(rows)
    if not validations:
        return None
    trains = [r for r in rows if r.get("type") == "train"]
    speeds = sorted(r["images_per_s"] for r in trains)
    cells = []
    for minutes in PILOT_CHECKPOINTS_MIN:
        reached = [r["val_bound_nats"] for r in validations if r["train_time_s"] <= 60 * minutes + 1]
        finished = any(r.get("type") == "done" for r in rows) or validations[-1]["train_time_s"] >= 60 * minutes
        cells.append(f"{max(reached):.2f}" if reached and finished else "—")
    by_step = [r["val_bound_nats"] for r in validations if common_step is not None and r["step"] <= common_step]
    reached = common_step is not None and validations[-1]["step"] >= common_step  # (one still short of it: —)
    cells.append(f"{max(by_step):.2f}" if by_step and reached else "—")
    last = trains[-1] if trains else {"step": validations[-1]["step"], "epoch": float("nan")}
    return [job.name.split("_", 2)[2], f"{last['step']:,}", f"{last['epoch']:.1f}",
            f"{speeds[len(speeds) // 2]:.0f}" if speeds else "—", *cells]


def draw_pilot_curves(group: str, jobs: list[Job]) -> str | None:
    """assets/pilots_<group>.png: every candidate's validation bound against minutes of training (the pilots'
    budget, the table's columns) and against steps (the common-step column); its path relative to campaign/ (where
    pilots.md links it), or None before any candidate of the group validated. Drawn with `pilots --write`."""
    curves = {job.name.split("_", 2)[2]: vals for job in jobs
              for vals in [_pilot_validations(_log_rows(REPO_ROOT / job.out_dir))] if vals}
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from regenerate_figures import save_figure  # (matplotlib only for --write)

    plt.rcParams.update({"font.size": 8})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100, sharey=True)
    for name, vals in curves.items():
        bounds = [v["val_bound_nats"] for v in vals]
        axes[0].plot([v["train_time_s"] / 60 for v in vals], bounds, marker=".", linewidth=1, label=name)
        axes[1].plot([v["step"] for v in vals], bounds, marker=".", linewidth=1, label=name)
    # the first validations lie far below the rest: the view spans the candidates' last bounds and the best one
    last = min(vals[-1]["val_bound_nats"] for vals in curves.values())
    best = max(v["val_bound_nats"] for vals in curves.values() for v in vals)
    span = max(best - last, 1.0)
    axes[0].set_ylim(last - 0.75 * span, best + 0.1 * span)
    axes[0].axvline(PILOT_MINUTES, color="grey", linewidth=0.6, linestyle="--")
    axes[0].set_xlabel("minutes of training (one CPU thread; validations included)")
    axes[1].set_xlabel("step")
    axes[0].set_ylabel("validation bound (nats, higher is better)")
    for ax in axes:
        ax.grid(True, linewidth=0.3)
    axes[1].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"pilots {group}: validation bound, from each candidate's log.jsonl")
    fig.tight_layout()
    target = REPO_ROOT / "assets" / f"pilots_{group}.png"  # (with the README's other figures)
    save_figure(fig, target, f"{len(curves)} candidates")
    return Path(os.path.relpath(target, REPO_ROOT / CAMPAIGN_DIR)).as_posix()


def pilot_table(draw: bool = False) -> str:
    """Markdown: per group, every candidate's best validation bound (nats, higher is better) after 15..60 minutes of
    training on one core, with the command line that differs; `draw`: also each group's curves (draw_pilot_curves),
    shown under its table."""
    groups: dict[str, list[Job]] = {}
    for job in PILOTS:
        groups.setdefault(job.name.split("_")[1], []).append(job)
    header = ["variant", "steps", "epochs", "images/s (median)", *[f"best val @ {m} min" for m in PILOT_CHECKPOINTS_MIN],
              "best val by the common step"]
    parts = ["# Pilots\n\nWritten by `python campaign.py pilots --write` from the pilots' `log.jsonl` "
             "(`campaign/pilot_*`). Each candidate trains for an hour of one CPU thread (`--max-train-minutes "
             f"{PILOT_MINUTES} --no-test`: validation only, the test set untouched); the columns give its best "
             "validation bound (nats, higher is better) once it had trained that long. Training time includes the "
             "validation passes (the same step interval and S for every candidate of a group). Speeds depend on the "
             "machine and on what else ran beside a pilot (the images/s column shows it): a candidate that ran beside "
             "less load gets further in the same minutes. The last column compares the candidates at equal steps "
             "instead: its best bound by the last step at which every finished candidate of the group validated (the "
             "common step, under each table): where two candidates cost the same per step (free bits, the learning rate) it is the fair "
             "comparison, and beside the minutes it shows what a costlier step buys per step."]
    for group, jobs in groups.items():
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        # the last step at which every finished candidate validated (all validate every --val-every steps, and a
        # candidate stopped by the time limit once more where it stopped)
        validated = [{r["step"] for r in _pilot_validations(_log_rows(REPO_ROOT / job.out_dir))} for job in jobs
                     if job_status(job)["state"] == "finished"]
        common_step = max(set.intersection(*validated), default=None) if validated else None
        for job in jobs:
            row = pilot_row(job, common_step)
            row = row or [job.name.split("_", 2)[2], "not run yet"] + [""] * (len(header) - 2)
            lines.append("| " + " | ".join(row) + " |")
        whys = "\n".join(f"- `{job.name.split('_', 2)[2]}`: {job.why}: `{' '.join(job.command(None, None))}`"
                          for job in jobs)
        common = (f"The common step: {common_step:,}." if common_step
                  else "No candidate of this group has finished yet: no common step.")
        figure = draw_pilot_curves(group, jobs) if draw else None
        figure = f"\n\n![validation bound of the {group} pilots against minutes and steps]({figure})" if figure else ""
        parts.append(f"## {group}\n\n" + "\n".join(lines) + "\n\n" + common + figure + "\n\n" + whys)
    return "\n\n".join(parts) + "\n"


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
                if job.name in self.claimed or job_status(job)["state"] in ("finished", "waiting"):
                    continue
                self.claimed.add(job.name)  # tried once per run, whether it runs here or elsewhere
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
                # a process group of its own: a Ctrl-C reaches the child once, forwarded by run(), not twice. The child
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
                print(f"[lane {index}] {job.name}: finished" + ("" if job.pilot else " and published"), flush=True)
                if job.pilot:
                    with self.lock:  # (before a lane takes the job that continues it)
                        for line in continue_pilots():
                            print(f"[lane {index}] {line}", flush=True)
            elif code == EXIT_SEGMENT_END or (self.stopping and code in (128 + signal.SIGINT, 128 + signal.SIGTERM)):
                how = "segment ended" if code == EXIT_SEGMENT_END else "stopped by a signal"
                print(f"[lane {index}] {job.name}: {how}, state saved in {job.out_dir}", flush=True)
                return
            else:
                self.failed.append(job.name)
                print(f"[lane {index}] {job.name}: exit {code}, see {log.name}", flush=True)

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
        # a record at the start too: a run cut off before its end (its allocation ended, its process killed) still
        # leaves its command, commit and machine in the working tree, and the next run's start record its progress
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
    status.add_argument("--record", action="store_true", help="append the status to campaign/history.jsonl")
    status.add_argument("--note", default="", help="with --record: a note for the entry (e.g. how the segments ran)")
    run = sub.add_parser("run", help="run the jobs in segments for up to --minutes")
    run.add_argument("--minutes", type=float, required=True, help="wall-clock minutes for this run's segments (the time the machine is yours)")
    run.add_argument("--lanes", type=int, default=os.cpu_count() or 1, help="jobs at once, 1 thread each (default: cores)")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads per job (OMP_NUM_THREADS, default 1): more to finish one job sooner, e.g. "
                          "--lanes 1 --threads 2 --only JOB; a resumed run's numbers then differ in the last digits")
    run.add_argument("--only", nargs="+", default=None, choices=[job.name for job in JOBS], metavar="JOB",
                     help="run only these jobs (in queue order); default every job")
    run.add_argument("--data-dir", default=None, help="data root (default: $VAE_DATA_DIR, then ./data)")
    run.add_argument("--log-dir", default="runs/campaign_logs", help="where each job's output goes (default runs/campaign_logs)")
    run.add_argument("--note", default="", help="a note for this run's records in history.jsonl (the record names the machine itself)")
    sub.add_parser("history", help="print every segment record of campaign/history.jsonl")
    sub.add_parser("continue-pilots", help="start each job that continues a finished pilot from the pilot's state "
                                           "(`run` does it when a pilot finishes)")
    pilots = sub.add_parser("pilots", help="the pilots' best validation bounds at equal training time (markdown)")
    pilots.add_argument("--write", action="store_true",
                        help=f"write it to {CAMPAIGN_DIR}/{PILOT_TABLE} instead of printing, with each group's curves "
                             f"(assets/pilots_<group>.png)")
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
    if args.action == "continue-pilots":
        print("\n".join(continue_pilots()) or "no job to start from a pilot's state")
        return 0
    if args.action == "pilots":
        table = pilot_table(draw=args.write)
        if args.write:
            (REPO_ROOT / CAMPAIGN_DIR / PILOT_TABLE).write_text(table)
            print(f"wrote {CAMPAIGN_DIR}/{PILOT_TABLE}")
        else:
            print(table, end="")
        return 0
    if args.action == "curves":
        if args.every <= 0:
            parser.error("--every must be > 0")
        print_curves(args.every)
        return 0
    if args.action == "command":
        print(" ".join(_job(args.job).command(args.minutes, args.data_dir)))
        return 0
    if args.minutes <= 0 or args.lanes < 1 or args.threads < 1:
        parser.error("--minutes must be > 0, --lanes >= 1 and --threads >= 1")
    log_dir = REPO_ROOT / args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    return Lanes(args.minutes, args.lanes, args.data_dir, log_dir, args.note, args.threads, args.only).run()


if __name__ == "__main__":
    sys.exit(main())
