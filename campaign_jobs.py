"""campaign_jobs.py: what the campaign runs -- every job of campaign.py, in queue order, and how a job becomes a command.

A job is an ordinary `modelNN.py` command with its out-dir under campaign/ (the job's name): a training run that
publishes its result when it finishes, a re-score (`--eval-only` of a published checkpoint at S=5000), or a pilot (an
hour of training that only validates, never published; `campaign.py pilots` compares them). campaign.py runs them in
resumable segments; this file only says what they are and why.
"""
from dataclasses import dataclass

CAMPAIGN_DIR = "campaign"


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
    # the pilot whose run this job is (the same config but for run control: the pilot is its first hour): once the
    # pilot finishes, the job starts from the pilot's state instead of repeating that hour (campaign.continue_pilots)
    continues: str | None = None

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


def rescore(checkpoint: str, per_image: bool = False, eval_chunk: int = 128) -> Job:
    """L_5000 of a published checkpoint on the full test set; `per_image`: again, for a row published at S=5000 before
    evaluations kept each test image's value (its own out-dir: the first re-score's result.json stays as it is).
    `eval_chunk` 0: the rung's CPU default for the checkpoint's data and p(x|z)."""
    script = checkpoint.split("_", 1)[0] + ".py"
    why = (f"per-image test L_5000 of the published {checkpoint} (published at S=5000 without them), for paired "
           f"comparisons on the same test images" if per_image else
           f"L_5000 on the full test set of the published {checkpoint} (published with fewer samples or images)")
    return Job(f"{'perimage' if per_image else 'eval5000'}_{checkpoint}", script,
               # --eval-chunk explicit: the published model04 checkpoints carry 2048 in their config; --n-test 0: all
               # test images, whatever the training run scored
               ["--eval-only", "--checkpoint", f"checkpoints/{checkpoint}.pt", "--eval-samples", "5000",
                "--eval-chunk", str(eval_chunk), "--n-test", "0"],
               why, published_result=f"results/{checkpoint}.json", needs_per_image=per_image)


PILOT_MINUTES = 60  # training time of every pilot (its validations included): candidates compare at equal time


def pilot(group: str, variant: str, script: str, args: list[str], why: str) -> Job:
    """One candidate of a recipe: `args` is the long run's command line; the pilot trains it for PILOT_MINUTES of one
    core, validating as it goes, and never touches the test set. A campaign job whose config is the pilot's but for
    run control (its test flags) names it in `continues` and starts from the pilot's state; otherwise the chosen
    recipe's job starts afresh from the same seed (its first hour repeats its pilot)."""
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
    pilot("m04bin", "w32-freebits1-noema", "model04.py", [*_M04_BIN, "--width", "32", "--free-bits", "1",
                                                          "--ema-decay", "0", "--epochs", "500"],
          "as w32-freebits1 without the exponential moving average of the weights (every other candidate validates "
          "model04's default EMA, decay 0.9995): the raw weights validated"),
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
# on a CPU costs tens of hours for model04 (its 32x32 MoDL head; scripts/gpu_campaign.sh does it on a machine with a GPU).
# Widths: the rungs' defaults of 32 channels, the wider row 64 (the pilots above time both). Latents per evaluation
# pass: each rung's CPU default (--eval-chunk 0; model04's depends on its p(x|z), see model04.cpu_eval_chunk).
_CIFAR_TEST = ["--n-test", "1000", "--eval-samples", "5000"]
_M04_CIFAR = [*_CIFAR, *_CIFAR_TEST, "--width", "32"]
_ONE_LAYER = ["--latent-layers", "1", "--top-down-layers", "6"]  # the same network with one stochastic layer
_NO_COUPLING, _LOGISTIC = ["--no-rgb-coupling"], ["--mixture-components", "1", "--no-rgb-coupling"]
COLOUR_JOBS = [
    Job("model02_cifar10-jpeg_iwae_k1_seed0", "model02.py", [*_CIFAR, *_CIFAR_TEST],
        "the ladder in colour, rung 2: Gaussian p(x|z) with the tanh-bounded log-variance"),
    Job("model03_cifar10-jpeg_iwae_k1_seed0", "model03.py", [*_CIFAR, *_CIFAR_TEST],
        "rung 3: discretized logistic p(x|z) with the bounded scale", continues="pilot_cifar_m03-w32"),
    Job("model04_cifar10-jpeg_vae_k1_L6_w32_seed0", "model04.py", _M04_CIFAR,
        "rung 4 and the ablation's full row: 6 stochastic layers, MoDL K=10 with RGB coupling",
        continues="pilot_cifar_m04-w32"),
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
        "ablation (a) a bigger network: the full row at twice the width (about three times the cost per step)",
        continues="pilot_cifar_m04-w64"),
    Job("model02_cifar10-jpeg_iwae_k1_unbounded_seed0", "model02.py", [*_CIFAR, *_CIFAR_TEST, "--no-variance-bound"],
        "rung 2 without the variance bound: the samples that break"),
    Job("model03_cifar10-jpeg_iwae_k1_unbounded_seed0", "model03.py", [*_CIFAR, *_CIFAR_TEST, "--no-variance-bound"],
        "rung 3 without the bounded scale"),
    # the ladder's three rows on all 10,000 test images (their training jobs scored the first 1,000)
    rescore("model02_cifar10-jpeg_iwae_k1_seed0"), rescore("model03_cifar10-jpeg_iwae_k1_seed0"),
    rescore("model04_cifar10-jpeg_vae_k1_L6_w32_seed0", eval_chunk=0),
]

