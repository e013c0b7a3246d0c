"""A run's configuration: the TrainConfig dataclass every rung extends, the command-line flags they share, their
checks, the keys that may change when a run resumes, and the run's name built from its config."""
import argparse
from dataclasses import dataclass, fields

import data as data_lib
from runtime import EXIT_SEGMENT_END, UserError


@dataclass
class TrainConfig:
    """Flags shared by every rung. A rung subclasses it with its model's fields."""
    # data
    dataset: str = "binarized-mnist"
    data_dir: str | None = None  # None: $VAE_DATA_DIR, then ./data
    image_size: int | None = None  # image folders: side S of the S x S images (None: 32, one size in the folder)
    grey: bool = False  # image folders: 1 channel (luma) instead of RGB
    # objective
    importance_samples: int = 5  # k, importance samples per image in training
    objective: str = "iwae"  # iwae: L_k bound; vae: k-sample ELBO
    kl_warmup_steps: int = 0  # weight of log p(z) - log q(z|x) ramps 0 -> 1 over these steps
    # optimisation
    epochs: int = 100
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 100  # global batch (split across torchrun processes)
    lr: float = 1e-3
    min_lr: float = 1e-4  # end of the cosine schedule
    lr_schedule: str = "cosine"  # cosine | iwae (Burda et al.: 8 stages of 3^i, lr 10^(-i/7)) | constant
    warmup_steps: int = 0  # linear lr warm-up
    adam_eps: float = 1e-4  # as in the IWAE paper
    grad_clip: float = 100.0  # clip the global gradient norm to this
    skip_threshold: float = 1e4  # skip updates whose gradient norm (before clipping) exceeds this
    max_consecutive_skips: int = 200  # stop the run after this many skipped updates in a row
    ema_decay: float = 0.0  # > 0: evaluate an exponential moving average of the weights
    amp: bool = True  # bf16 autocast of training steps on CUDA (likelihood maths stays float32)
    # bf16 autocast of training steps on CPU as well: about 2x faster on CPUs with native bf16 matrix units
    # (AVX512-BF16, AMX), much slower elsewhere; off by default so CPU runs train in float32 everywhere
    cpu_bf16: bool = False
    compile: bool = False  # torch.compile the model's forward
    # evaluation
    eval_samples: int = 5000  # S, importance samples per test image for the final L_S
    val_samples: int = 100  # importance samples per validation image during training
    val_every: int = 0  # steps between validations; 0: once per epoch
    n_test: int = 0  # test images used; 0: the whole test set
    eval_chunk: int = 0  # latent samples (k*B) per forward pass in evaluation; 0: automatic
    # run
    seed: int = 0
    out_dir: str | None = None  # None: runs/<run name>
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 100  # steps between log lines (the only host syncs of the hot path)
    checkpoint_every: int = 5000  # steps between checkpoints (and one at the end)
    max_train_minutes: float = 0.0  # > 0: stop training after this wall time, then evaluate
    no_test: bool = False  # validation only: no test-set pass, no result.json (pilots that choose a recipe)
    # > 0: this invocation stops after about this many minutes (of training or of the test evaluation), saves
    # its state and exits 75; the same command continues bit-exactly. Cuts a long run into resumable segments.
    segment_minutes: float = 0.0
    quick: bool = False  # a real but tiny run (see quick_overrides)
    publish: bool = False  # copy figures to assets/ and result.json to results/
    resume: bool = False  # continue the run in out_dir from ckpt.pt
    wandb: bool = False  # log to Weights & Biases (offline without an API key)
    eval_only: bool = False  # evaluate --checkpoint and redraw its figures, no training
    checkpoint: str | None = None  # checkpoint for --eval-only
    figures_only: bool = False  # with --eval-only: redraw the figures only (no test-set L_S, no result.json)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config keys for {cls.__name__}: {', '.join(unknown)}")
        return cls(**values)


# Keys that may change between a checkpoint and the run that resumes or re-evaluates it.
RUN_CONTROL_KEYS = {"data_dir", "out_dir", "device", "log_every", "checkpoint_every", "max_train_minutes",
                    "segment_minutes",
                    "publish", "resume", "wandb", "eval_only", "checkpoint", "eval_samples", "n_test",
                    "eval_chunk", "compile", "epochs", "max_steps", "figures_only",
                    "max_consecutive_skips", "no_test",  # only where a run stops, never what it computes ...
                    "cpu_bf16"}  # ... except the precision of CPU steps (as device): kept in precision_history
