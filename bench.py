"""bench.py: how fast the shared loop trains and evaluates, measured against a naive reference in the same run.

For every model in REGISTRY (one entry per rung) and on one device, in one process:
  train  images/s of our step -- training.train_step fed by data.Batcher, exactly what `train` runs:
         device-resident data batched by index, all k samples in one decoder pass, no host sync,
         bf16 autocast on CUDA, fused Adam with the skip decided on the device -- against a naive
         step on the same architecture, batch and k: a torch DataLoader over CPU tensors with a
         host->device copy per batch, one decoder pass per importance sample in a Python loop, fp32,
         plain (for-loop) Adam, torch.distributions' default argument validation and, for model01,
         torch's own Bernoulli (ours: distributions.FastBernoulli, same values), and the skip
         decided on the host (`.item()`). On CPU also `ours_cpu_bf16`: our step as
         `modelNN.py --cpu-bf16` runs it (bf16 autocast; fast on CPUs with AVX512-BF16 or AMX).
  eval   importance samples/s of evaluation.evaluate_bound (samples folded into chunks of
         evaluation.eval_chunk_size latents, a streaming log-sum-exp) against the naive loop, one decoder pass per
         sample. On CPU also `previous_cpu_defaults`: the same evaluate_bound as it ran on CPU before commit f5fc69e
         (passes of 2^14 latents, model02/03 in NCHW), i.e. the evaluation speed before and after that change.
         With --baseline-commit REV also `baseline`: the rung's script as it was at REV (beside this tree's shared
         modules), the same weights and passes: what a change to the model's code bought, and whether the
         per-image values stayed bit for bit the same.
  memory peak during each phase. CUDA: torch.cuda.max_memory_allocated (reset before the phase).
         CPU: the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs
         before the phase); it includes the data set, both models and the Python runtime.
  syncs  ops per training step that read a device value on the host (.item(), bool(tensor),
         nonzero, ...) and host<->device copies, counted by a torch dispatch mode.
Timings exclude warm-up; variants alternate inside every repeat (so a changing background load hits
both alike) and the medians over repeats are reported.

    python bench.py --device cpu     # model01 at 1 thread and at all cores -> results/bench_cpu.json
    python bench.py --device cuda    # every rung in REGISTRY -> results/bench_<gpu>.json, e.g. bench_h100.json
    python bench.py --device cpu --phases eval --models model01 model02 model03 model04 --threads 1 \
        --out results/bench_cpu_eval.json   # CPU evaluation of every rung, before/after (minutes, no training)
    python bench.py --device cpu --phases eval --models model04 --set width=32 --threads 1 \
        --baseline-commit 773431f --out results/bench_cpu_eval_model04.json   # model04's code against REV's

On a CPU whose cores other processes keep busy, more than one thread mostly measures contention (each
parallel op waits for a descheduled thread); `--threads 1` then gives the meaningful comparison.

Adding a rung: one REGISTRY entry (its script, the data set to run on, config overrides and, if it
has one, its naive per-sample forward).
"""
import argparse
import copy
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.distributions import Bernoulli, Independent

import data as data_lib
import evaluation
import run_files
import runtime
import training
from distributions import diagonal_gaussian, log_mean_exp
from measure import PeakMemory, count_host_syncs, interleaved_timings, synchronize

REPO_ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- naive forward passes


def naive_forward_model01(model, x: torch.Tensor, k: int) -> dict:
    """model01's forward written naively: the encoder once, then one decoder pass per importance sample,
    scored by the library's torch.distributions.Bernoulli (log_prob = binary_cross_entropy_with_logits;
    ours is distributions.FastBernoulli, the same values to float rounding)."""
    q = diagonal_gaussian(*model.posterior(model.encoder(x)))  # batch [B], event [L]
    prior = model.prior(x.device)
    per_sample = {"log_px_z": [], "log_pz": [], "log_qz": []}
    for _ in range(k):  # the loop that merge_samples removes
        z = q.rsample()  # [B, L]
        logits = model.decoder(z).reshape(x.shape)  # [B, 784] -> [B, 1, 28, 28]
        per_sample["log_px_z"].append(Independent(Bernoulli(logits=logits), 3).log_prob(x))  # [B]
        per_sample["log_pz"].append(prior.log_prob(z))
        per_sample["log_qz"].append(q.log_prob(z))
    return {key: torch.stack(values) for key, values in per_sample.items()}  # each [k, B]