# In order: a free lane takes the first job that is neither finished nor running.
# model04 on binarized MNIST to the goal of its docstring (L_5000 >= -82 nats, 3 above model01's best row), with the
# recipe the m04bin pilots chose at equal minutes and equal steps (campaign/pilots.md): width 32 (width 64 and IWAE k=5
# are far behind), the ELBO with analytic KL, one block per layer, six layers, lr 1e-3, and 1 nat of free bits per
# layer. Free bits cost nothing per step and its pilot tracked the baseline's validation bound step for step (-83.3
# against -83.5 nats at step 9,000), while a layer may not collapse (the short published row's second layer had
# 0.37 nats; with free bits the weakest layer of the pilot, on the validation images, carries 1.2). Twelve layers
# were ahead per step (-83.9 against -85.9 at step 7,500) but not per minute (-83.9 against -82.3 for free bits
# at 60) and cost more per evaluation sample. Every other candidate validates model04's default EMA of the weights
# (decay 0.9995, about the last 2,000 steps): without it the free-bits recipe validated at -86.6 nats at step 3,000,
# where the EMA's weights had -136.7 (and reached -86 only by step 7,500): early on, the average lags the fast-moving
# weights by thousands of steps. By the hour the lag had worn off: without the EMA -82.40 at 60 minutes, with it
# -82.34; two blocks per layer -85.37 and lr 2e-3 -82.26 (without free bits), all within a few tenths of a nat of
# one another but blocks2. At the end of the cosine schedule (lr 1e-4, the weights barely moving over 2,000 steps)
# the EMA and the raw weights would nearly coincide, so the job validates and tests the raw weights
# (--ema-decay 0) and keeps lr 1e-3 and one block per layer.
# 120 epochs (about 110k steps; 9-10 hours of one core at the pilots' 200-240 images/s), then L_5000 on the 10,000
# test images (about 10 more hours at width 32). The free-bits pilot validated at -81.95 nats (S=100) after 12.5
# epochs with its learning rate still at the peak; ten times the epochs with the cosine decay to the end is the
# margin for the goal, at a quarter of the 40 core-hours the goal allows, which leaves the rest to the colour ladder.
# Validation every ~10 epochs: a pass of S=100 over the validation images costs minutes, and the pilots' every 1.6
# epochs would be a sixth of the run.
M04_BINARIZED = Job("model04_binarized-mnist_vae_k1_L6_w32_seed0", "model04.py",
                    ["--dataset", "binarized-mnist", "--batch-size", "64", "--kl-warmup-steps", "2000", "--width", "32",
                     "--free-bits", "1", "--ema-decay", "0", "--epochs", "120", "--val-every", "9000",
                     "--checkpoint-every", "4500", "--log-every", "1500", "--eval-samples", "5000", "--eval-chunk", "128"],
                    "model04's hierarchy against model01's single layer on binarized MNIST, the pilots' recipe, "
                    "L_5000 on the 10k test images")

JOBS = [
    *PILOTS,
    M04_BINARIZED,
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
    rescore("model04_fashion-mnist_vae_k1_L6_w32_seed0"),
    rescore("model04_binarized-mnist_vae_k1_L6_w32_seed0"),
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
        "model04_binarized-mnist_vae_k1_L6_w32_seed0")],
]