# cpu_bf16 may change on resume because bf16 is fast only where the CPU has it natively (AVX512-BF16, AMX) and
# emulated, several times slower than float32, elsewhere; a campaign that moves between machines picks the
# fast precision of each, and the checkpoint and result.json record which steps ran in which.
# Of those, the ones --eval-only takes from the command line (the rest come from the checkpoint).
EVAL_OVERRIDE_KEYS = {"data_dir", "out_dir", "device", "eval_samples", "n_test", "eval_chunk", "publish", "seed",
                      "segment_minutes"}


def quick_overrides(cfg) -> dict:
    """--quick: a real but tiny run, about a minute on 2 CPU cores."""
    return dict(max_steps=500, n_test=1000, eval_samples=100, val_samples=10, val_every=250,
                log_every=50, checkpoint_every=250)


def add_common_args(parser: argparse.ArgumentParser, defaults: TrainConfig, datasets: list[str] | None = None):
    """The flags every rung shares; defaults come from the rung's config dataclass. `datasets`
    restricts --dataset to the sets the rung can model (default: all of data.DATASETS)."""
    d = defaults
    a = parser.add_argument
    names = list(datasets or data_lib.DATASETS)
    folders = any(data_lib.is_folder(n) for n in names)  # rungs for 8-bit images take any image folder
    a("--dataset", default=d.dataset, type=data_lib.dataset_arg(names, folders), metavar="DATASET",
      help=f"data set: {', '.join(names)}" + (", or folder:PATH, a directory of images in torchvision's "
                                              "ImageFolder layout (train/, test/, optional val/)" if folders else "")
      + f" (default {d.dataset})")
    a("--data-dir", default=None, help="data root (default: $VAE_DATA_DIR, then ./data)")
    if folders:
        a("--image-size", type=int, default=None,
          help="image folders: centre-crop and resize every image to SxS (default: 32, and the folder's images "
               "must share one size)")
        a("--grey", action="store_true", help="image folders: convert the images to one grey channel instead of RGB")
    a("--importance-samples", "-k", type=int, default=d.importance_samples,
      help=f"importance samples k per image in training (default {d.importance_samples})")
    a("--objective", default=d.objective, choices=["iwae", "vae"],
      help="iwae: importance-weighted bound L_k; vae: k-sample ELBO")
    a("--kl-warmup-steps", type=int, default=d.kl_warmup_steps, help="steps over which the KL weight ramps to 1")
    a("--epochs", type=int, default=d.epochs, help=f"training epochs (default {d.epochs})")
    a("--max-steps", type=int, default=d.max_steps, help="training steps; overrides --epochs when > 0")
    a("--batch-size", type=int, default=d.batch_size, help=f"global batch size (default {d.batch_size})")
    a("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    a("--min-lr", type=float, default=d.min_lr, help="final learning rate of the cosine schedule")
    a("--lr-schedule", default=d.lr_schedule, choices=["cosine", "iwae", "constant"],
      help="cosine decay to --min-lr; iwae: Burda et al.'s 8 stages (3^i) with lr*10^(-i/7); constant")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up steps")
    a("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this")
    a("--skip-threshold", type=float, default=d.skip_threshold,
      help="skip (and count) updates whose gradient norm exceeds this")
    a("--max-consecutive-skips", type=int, default=d.max_consecutive_skips,
      help="stop after this many skipped updates in a row")
    a("--ema-decay", type=float, default=d.ema_decay, help="EMA of weights for evaluation (0: off)")
    a("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast of training steps on CUDA")
    a("--cpu-bf16", action="store_true",
      help="bf16 autocast of training steps on CPU too (fast only with AVX512-BF16/AMX; may change when a run "
           "resumes, recorded in precision_history); evaluation stays float32")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--eval-samples", type=int, default=d.eval_samples,
      help=f"importance samples per test image for the final bound (default {d.eval_samples})")
    a("--val-samples", type=int, default=d.val_samples, help="importance samples per validation image")
    a("--val-every", type=int, default=d.val_every, help="steps between validations (0: every epoch)")
    a("--n-test", type=int, default=d.n_test, help="test images to evaluate (0: all)")
    a("--eval-chunk", type=int, default=d.eval_chunk, help="latent samples per evaluation pass (0: auto)")
    a("--seed", type=int, default=d.seed, help="random seed")
    a("--out-dir", default=None, help="run directory (default runs/<name built from the config>)")
    a("--device", default=d.device, help="auto (CUDA if present), cpu, cuda or cuda:N")
    a("--log-every", type=int, default=d.log_every, help="steps between log lines")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    a("--no-test", action="store_true",
      help="train and validate only: no test-set evaluation, no result.json (a pilot choosing a recipe on the "
           "validation bound)")
    a("--max-train-minutes", type=float, default=d.max_train_minutes,
      help="stop training after this many minutes, then evaluate (0: no limit)")
    a("--segment-minutes", type=float, default=d.segment_minutes,
      help="stop this invocation after about this many minutes of training or test evaluation, save the state "
           f"and exit {EXIT_SEGMENT_END}; the same command continues exactly where it stopped (0: no limit)")
    a("--quick", action="store_true", help="a real but tiny run, about a minute on 2 CPU cores (the rung's quick settings: a few hundred steps, a test subset, few eval samples)")
    a("--publish", action="store_true", help="copy figures to assets/ and result.json to results/")
    a("--resume", action="store_true", help="continue the run in --out-dir from its ckpt.pt")
    a("--wandb", action="store_true", help="log to Weights & Biases (offline without WANDB_API_KEY)")
    a("--eval-only", action="store_true",
      help="evaluate --checkpoint and redraw its figures, no training; writes into --out-dir "
           "(default: eval_<checkpoint name>/ beside the checkpoint)")
    a("--checkpoint", default=None, help="checkpoint file for --eval-only")
    a("--figures-only", action="store_true",
      help="with --eval-only: redraw the checkpoint's seeded figures (and copy them to assets/ with --publish); "
           "skips the test-set evaluation and writes no result.json")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Config keys given on the command line (so --eval-only can take the rest from the checkpoint)."""
    given = set()
    for token in argv:
        opt = token.split("=", 1)[0]
        action = parser._option_string_actions.get(opt)
        if action is not None:
            given.add(action.dest)
    return given


def validate_config(cfg: TrainConfig):
    """Values no run can start with: UserError (exit 2) before anything is read or written."""
    checks = [
        (cfg.importance_samples >= 1, f"--importance-samples must be >= 1, got {cfg.importance_samples}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.eval_samples >= 1, f"--eval-samples must be >= 1, got {cfg.eval_samples}"),
        (cfg.val_samples >= 1, f"--val-samples must be >= 1, got {cfg.val_samples}"),
        (cfg.image_size is None or cfg.image_size >= 1, f"--image-size must be >= 1, got {cfg.image_size}"),
        (cfg.epochs >= 1 or cfg.max_steps >= 1, "--epochs or --max-steps must be >= 1"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
        (cfg.n_test >= 0, f"--n-test must be >= 0, got {cfg.n_test}"),
        (0.0 <= cfg.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.log_every >= 1 and cfg.checkpoint_every >= 1, "--log-every and --checkpoint-every must be >= 1"),
        (cfg.segment_minutes >= 0, f"--segment-minutes must be >= 0, got {cfg.segment_minutes}"),
        (cfg.max_consecutive_skips >= 1, f"--max-consecutive-skips must be >= 1, got {cfg.max_consecutive_skips}"),
        (not (cfg.eval_only and not cfg.checkpoint), "--eval-only needs --checkpoint PATH"),
        (not (cfg.eval_only and cfg.resume), "--eval-only and --resume exclude each other"),
        (not (cfg.figures_only and not cfg.eval_only), "--figures-only needs --eval-only --checkpoint PATH"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def config_differences(saved: dict, current: dict, ignore: set[str]) -> list[str]:
    """One "key: checkpoint A vs now B" line for every key outside `ignore` whose value differs."""
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def dataset_name(cfg) -> str:
    """The data set's name in run names, result files and assets (an image folder's is built from its name)."""
    return data_lib.dataset_info(cfg.dataset, cfg.image_size, cfg.grey).name


def load_run_data(cfg, device) -> data_lib.Data:
    """The run's data set, with the image options of an image folder."""
    return data_lib.load_data(cfg.dataset, cfg.data_dir, device, image_size=cfg.image_size, grey=cfg.grey)


def check_dataset_identity(ckpt: dict, info: data_lib.DatasetInfo, path):
    """An image-folder checkpoint belongs to the folder content it was trained on (content_sha256)."""
    trained_on = ckpt.get("dataset_sha256")
    if trained_on and trained_on != info.content_sha256:
        raise UserError(f"checkpoint {path} was trained on an image folder with content sha256 {trained_on[:16]}..., "
                        f"but {info.folder} has {str(info.content_sha256)[:16]}...: another set of images. Point "
                        f"--data-dir or --dataset at the folder it was trained on.")


def run_name(rung, cfg) -> str:
    """runs/<this>: the rung, data set, objective, k, the rung's own suffix and the seed."""
    name = f"{rung.name}_{dataset_name(cfg)}_{cfg.objective}_k{cfg.importance_samples}"
    if rung.run_suffix is not None:
        name += rung.run_suffix(cfg)
    name += f"_seed{cfg.seed}"
    return name + ("_quick" if cfg.quick else "")
