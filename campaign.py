"""campaign.py: long CPU work cut into resumable segments whose whole state is committed under campaign/.

For machines with a job time limit (a Slurm allocation, a preemptible instance): the long runs of the story
(model01 to the paper's 3280 epochs, L_5000 re-scores of the published checkpoints) go in segments that each fit
one allocation. Every job is an ordinary `modelNN.py` command with `--segment-minutes`, whose out-dir lives in
campaign/ and is committed after the segment. A segment ends by saving the run's full state -- ckpt.pt (weights,
Adam, EMA, data order, every RNG state) or test_eval.pt (the per-image bounds so far and the random state) -- and
exiting 75; the next allocation runs the same command and continues bit for bit (tests/test_segments.py).
A job that finishes publishes its result (--publish), and README's tables are regenerated.

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
    # a re-score is done once its checkpoint's published result is at S >= 5000, whoever published it (the GPU script),
    # and, for a per-image job, once that result carries its per-image values (see `rescored`)
    published_result: str | None = None
    needs_per_image: bool = False
    # a pilot: a short training run that only validates (--no-test) and is never published; `pilots` compares them
    pilot: bool = False

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
               self.out_dir, *([] if self.pilot else ["--publish"])]
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
           f"L_5000 on the full test set of the published {checkpoint} (published with fewer samples or images)")
    return Job(f"{'perimage' if per_image else 'eval5000'}_{checkpoint}", script,
               # --eval-chunk explicit: the published model04 checkpoints carry 2048 in their config; --n-test 0: all
               # test images, whatever the training run scored
               ["--eval-only", "--checkpoint", f"checkpoints/{checkpoint}.pt", "--eval-samples", "5000",
                "--eval-chunk", "128", "--n-test", "0"],
               why, published_result=f"results/{checkpoint}.json", needs_per_image=per_image)


PILOT_MINUTES = 60  # training time of every pilot (its validations included): candidates compare at equal time


def pilot(group: str, variant: str, script: str, args: list[str], why: str) -> Job:
    """One candidate of a recipe: `args` is the long run's command line; the pilot trains it for PILOT_MINUTES of one
    core, validating as it goes, and never touches the test set. The chosen recipe's campaign job starts afresh from
    the same seed (its first hour repeats its pilot)."""
    return Job(f"pilot_{group}_{variant}", script, [*args, "--max-train-minutes", str(PILOT_MINUTES), "--no-test"],
               why, pilot=True)


FULL_TEST_IMAGES = 10_000  # the test set of every data set the campaign runs on


def rescored(result: dict, per_image: bool) -> bool:
    """Whether a published result needs no re-score: at S >= 5000 on the whole test set and, when `per_image`, with
    its per-image values. (scripts/gpu_campaign.sh asks this too, with per_image=True, before re-scoring a checkpoint
    on a GPU.)"""
    return (result.get("eval_samples", 0) >= 5000 and result.get("n_test", 0) >= FULL_TEST_IMAGES
            and (not per_image or bool(result.get("test_ll_per_image"))))


# Pilots first: each group's candidates for one long run, an hour of one core each (`campaign.py pilots` compares
# them at equal training time). The `args` are the long run's own command line (its epochs sized to the group's
# budget at the speed measured so far): a pilot is the first hour of the run it stands for.
# model04 on binarized MNIST, about 40 core-hours of training: which recipe reaches the best validation bound?
_M04_BIN = ["--dataset", "binarized-mnist", "--batch-size", "64", "--kl-warmup-steps", "2000", "--val-every", "1500",
            "--checkpoint-every", "1500", "--log-every", "500"]
# The colour ladder on cifar10-jpeg: every rung and ablation row with one batch, one step count (30k steps of 32
# images, about 19 epochs) and one objective, the ELBO (k=1: model04's own; model02/03 train on IWAE k=5 by default,
# which would cost them 5 decoder passes per image and give them a different objective from the row they are
# compared with), so the pilots pick each rung's width at that budget. A validation pass of the colour models at
# S=100 costs minutes on a CPU: S=10, the same for every row.
_CIFAR = ["--dataset", "cifar10-jpeg", "--batch-size", "32", "--max-steps", "30000", "--importance-samples", "1",
          "--val-every", "2000", "--val-samples", "10", "--checkpoint-every", "2000", "--log-every", "250"]
PILOTS = [
    pilot("m04bin", "w32", "model04.py", [*_M04_BIN, "--width", "32", "--epochs", "500"],
          "model04 on binarized MNIST, width 32, ELBO k=1 with analytic KL: the baseline of the recipe"),
    pilot("m04bin", "w64", "model04.py", [*_M04_BIN, "--width", "64", "--epochs", "180"],
          "as w32 but twice the width (about a third of the steps in the same time)"),
    pilot("m04bin", "w32-iwae5", "model04.py", [*_M04_BIN, "--width", "32", "--objective", "iwae", "-k", "5",
                                                "--epochs", "150"],
          "as w32 but trained on the IWAE bound with k=5 (each step runs the top-down pass 5 times)"),
    pilot("m04bin", "w32-freebits1", "model04.py", [*_M04_BIN, "--width", "32", "--free-bits", "1", "--epochs", "500"],
          "as w32 with 1 nat of free bits per layer (against collapsed layers)"),
    pilot("m04bin", "w32-L12", "model04.py", [*_M04_BIN, "--width", "32", "--latent-layers", "12", "--epochs", "300"],
          "as w32 with 12 stochastic layers instead of 6"),
    pilot("m04bin", "w32-blocks2", "model04.py", [*_M04_BIN, "--width", "32", "--blocks-per-layer", "2",
                                                  "--epochs", "350"],
          "as w32 with two residual blocks after each stochastic layer"),
    pilot("m04bin", "w32-lr2e-3", "model04.py", [*_M04_BIN, "--width", "32", "--lr", "2e-3", "--epochs", "500"],
          "as w32 with twice the peak learning rate"),
    pilot("cifar", "m03-w32", "model03.py", [*_CIFAR, "--width", "32"],
          "model03 (bounded discretized logistic) on cifar10-jpeg at its default width"),
    pilot("cifar", "m03-w64", "model03.py", [*_CIFAR, "--width", "64"], "model03 on cifar10-jpeg, twice the width"),
    pilot("cifar", "m04-w32", "model04.py", [*_CIFAR, "--width", "32"],
          "model04 (6 layers, MoDL K=10 with RGB coupling) on cifar10-jpeg at width 32"),
    pilot("cifar", "m04-w64", "model04.py", [*_CIFAR, "--width", "64"], "model04 on cifar10-jpeg, twice the width"),
]


# The colour ladder and model04's ablation on cifar10-jpeg: every row with _CIFAR's batch, step count, objective and
# seed, so rows differ only by the experiment. Each training job ends with L_5000 on the first 1,000 test images
# (the same images for every row: compare.py pairs them, paired.py reads the ablation from them); the three rows the
# ladder compares on the whole test set (model02 and model03 bounded, model04) get the 10,000 by a re-score, which
# on a CPU costs tens of hours for model04 (its 32x32 MoDL head; scripts/gpu_campaign.sh does it where a GPU is lent).
# Widths: the rungs' defaults of 32 channels, the wider row 64 (the pilots above time both).
_CIFAR_TEST = ["--n-test", "1000", "--eval-samples", "5000", "--eval-chunk", "128"]
_M04_CIFAR = [*_CIFAR, *_CIFAR_TEST, "--width", "32"]
_ONE_LAYER = ["--latent-layers", "1", "--top-down-layers", "6"]  # the same network with one stochastic layer
_NO_COUPLING, _LOGISTIC = ["--no-rgb-coupling"], ["--mixture-components", "1", "--no-rgb-coupling"]
COLOUR_JOBS = [
    Job("model02_cifar10-jpeg_iwae_k1_seed0", "model02.py", [*_CIFAR, *_CIFAR_TEST],
        "the ladder in colour, rung 2: Gaussian p(x|z) with the tanh-bounded log-variance"),
    Job("model03_cifar10-jpeg_iwae_k1_seed0", "model03.py", [*_CIFAR, *_CIFAR_TEST],
        "rung 3: discretized logistic p(x|z) with the bounded scale"),
    Job("model04_cifar10-jpeg_vae_k1_L6_w32_seed0", "model04.py", _M04_CIFAR,
        "rung 4 and the ablation's full row: 6 stochastic layers, MoDL K=10 with RGB coupling"),
    Job("model04_cifar10-jpeg_vae_k1_L1of6_w32_seed0", "model04.py", [*_M04_CIFAR, *_ONE_LAYER],
        "ablation (c) several stochastic layers: the same network and p(x|z) with one stochastic layer"),
    Job("model04_cifar10-jpeg_vae_k1_L6_w32_nocoupling_seed0", "model04.py", [*_M04_CIFAR, *_NO_COUPLING],
        "ablation (b) RGB autoregression: MoDL K=10 with the channels independent given the component"),
    Job("model04_cifar10-jpeg_vae_k1_L6_w32_K1_nocoupling_seed0", "model04.py", [*_M04_CIFAR, *_LOGISTIC],
        "ablation (b) the mixture: one discretized logistic per channel (model03's p(x|z), with model04's scale floor)"),
    Job("model04_cifar10-jpeg_vae_k1_L1of6_w32_nocoupling_seed0", "model04.py",
        [*_M04_CIFAR, *_ONE_LAYER, *_NO_COUPLING], "ablation: one stochastic layer, MoDL K=10 without coupling"),
    Job("model04_cifar10-jpeg_vae_k1_L1of6_w32_K1_nocoupling_seed0", "model04.py",
        [*_M04_CIFAR, *_ONE_LAYER, *_LOGISTIC], "ablation: one stochastic layer, one discretized logistic"),
    Job("model04_cifar10-jpeg_vae_k1_L6_seed0", "model04.py", [*_CIFAR, *_CIFAR_TEST, "--width", "64"],
        "ablation (a) a bigger network: the full row at twice the width (about three times the cost per step)"),
    Job("model02_cifar10-jpeg_iwae_k1_unbounded_seed0", "model02.py", [*_CIFAR, *_CIFAR_TEST, "--no-variance-bound"],
        "rung 2 without the variance bound: the samples that break"),
    Job("model03_cifar10-jpeg_iwae_k1_unbounded_seed0", "model03.py", [*_CIFAR, *_CIFAR_TEST, "--no-variance-bound"],
        "rung 3 without the bounded scale"),
    # the ladder's three rows on all 10,000 test images (their training jobs scored the first 1,000)
    *[rescore(name) for name in ("model02_cifar10-jpeg_iwae_k1_seed0", "model03_cifar10-jpeg_iwae_k1_seed0",
                                 "model04_cifar10-jpeg_vae_k1_L6_w32_seed0")],
]

# In order: a free lane takes the first job that is neither finished nor running.
JOBS = [
    *PILOTS,
    *COLOUR_JOBS,
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
    # and moved before the batch-20 run's remaining epochs: by epoch 1200 the batch-20 run was 0.09 nats ahead of
    # the batch-100 run and --init burda 0.19 (`python campaign.py curves`), so the two together are the campaign's
    # best chance at the paper's number; the batch-20 run is their pair and runs after (or beside) it.
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
    # the GPU script does all five in minutes (scripts/gpu_campaign.sh step 4 asks the same `rescored`).
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
    done = [r for r in _log_rows(out) if r.get("type") == "done"] if job.pilot else []
    if done:
        return {**status, "state": "finished",
                "detail": f"pilot: step {done[-1]['step']:,} after {done[-1]['train_time_s'] / 60:.0f} min of training, "
                          f"best validation bound {done[-1]['best_val_bound_nats']:.2f} nats at step "
                          f"{done[-1]['best_step']:,} (no test set)"}
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


def pilot_row(job: Job) -> list[str] | None:
    """[variant, steps, epochs, images/s, best validation bound at each of PILOT_CHECKPOINTS_MIN] from the pilot's
    log.jsonl (its validations record the training time they came at); None before its first validation."""
    rows = _log_rows(REPO_ROOT / job.out_dir)
    validations = [r for r in rows if r.get("type") == "val" and "train_time_s" in r]
    if not validations:
        return None
    trains = [r for r in rows if r.get("type") == "train"]
    speeds = sorted(r["images_per_s"] for r in trains)
    cells = []
    for minutes in PILOT_CHECKPOINTS_MIN:
        reached = [r["val_bound_nats"] for r in validations if r["train_time_s"] <= 60 * minutes + 1]
        finished = any(r.get("type") == "done" for r in rows) or validations[-1]["train_time_s"] >= 60 * minutes
        cells.append(f"{max(reached):.2f}" if reached and finished else "—")
    last = trains[-1] if trains else {"step": validations[-1]["step"], "epoch": float("nan")}
    return [job.name.split("_", 2)[2], f"{last['step']:,}", f"{last['epoch']:.1f}",
            f"{speeds[len(speeds) // 2]:.0f}" if speeds else "—", *cells]


def pilot_table() -> str:
    """Markdown: per group, every candidate's best validation bound (nats, higher is better) after 15..60 minutes of
    training on one core, with the command line that differs."""
    groups: dict[str, list[Job]] = {}
    for job in PILOTS:
        groups.setdefault(job.name.split("_")[1], []).append(job)
    header = ["variant", "steps", "epochs", "images/s (median)", *[f"best val @ {m} min" for m in PILOT_CHECKPOINTS_MIN]]
    parts = ["# Pilots\n\nWritten by `python campaign.py pilots --write` from the pilots' `log.jsonl` "
             "(`campaign/pilot_*`). Each candidate trains for an hour of one CPU thread (`--max-train-minutes "
             f"{PILOT_MINUTES} --no-test`: validation only, the test set untouched); the columns give its best "
             "validation bound (nats, higher is better) once it had trained that long. Training time includes the "
             "validation passes (the same step interval and S for every candidate of a group). Speeds depend on the machine and on what else ran beside a pilot: read them "
             "within a group, and see each log's config record for the machine."]
    for group, jobs in groups.items():
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for job in jobs:
            row = pilot_row(job)
            row = row or [job.name.split("_", 2)[2], "not run yet"] + [""] * (len(header) - 2)
            lines.append("| " + " | ".join(row) + " |")
        whys = "\n".join(f"- `{job.name.split('_', 2)[2]}`: {job.why}: `{' '.join(job.command(None, None))}`"
                          for job in jobs)
        parts.append(f"## {group}\n\n" + "\n".join(lines) + "\n\n" + whys)
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
    pilots = sub.add_parser("pilots", help="the pilots' best validation bounds at equal training time (markdown)")
    pilots.add_argument("--write", action="store_true", help=f"write it to {CAMPAIGN_DIR}/{PILOT_TABLE} instead of printing")
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
    if args.action == "pilots":
        table = pilot_table()
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
