"""gpu_rescore.py: run several `python modelNN.py --eval-only ...` commands in ONE Python process, each under a
share of a common deadline. Used by scripts/gpu_campaign.sh (step 4); not a general tool.

Each job is exactly the command line `python <model>.py <args>` would run: training.main(RUNG, build_parser(), args)
of the rung, so result.json (its "command" field too) and --publish are what the script itself writes. One process
saves the Python + torch import and the CUDA start-up of every job after the first (seconds each, more on a
sandboxed machine).

Time. Jobs run in the given order (cheapest first), greedily: a job gets all the time left before --deadline
(minus --reserve-s for the publish and figures after its test pass) as its --segment-minutes, so the earlier
(cheaper) ones finish and a job that cannot finish stops with its progress saved in <out-dir>/test_eval.pt (exit
75, status PARTIAL): the same command continues it bit-exactly later (gpu_campaign.sh --resume-runs). Jobs after
one that ran out of time are SKIPPED.

    python scripts/gpu_rescore.py --code-root DIR --deadline UNIX_TIME --status FILE --jobs FILE
        [--reserve-s 15] [--min-s 20] [--force-partial LABEL] [--after-each 'shell command']

--jobs: one job per line, tab-separated: label, model (model02, ...), then the arguments (one per field).
--status: one line per job is appended: label, OK | PARTIAL | FAILED | SKIPPED, seconds, detail.
--force-partial LABEL: give that job a 0.0001-minute segment (tests the PARTIAL path in a CPU rehearsal).
--after-each: a shell command run after every job (gpu_campaign.sh packs $OUT with it).
"""
import argparse
import importlib
import os
import subprocess
import sys
import time
import traceback


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code-root", required=True, help="the repo copy whose modelNN.py / training.py run (and publish)")
    p.add_argument("--deadline", type=float, required=True, help="unix time by which every job must have stopped")
    p.add_argument("--status", required=True)
    p.add_argument("--jobs", required=True)
    p.add_argument("--reserve-s", type=float, default=15.0)
    p.add_argument("--min-s", type=float, default=20.0, help="a job with less time than this is skipped")
    p.add_argument("--force-partial", default=None)
    p.add_argument("--after-each", default=None)
    args = p.parse_args()

    root = os.path.abspath(args.code_root)
    os.chdir(root)  # checkpoints/<name>.pt as in the README's commands; publish goes to <root>/results etc.
    sys.path.insert(0, root)
    import runtime  # noqa: E402  (from the code root)
    import training  # noqa: E402  (from the code root)

    jobs = []
    with open(args.jobs) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 2 and fields[0]:
                jobs.append((fields[0], fields[1], [a for a in fields[2:] if a != ""]))

    def record(label, status, seconds, detail):
        with open(args.status, "a") as f:
            f.write(f"{label}\t{status}\t{seconds:.0f}\t{detail}\n")
        print(f"[rescore] {label}: {status} after {seconds:.0f} s{' (' + detail + ')' if detail else ''}", flush=True)

    out_of_time = False
    worst = 0
    for label, model, argv in jobs:
        left = args.deadline - time.time() - args.reserve_s
        if out_of_time or left < args.min_s:
            record(label, "SKIPPED", 0, "no time left" if not out_of_time else "an earlier job ran out of time")
            continue
        minutes = 0.0001 if label == args.force_partial else left / 60.0
        full = [*argv, "--segment-minutes", f"{minutes:.4f}"]
        print(f"[rescore] {label}: python {model}.py {' '.join(full)}", flush=True)
        t0 = time.time()
        try:
            rung_module = importlib.import_module(model)
            sys.argv[0] = f"{model}.py"  # argparse's program name in its messages
            rc = training.main(rung_module.RUNG, rung_module.build_parser(), full)
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001  (a crash of one job must not lose the others)
            traceback.print_exc()
            rc = 1
            if isinstance(e, KeyboardInterrupt):
                record(label, "FAILED", time.time() - t0, "interrupted")
                return 130
        seconds = time.time() - t0
        if rc == 0:
            record(label, "OK", seconds, "")
        elif rc == runtime.EXIT_SEGMENT_END:
            record(label, "PARTIAL", seconds, "segment ended; progress in test_eval.pt, same command continues it")
            out_of_time = label != args.force_partial
        else:
            record(label, "FAILED", seconds, f"exit {rc}")
            worst = 1
            if rc >= 128:  # a signal (SIGTERM from the campaign's timeout): stop here
                return rc
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
        if args.after_each:
            subprocess.run(args.after_each, shell=True, check=False)
    return worst


if __name__ == "__main__":
    sys.exit(main())