class _Cached(torch.nn.Module):
    """Stands in for an encoder submodule: returns features computed once."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
        return self.features


def naive_forward_cached_encoder(model, x: torch.Tensor, k: int, encoder: str = "encoder") -> dict:
    """Any rung, naively: the encoder (submodule or method named `encoder`) once per image, then the
    model's own forward with one importance sample per pass, in a Python loop -- the decoder runs k
    times on B latents instead of once on k*B. Gradients reach the encoder through the shared features."""
    original = getattr(model, encoder)
    features = original(x)
    is_module = isinstance(original, torch.nn.Module)
    setattr(model, encoder, _Cached(features) if is_module else (lambda _x: features))
    try:
        outs = [model(x, 1) for _ in range(k)]  # k dicts of [1, B]
    finally:
        if is_module:
            setattr(model, encoder, original)
        else:
            delattr(model, encoder)  # the instance attribute hid the method
    return {key: torch.cat([o[key] for o in outs]) for key in ("log_px_z", "log_pz", "log_qz")}  # [k, B]


def naive_forward_encode_method(model, x: torch.Tensor, k: int) -> dict:
    """naive_forward_cached_encoder for rungs whose bottom-up pass is the method `encode` (model04)."""
    return naive_forward_cached_encoder(model, x, k, encoder="encode")


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BenchModel:
    script: str  # module name of the rung, e.g. "model01"
    dataset: str  # data set the benchmark trains on
    overrides: dict = field(default_factory=dict)  # config fields other than batch size and k
    naive_forward: callable = naive_forward_cached_encoder  # (model, x, k) -> dict of [k, B]


# model02/03 default to CIFAR-10; they are measured on 8-bit MNIST, which every data root of this repo holds.
REGISTRY = {
    "model01": BenchModel("model01", "binarized-mnist", naive_forward=naive_forward_model01),
    "model02": BenchModel("model02", "mnist"),
    "model03": BenchModel("model03", "mnist"),
    "model04": BenchModel("model04", "binarized-mnist", naive_forward=naive_forward_encode_method),
}


def available_models() -> list[str]:
    """Registry entries whose script exists in this checkout."""
    return [name for name, spec in REGISTRY.items() if (REPO_ROOT / f"{spec.script}.py").exists()]


# ----------------------------------------------------------------------------- the two training steps


class OurTraining:
    """training.train_step fed by data.Batcher, built the way training.train builds them."""

    def __init__(self, model, cfg, data, device, compile_model: bool = False, cpu_bf16: bool = False):
        cfg = replace(cfg, cpu_bf16=cpu_bf16)  # as `python modelNN.py --cpu-bf16` would run
        self.model, self.cfg, self.device = model, cfg, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = training.make_optimizer(self.params, cfg)
        self.batcher = data_lib.Batcher(data.train, cfg.batch_size, seed=cfg.seed)
        self.meters = training.StepMeters(device)
        self.amp = runtime.training_autocast(cfg, device)
        self.train_model = torch.compile(model) if compile_model else model
        self.step_count = 0

    def step(self):
        training.train_step(self.train_model, self.optimizer, self.params, self.batcher.next(), self.cfg,
                            self.step_count, 10 ** 9, self.meters, self.amp)
        self.step_count += 1

    def finite(self) -> bool:
        return self.meters.skipped.item() == 0


class NaiveTraining:
    """The straightforward loop: DataLoader on the host, per-sample decoder loop, fp32, plain Adam."""

    def __init__(self, model, cfg, data, device, naive_forward):
        self.model, self.cfg, self.device, self.naive_forward = model, cfg, device, naive_forward
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps,
                                          foreach=False, fused=False)
        train = data.train
        self.images_cpu = train.images.cpu()  # uint8 [N, C, H, W] in host memory
        self.to_float = train.to_float
        generator = torch.Generator().manual_seed(cfg.seed)
        self.loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.images_cpu),
                                                  batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                                  generator=generator)
        self.batches = iter(self.loader)
        self.n_skipped = 0

    def next_batch(self) -> torch.Tensor:
        try:
            (images,) = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            (images,) = next(self.batches)
        return self.to_float(images).to(self.device)  # binarize / scale on the host, then copy

    def step(self):
        x = self.next_batch()
        out = self.naive_forward(self.model, x, self.cfg.importance_samples)
        log_w = out["log_px_z"] + out["log_pz"] - out["log_qz"]  # [k, B]
        bound = log_mean_exp(log_w, dim=0) if self.cfg.objective == "iwae" else log_w.mean(0)  # [B]
        loss = -bound.mean()
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if math.isfinite(loss.item()) and grad_norm.item() <= self.cfg.skip_threshold:  # decided on the host
            self.optimizer.step()
        else:
            self.n_skipped += 1

    def finite(self) -> bool:
        return self.n_skipped == 0


@torch.no_grad()
def naive_evaluate(model, split: data_lib.Split, num_samples: int, naive_forward) -> torch.Tensor:
    """L_S per image with one decoder pass per importance sample (all S log-weights held, [S, B])."""
    model.eval()
    x = split.to_float(split.images)
    out = naive_forward(model, x, num_samples)
    model.train()
    return log_mean_exp(out["log_px_z"] + out["log_pz"] - out["log_qz"], dim=0).double().cpu()


# ----------------------------------------------------------------------------- one model


def build(spec: BenchModel, args, data, device):
    module = importlib.import_module(spec.script)
    rung = module.RUNG
    cfg = rung.config_class.from_dict({**asdict(rung.config_class()), **spec.overrides, **args.settings,
                                       "dataset": spec.dataset, "batch_size": args.batch_size,
                                       "importance_samples": args.importance_samples, "seed": args.seed})
    torch.manual_seed(args.seed)
    model = runtime.prepare_model(rung.build_model(cfg, data.info), device)
    return rung, cfg, model


def parse_settings(settings: list[str]) -> dict:
    """--set KEY=VALUE ... -> {key: value}, each value parsed as JSON where it can be (32, 1e-3, true), else a string.
    Unknown keys fail in the config class's from_dict."""
    values = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise runtime.UserError(f"--set takes KEY=VALUE (a config field of the rung, e.g. width=32), got {item!r}")
        try:
            values[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.replace("-", "_")] = raw
    return values


def script_at_commit(script: str, commit: str):
    """The rung's script as it was at `commit` (`git show`), imported as a module of its own. It runs beside this
    tree's shared modules (data, layers, distributions, ...), so it measures a change to the script alone."""
    shown = subprocess.run(["git", "show", f"{commit}:{script}.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        raise runtime.UserError(f"--baseline-commit {commit}: git cannot show {script}.py at that commit "
                                f"({shown.stderr.strip() or 'no output'}). Name a commit of this repository's history "
                                f"(a shallow clone may lack it: `git fetch --unshallow`).")
    name = f"{script}_at_{re.sub(r'[^A-Za-z0-9_]', '_', commit)}"
    path = Path(tempfile.mkdtemp(prefix="bench_baseline_")) / f"{name}.py"
    path.write_text(shown.stdout)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # its `if __name__ == "__main__"` block does not run
    return module


def median(values: list[float]) -> float:
    return statistics.median(values)


def bench_model(name: str, spec: BenchModel, args, device, memory: PeakMemory, data_cache: dict) -> dict:
    """One model at the current thread setting: training, evaluation, memory and syncs of ours and naive."""
    if args.dataset:  # --dataset: every rung on that data set instead of its registry entry's
        spec = replace(spec, dataset=args.dataset)
    if spec.dataset not in data_cache:
        data_cache[spec.dataset] = data_lib.load_data(spec.dataset, args.data_dir, device)
    data = data_cache[spec.dataset]
    rung, cfg, model_ours = build(spec, args, data, device)
    n_params = sum(p.numel() for p in model_ours.parameters())
    threads = torch.get_num_threads()
    result = {"model": name, "threads": threads, "script": f"{spec.script}.py", "dataset": spec.dataset,
              "parameters": n_params,
              "batch_size": cfg.batch_size, "importance_samples": cfg.importance_samples,
              "naive_forward": spec.naive_forward.__name__, "config_overrides": args.settings,
              "train": {}, "eval": {}}
    if "train" in args.phases:
        bench_training(spec, args, data, device, memory, rung, cfg, model_ours, result)
    if "eval" in args.phases:
        bench_evaluation(spec, args, data, device, memory, rung, cfg, model_ours, result)
    return result


def bench_training(spec, args, data, device, memory, rung, cfg, model_ours, result: dict):
    """Training images/s, peak memory and host syncs of ours, naive (and --compile / --cpu-bf16) -> result["train"]."""
    name, threads = result["model"], result["threads"]
    _, _, model_naive = build(spec, args, data, device)  # the same initial weights, its own optimizer
    ours = OurTraining(model_ours, cfg, data, device)
    naive = NaiveTraining(model_naive, cfg, data, device, spec.naive_forward)
    variants = {"ours": ours, "naive": naive}
    if args.compile:
        _, _, model_compiled = build(spec, args, data, device)
        variants["ours_compiled"] = OurTraining(model_compiled, cfg, data, device, compile_model=True)
    if device.type == "cpu":  # the opt-in --cpu-bf16 (bf16 autocast of the training step)
        _, _, model_bf16 = build(spec, args, data, device)
        variants["ours_cpu_bf16"] = OurTraining(model_bf16, cfg, data, device, cpu_bf16=True)
    # training.main switches validation off
    validate = {"ours": False, "naive": True, "ours_compiled": False, "ours_cpu_bf16": False}

    def runner(variant_name):
        variant = variants[variant_name]

        def run():
            torch.distributions.Distribution.set_default_validate_args(validate[variant_name])
            for _ in range(args.steps):
                variant.step()
        return run

    print(f"[{name}, {threads} threads] {result['parameters']:,} parameters, batch {cfg.batch_size}, "
          f"k={cfg.importance_samples}, {args.steps} steps x {args.repeats} repeats after {args.warmup_steps} "
          f"warm-up steps", flush=True)

    # host syncs of one step each (after one step, so lazily created state exists)
    for variant_name, variant in variants.items():
        if variant_name == "ours_compiled":
            continue
        torch.distributions.Distribution.set_default_validate_args(validate[variant_name])
        variant.step()
        synchronize(device)
        result["train"].setdefault(variant_name, {})["host_syncs_per_step"] = count_host_syncs(variant.step)

    # warm-up (its peak memory is the phase's: the first steps allocate everything), then the timed repeats
    for variant_name, variant in variants.items():
        torch.distributions.Distribution.set_default_validate_args(validate[variant_name])
        synchronize(device)
        memory.reset()
        start = memory.current_bytes()
        for _ in range(args.warmup_steps):
            variant.step()
        result["train"].setdefault(variant_name, {}).update(
            {"memory_at_start_bytes": start, "peak_memory_bytes": memory.peak_bytes()})
    seconds = interleaved_timings({n: runner(n) for n in variants}, args.repeats, device)
    torch.distributions.Distribution.set_default_validate_args(False)
    images = args.steps * cfg.batch_size
    for variant_name, variant in variants.items():
        per_repeat = [images / s for s in seconds[variant_name]]
        result["train"][variant_name].update({
            "images_per_s": median(per_repeat), "images_per_s_repeats": [round(v, 1) for v in per_repeat],
            "ms_per_step": 1000 * median(seconds[variant_name]) / args.steps, "all_steps_finite": variant.finite()})
    result["train"]["speedup"] = result["train"]["ours"]["images_per_s"] / result["train"]["naive"]["images_per_s"]
    if args.compile:
        result["train"]["speedup_compiled"] = (result["train"]["ours_compiled"]["images_per_s"]
                                               / result["train"]["naive"]["images_per_s"])
    if "ours_cpu_bf16" in variants:
        result["train"]["speedup_cpu_bf16"] = (result["train"]["ours_cpu_bf16"]["images_per_s"]
                                               / result["train"]["naive"]["images_per_s"])



PREVIOUS_CPU_EVAL_CHUNK = 1 << 14  # training._eval_chunk_size on CPU before commit f5fc69e


def bench_evaluation(spec, args, data, device, memory, rung, cfg, model_ours, result: dict):
    """Evaluation samples/s and peak memory of ours, naive (and on CPU the previous defaults) -> result["eval"].
    All variants score the same weights (trained for the training phase's steps, if it ran) and test images."""
    name, threads = result["model"], result["threads"]
    test = data.test.subset(args.eval_images)
    chunk = evaluation.eval_chunk_size(rung, cfg, device)
    eval_model = model_ours
    variants = {"ours": (eval_model, chunk), "naive": (eval_model, None)}
    for other in args.eval_chunks:  # the same weights and code at other pass sizes (each draws its own latents)
        variants[f"chunk_{other}"] = (eval_model, other)
    if device.type == "cpu" and not args.eval_chunks:  # as runtime.prepare_model built it on CPU before: no NHWC
        previous = rung.build_model(cfg, data.info).to(device)  # conversion of its own
        previous.load_state_dict(copy.deepcopy(eval_model.state_dict()))
        variants["previous_cpu_defaults"] = (previous, PREVIOUS_CPU_EVAL_CHUNK)
    if args.baseline_commit:  # the same weights in the model class of the script at that commit
        baseline = runtime.prepare_model(script_at_commit(spec.script, args.baseline_commit).RUNG.build_model(
            cfg, data.info), device)
        baseline.load_state_dict(copy.deepcopy(eval_model.state_dict()))
        variants["baseline"] = (baseline, chunk)
    lls = {}

    def eval_runner(variant_name):
        model, variant_chunk = variants[variant_name]

        def run():
            if variant_name == "naive":
                torch.distributions.Distribution.set_default_validate_args(True)
                lls["naive"] = naive_evaluate(model, test, args.eval_samples, spec.naive_forward)
            else:
                torch.distributions.Distribution.set_default_validate_args(False)
                lls[variant_name] = evaluation.evaluate_bound(model, test, args.eval_samples, seed=args.seed,
                                                            chunk=variant_chunk)
        return run

    print(f"[{name}, {threads} threads] evaluation: {args.eval_images} test images x {args.eval_samples} samples, "
          f"{args.eval_repeats} repeats", flush=True)
    for variant_name in variants:  # warm-up and peak memory
        memory.reset()
        start = memory.current_bytes()
        eval_runner(variant_name)()
        result["eval"][variant_name] = {"memory_at_start_bytes": start, "peak_memory_bytes": memory.peak_bytes()}
    seconds = interleaved_timings({n: eval_runner(n) for n in variants}, args.eval_repeats, device)
    torch.distributions.Distribution.set_default_validate_args(False)
    samples = args.eval_images * args.eval_samples
    for variant_name in variants:
        per_repeat = [samples / s for s in seconds[variant_name]]
        result["eval"][variant_name].update({
            "samples_per_s": median(per_repeat), "samples_per_s_repeats": [round(v, 1) for v in per_repeat],
            "chunk_latents": variants[variant_name][1], "ll_nats": lls[variant_name].mean().item()})
    ours = result["eval"]["ours"]["samples_per_s"]
    result["eval"].update({"eval_samples": args.eval_samples, "eval_images": args.eval_images, "chunk_latents": chunk,
                           "speedup": ours / result["eval"]["naive"]["samples_per_s"],
                           # the story's number: L_5000 on a 10,000-image test set at this rate, one process
                           "hours_for_test_l5000": 5000 * 10_000 / ours / 3600})
    if "previous_cpu_defaults" in variants:
        result["eval"]["speedup_vs_previous_cpu_defaults"] = ours / result["eval"]["previous_cpu_defaults"]["samples_per_s"]
    for other in args.eval_chunks:  # each pass size against ours (the rung's --eval-chunk for this device)
        result["eval"][f"speedup_chunk_{other}"] = result["eval"][f"chunk_{other}"]["samples_per_s"] / ours
    if "baseline" in variants:
        result["eval"]["baseline"]["commit"] = args.baseline_commit
        result["eval"]["speedup_vs_baseline"] = ours / result["eval"]["baseline"]["samples_per_s"]
        # the same seed, weights and passes: a change that keeps the bound keeps every per-image value
        result["eval"]["baseline"]["same_per_image_values"] = bool(torch.equal(lls["ours"], lls["baseline"]))


# ----------------------------------------------------------------------------- report


def device_slug(device: torch.device) -> str:
    """cpu, or the GPU's model: 'NVIDIA H100 80GB HBM3' -> h100, 'NVIDIA A100-SXM4-80GB' -> a100."""
    if device.type == "cpu":
        return "cpu"
    tokens = [t for t in re.split(r"[^a-z0-9]+", torch.cuda.get_device_name(device).lower())
              if t and t not in ("nvidia", "geforce", "tesla", "rtx")]
    with_digit = [t for t in tokens if any(c.isdigit() for c in t)]
    return (with_digit or tokens or ["cuda"])[0]


def print_table(report: dict):
    print(f"\ndevice: {report['device']}   torch {report['torch_version']}   "
          f"load average {report['load_average_1min_at_start']} -> {report['load_average_1min_at_end']}")
    print(f"{'model':8} {'threads':>7} {'phase':6} {'variant':22} {'rate':>16} {'peak mem':>10} {'host syncs/step':>16}")
    for res in report["results"]:
        name, threads = res["model"], res["threads"]
        for phase, unit, rate in (("train", "im/s     ", "images_per_s"), ("eval", "samples/s", "samples_per_s")):
            for variant, v in res[phase].items():
                if isinstance(v, dict):
                    syncs = v.get("host_syncs_per_step", {}).get("total", "-")
                    print(f"{name:8} {threads:>7} {phase:6} {variant:22} {v[rate]:>9.0f} {unit} "
                          f"{v['peak_memory_bytes'] / 2**20:>6.0f} MiB {syncs:>16}")
    print()
    for res in report["results"]:
        parts = []
        tr, ev = res["train"], res["eval"]
        if tr:
            line = f"training {tr['speedup']:.2f}x the naive step"
            if "speedup_compiled" in tr:
                line += f" ({tr['speedup_compiled']:.2f}x with torch.compile)"
            if "speedup_cpu_bf16" in tr:
                line += f", {tr['speedup_cpu_bf16']:.2f}x with --cpu-bf16"
            parts.append(line)
        if ev:
            line = (f"evaluation {ev['speedup']:.2f}x the naive per-sample loop (L_{ev['eval_samples']} on "
                    f"{ev['eval_images']} images: {ev['ours']['ll_nats']:.2f} vs {ev['naive']['ll_nats']:.2f} nats)")
            if "speedup_vs_previous_cpu_defaults" in ev:
                line += f", {ev['speedup_vs_previous_cpu_defaults']:.2f}x the previous CPU defaults"
            for key in sorted(k for k in ev if k.startswith("speedup_chunk_")):
                line += f", {ev[key]:.2f}x as fast with {key.rsplit('_', 1)[1]} latents per pass"
            if "speedup_vs_baseline" in ev:
                same = "same" if ev["baseline"]["same_per_image_values"] else "DIFFERENT"
                line += (f", {ev['speedup_vs_baseline']:.2f}x the script at {ev['baseline']['commit']} "
                         f"({same} per-image values)")
            parts.append(line + f"; L_5000 on 10k test images: {ev['hours_for_test_l5000']:.1f} h")
        print(f"{res['model']}, {res['threads']} threads: " + "; ".join(parts))
    print(f"peak memory: {report['memory_measure']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if present, else CPU")
    a("--models", nargs="+", default=None, choices=list(REGISTRY),
      help="models to measure (default: model01 on CPU, where conv rungs take many minutes; on CUDA every "
           "registry entry whose script exists)")
    a("--batch-size", type=int, default=100, help="training batch size (default 100, model01's)")
    a("--importance-samples", "-k", type=int, default=5, help="importance samples k per image in training (default 5)")
    a("--steps", type=int, default=10, help="timed training steps per repeat (default 10)")
    a("--warmup-steps", type=int, default=5,
      help="untimed training steps per variant first, over which peak memory is taken (default 5)")
    a("--repeats", type=int, default=5, help="timed repeats of the training steps; the median is reported (default 5)")
    a("--eval-samples", type=int, default=5000, help="importance samples per test image (default 5000)")
    a("--eval-images", type=int, default=None,
      help="test images evaluated per repeat (default: 4 on CPU, 100 on CUDA)")
    a("--eval-repeats", type=int, default=3, help="timed repeats of the evaluation (default 3)")
    a("--threads", type=int, nargs="+", default=None,
      help="torch CPU threads; several values measure each in turn (default on CPU: 1 and all cores, "
           "e.g. 1 2; on CUDA torch's choice)")
    a("--compile", action="store_true", help="also time our step with torch.compile (compile time excluded)")
    a("--phases", nargs="+", default=["train", "eval"], choices=["train", "eval"],
      help="what to measure (default both): training steps, evaluation of L_S")
    a("--data-dir", default=None, help="data root (default: $VAE_DATA_DIR, then ./data)")
    a("--seed", type=int, default=0, help="random seed")
    a("--set", nargs="+", default=[], metavar="KEY=VALUE",
      help="config fields of every measured rung, e.g. --set width=32 (unknown keys fail)")
    a("--dataset", default=None,
      help="data set of every measured rung, e.g. cifar10-jpeg (default: each rung's registry entry: MNIST variants)")
    a("--eval-chunks", type=int, nargs="+", default=[], metavar="N",
      help="eval phase: also time our evaluation at these latents per pass (variants chunk_N), e.g. --eval-chunks "
           "32 64, to pick --eval-chunk for a data set; replaces the previous-CPU-defaults variant")
    a("--baseline-commit", default=None, metavar="REV",
      help="eval phase: also time the rung's script as it was at git commit REV, with the same weights and passes")
    a("--out", default=None, help="JSON report path (default results/bench_<device>.json, e.g. bench_cpu.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        for flag in ("batch_size", "importance_samples", "steps", "warmup_steps", "repeats", "eval_samples",
                     "eval_repeats", "eval_images"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise runtime.UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
        if args.eval_chunks and min(args.eval_chunks) < 1:
            raise runtime.UserError(f"--eval-chunks must all be >= 1, got {args.eval_chunks}")
        args.settings = parse_settings(args.set)  # {config field: value}, for every measured rung
        if args.threads is not None and min(args.threads) < 1:
            raise runtime.UserError(f"--threads must be >= 1, got {args.threads}")
        device = runtime.resolve_device(args.device, runtime.DistInfo())
        if args.threads is None:
            args.threads = sorted({1, os.cpu_count() or 1}) if device.type == "cpu" else [torch.get_num_threads()]
        if args.eval_images is None:
            args.eval_images = 100 if device.type == "cuda" else 4
        if args.models is None:
            args.models = available_models() if device.type == "cuda" else ["model01"]
        models = args.models
        missing = [m for m in models if m not in available_models()]
        if missing:
            raise runtime.UserError(f"{', '.join(missing)}: no such script in {REPO_ROOT}")
        memory = PeakMemory(device)
        report = {
            "command": " ".join(["python", "bench.py", *argv]),
            "git_commit": runtime.git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": re.sub(r", \d+ threads\)$", ")", runtime.device_name(device)),  # threads: per result
            "device_type": device.type,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2),  # other processes share the machine
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "settings")},
            "memory_measure": memory.method,
            "results": [],  # one record per model and thread setting
        }
        data_cache = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name in models:
                report["results"].append(bench_model(name, REGISTRY[name], args, device, memory, data_cache))
        report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    except (runtime.UserError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPO_ROOT / "results" / f"bench_{device_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run_files.atomic_write_json(out, report)
    print_table(report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
