#!/usr/bin/env bash
# gpu_campaign.sh: the whole GPU campaign as ONE command, for a machine with a GPU (H100/H200 class) for a limited
# time, sized for ~12 minutes of GPU wall time; plus a CPU rehearsal of every code path (--dry-run).
#
# ---------------------------------------------------------------------------------------------------- how to run
# Here (once per data change; idempotent):   bash scripts/prepare_gpu_data.sh
#     -> devdata/ (git-ignored): MNIST + Fashion-MNIST image files recompressed with xz, 33.9 MiB; it prints the
#        size of everything that travels (limit 64 MiB) and the value for --commit below.
# Rehearsal here (CPU, ~2 minutes on 1 busy core, changes no tracked file: it publishes into a scratch copy of the
# repo; its last re-score is forced PARTIAL on purpose, to exercise that path):
#     OMP_NUM_THREADS=1 bash scripts/gpu_campaign.sh --dry-run --out /tmp/gpu_rehearsal
# On the GPU machine, in a copy of the working tree with devdata/ beside it (the job's time limit a few minutes
# above the budget):
#     OUT=/path/to/results bash scripts/gpu_campaign.sh --data devdata --commit <the value prepare_gpu_data.sh printed>
# The script stops itself after --budget-s 720 s and packs; with less time, pass --budget-s a few minutes under the
# job's limit (a cut-off run still brings back every step packed before it).
# What it leaves in $OUT (5 files, each well under 16 MiB, nothing below $OUT/), to copy back:
#     SUMMARY.txt      one line per step and job (OK / PARTIAL / FAILED / SKIPPED, seconds, detail) + the numbers
#     campaign.log     this script's own output (a FAILED line names the step and shows its log's tail)
#     bench_<gpu>.json the benchmark report (also inside publish.tar.gz as results/bench_<gpu>.json)
#     publish.tar.gz   every file of results/, assets/, checkpoints/ that the campaign's --publish runs added or
#                      changed in the device's copy of the repo, repo-relative, + gpu_campaign_manifest.txt
#     runs.tar.gz      the run directories (config, log.jsonl, result.json, figures; no ckpt.pt/best.pt, but any
#                      partial test_eval.pt), every step's full log, status files, the environment probe
# Back here:  bash scripts/gpu_campaign_unpack.sh <the copied $OUT folder>                  # stage + compare
#             bash scripts/gpu_campaign_unpack.sh <the copied $OUT folder> --apply          # then publish
# (unpacks into runs/gpu_campaign/<time>/, prints old vs new for every result, and with --apply copies the
# results/assets/checkpoints worth keeping into the repo and runs `python compare.py --update-readme`; see its
# header for the rules: a re-score never replaces a larger evaluation, a new training run replaces only a worse
# result, nothing of a --dry-run is kept.)
# A re-score that ran out of time comes back PARTIAL with its test_eval.pt in runs.tar.gz: copy
# runs/gpu_campaign/<time>/runs/rescore into devdata/resume/rescore and run again with
#     bash scripts/gpu_campaign.sh --data devdata --steps 4 --resume-runs devdata/resume --rescore NAME,NAME --commit ..
# (--rescore: only the checkpoints not yet done; the same command continues each evaluation bit-exactly).
#
# ---------------------------------------------------------------------------------------------------- the steps
# Time budget (GPU wall, --budget-s 720 in all; every command runs under `timeout`, every step checks the clock):
#   0 setup       ~15 s   probe the GPU and torch, decompress + md5-check devdata into a scratch data root,
#                         snapshot results/ assets/ checkpoints/ (what step 2-4 publish is found by difference)
#   1 quick       ~150 s  CUDA --quick of every rung: model01 alone first (its images/s sizes step 3), then in
#                         parallel (16 CPU cores, one GPU): model02 and model03 on fashion-mnist, model02
#                         --no-variance-bound, model04 (binarized-mnist), model01 --compile, and a 2-process
#                         torchrun model01: NCCL needs one GPU per process, so with ONE visible GPU it runs with
#                         --device cpu on gloo (it checks torchrun/DDP under the device's torch 2.11; the GPU path
#                         of DDP is not covered then); with >= 2 GPUs it runs NCCL on cuda. Limit 120 s / 180 s.
#   2 bench       ~90 s   python bench.py --device cuda --repeats 3 --eval-samples 2000 --eval-repeats 2 (every
#                         rung; fewer repeats and samples than the defaults, whose naive per-sample evaluation alone
#                         would take minutes) -> results/bench_<gpu>.json, copied to $OUT. Limit 150 s.
#   3 model01     ~6 min  k=5, iwae schedule, dynamically binarized MNIST, L5000 on the full 10k test set, --publish:
#                         --max-train-minutes M = min(6, what is left after keeping 120 s for step 4 and 60 s for
#                         start-up + test pass), --epochs E = 0.85 * M * (images/s of the step-1 model01 quick run)
#                         / 59000 (the iwae schedule is stretched over E epochs, so E must fit in M to reach its
#                         last stage; the time limit is the guard). Limit M*60 + 180 s.
#   5 model04     ~8 min  (opt-in, runs before step 4) model04 at its GPU-sized defaults (width 64, batch 256, 6 layers)
#                         on dynamically binarized MNIST, its own row: --max-steps sized to M04_MAX_MIN minutes at
#                         the rate of bench_h200.json (the time limit is the guard), KL warm-up over the first fifth,
#                         test L_100 on the 10k images (a GPU L_5000 of this width takes ~10 min), --publish: the
#                         row and its checkpoint come back; step 4 (here or on a later machine) or the CPU campaign's
#                         re-score brings it to L5000 on the full test set. Limit M*60 + 240 s.
#   4 re-scores   rest    L5000 (full test set; --eval-chunk 0 = the rung's automatic pass size on CUDA, 2^18
#                         latents, model04 2^14: its checkpoints carry --eval-chunk 2048 from their CPU runs) of
#                         every published model02/03/04 checkpoint in checkpoints/ whose results/ file is not yet
#                         at S >= 5000 with per-image values (the CPU campaign publishes some; rows published
#                         before results/per_image/ existed are scored again for them), --eval-only --publish, cheapest
#                         first (model02/03 ~0.8 PFLOP each, model04 ~2.5 PFLOP each), in one Python process
#                         (scripts/gpu_rescore.py: same commands, no per-job torch import / CUDA start), each job
#                         given all the time left as --segment-minutes: one that cannot finish exits 75 with its
#                         progress in test_eval.pt (PARTIAL) and the rest are SKIPPED.
#   pack          ~5 s    after every step and every re-score job (so a kill loses at most the step in flight),
#                         and from an EXIT/INT/TERM trap at the end.
#
# ---------------------------------------------------------------------------------------------------- options
#   --dry-run          CPU rehearsal: the same steps and code paths, tiny sizes (--device cpu; quick runs 20 steps,
#                      test 50 images x 10 samples; bench --models model01 with one repeat; model01 50 steps;
#                      re-scores --eval-samples 10 --n-test 50, the last one forced PARTIAL to exercise that path
#                      unless --resume-runs is given),
#                      run one at a time, publishing into a scratch copy of the repo (tracked files untouched).
#   --out DIR          where the packed results go (default $OUT; created if missing)
#   --data DIR         carried data: devdata/ from prepare_gpu_data.sh (xz + MANIFEST.tsv), or a plain torchvision
#                      data root (*.gz), used in place (default ./devdata)
#   --commit SHA       the commit (+"-dirty") the sent tree is at, recorded in the manifest (the device's copy
#                      may have no .git -- every result.json then says git_commit "unknown" -- or a stale one, an
#                      older commit + "-dirty"; the unpack script puts this value in)
#   --budget-s N       total seconds (default 720; dry-run 1800)
#   --steps LIST       comma-separated subset of 1,2,3,4,5 (default 1,2,4; step 5 is opt-in, e.g. --steps 5,4 for the
#                      GPU-sized model04 row and then its re-score; step 3 is opt-in since the CPU campaign
#                      published model01 after the whole 3280-epoch schedule, which ~6 GPU minutes at batch 100 cannot
#                      beat; without step 1, step 3 sizes E from a fallback rate)
#   --resume-runs DIR  DIR/rescore/<checkpoint>/test_eval.pt from an earlier PARTIAL re-score continue it
#   --rescore NAMES    step 4 only for these checkpoints (comma-separated names without .pt; default all)
#   --work DIR         scratch folder (default a new /tmp/vae_gpu_campaign.XXXXXX)
#   --inject-fail L    make the command of job L (e.g. bench, quick_model03) fail: tests the FAILED path
#   --pack-only        (internal) repack $OUT from --work DIR's state
# Exit status: 0 every step OK (PARTIAL and SKIPPED count as OK); 1 some step FAILED; 2 bad arguments / no setup.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"

DRY=0
OUT_DIR="${OUT:-}"
DATA="devdata"
COMMIT=""
BUDGET_S=""
STEPS="1,2,4"
RESUME_RUNS=""
RESCORE=""
WORK=""
INJECT_FAIL=""
PACK_ONLY=0

die() { echo "gpu_campaign.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT_DIR="$2"; shift 2 ;;
    --data) [ $# -ge 2 ] || die "--data needs a directory"; DATA="$2"; shift 2 ;;
    --commit) [ $# -ge 2 ] || die "--commit needs a value"; COMMIT="$2"; shift 2 ;;
    --budget-s) [ $# -ge 2 ] || die "--budget-s needs seconds"; BUDGET_S="$2"; shift 2 ;;
    --steps) [ $# -ge 2 ] || die "--steps needs a list"; STEPS="$2"; shift 2 ;;
    --resume-runs) [ $# -ge 2 ] || die "--resume-runs needs a directory"; RESUME_RUNS="$2"; shift 2 ;;
    --rescore) [ $# -ge 2 ] || die "--rescore needs checkpoint names"; RESCORE="$2"; shift 2 ;;
    --work) [ $# -ge 2 ] || die "--work needs a directory"; WORK="$2"; shift 2 ;;
    --inject-fail) [ $# -ge 2 ] || die "--inject-fail needs a job label"; INJECT_FAIL="$2"; shift 2 ;;
    --pack-only) PACK_ONLY=1; shift ;;
    -h|--help) sed -n '2,/^set -euo pipefail/p' "$SELF" | sed '$d'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

# ------------------------------------------------------------------------------------------------- packing
# Everything pack_out needs lives in $WORK/env.sh, so `--pack-only --work DIR` (run by gpu_rescore.py after each
# job) packs exactly as the main script does.

summary_text() {
  "$PY" - "$WORK" <<'EOF'
import json, os, sys
from pathlib import Path
work = Path(sys.argv[1])
env = dict(line.split("=", 1) for line in (work / "env.txt").read_text().splitlines() if "=" in line) \
    if (work / "env.txt").exists() else {}
rows = []
for line in (work / "status.tsv").read_text().splitlines() if (work / "status.tsv").exists() else []:
    f = line.split("\t")
    if len(f) >= 5:
        rows.append(f[:5])
seen4 = set()
for line in (work / "rescore_status.tsv").read_text().splitlines() if (work / "rescore_status.tsv").exists() else []:
    f = line.split("\t")
    if len(f) >= 4:
        rows.append(["4", f[0], f[1], f[2], f[3]])
        seen4.add(f[0])
print(f"GPU campaign ({env.get('mode', '?')}), started {env.get('started', '?')}, commit {env.get('commit', '?')}")
print(f"device: {env.get('gpu', '?')}; torch {env.get('torch', '?')}; python {env.get('python', '?')}; "
      f"data {env.get('data_dir', '?')}; budget {env.get('budget_s', '?')} s")
print(f"{'step':4} {'job':52} {'status':8} {'secs':>5}  detail")
for r in rows:
    print(f"{r[0]:4} {r[1]:52} {r[2]:8} {r[3]:>5}  {r[4]}")
count = {}
for r in rows:
    count[r[2]] = count.get(r[2], 0) + 1
print("RESULT: " + ", ".join(f"{count.get(k, 0)} {k}" for k in ("OK", "PARTIAL", "FAILED", "SKIPPED")))
print("\nnumbers (result.json of every run):")
for res in sorted((work / "runs").rglob("result.json")) if (work / "runs").exists() else []:
    try:
        d = json.loads(res.read_text())
    except Exception as e:  # noqa: BLE001
        print(f"  {res.parent.relative_to(work)}: unreadable ({e})")
        continue
    extra = ""
    if d.get("evaluated_checkpoint"):
        extra = f"eval {d.get('eval_time_s', '?')} s"
    else:
        extra = f"{d.get('steps')} steps, {d.get('epochs')} epochs, train {d.get('train_time_s')} s"
    bpd = f", {d['test_bpd']:.4f} bpd" if d.get("test_bpd") is not None else ""
    print(f"  {str(res.parent.relative_to(work / 'runs')):44} L_{d.get('eval_samples')} on {d.get('n_test')}: "
          f"{d.get('test_ll_nats', float('nan')):.2f} +- {d.get('test_ll_stderr', float('nan')):.2f} nats{bpd}; {extra}")
for log in sorted((work / "runs" / "quick").glob("*/log.jsonl")) if (work / "runs" / "quick").exists() else []:
    rates = [json.loads(l).get("images_per_s") for l in log.read_text().splitlines() if '"type": "train"' in l]
    rates = [r for r in rates if r]
    if rates:
        print(f"  train images/s, {log.parent.name}: median {sorted(rates)[len(rates) // 2]:.0f} (last {rates[-1]:.0f})")
for k in ("m01_rate", "m01_epochs", "m01_minutes"):
    if k in env:
        print(f"  step 3 sizing: {k} = {env[k]}")
EOF
}

pack_out() (  # a subshell with set +e: packing never stops the campaign
  set +e
  [ -n "${WORK:-}" ] && [ -d "$WORK" ] && [ -n "${OUT_DIR:-}" ] || return 0
  mkdir -p "$OUT_DIR"
  local tmp
  # runs.tar.gz: run dirs without the big training checkpoints (partial test_eval.pt stays), logs, status
  tmp="$OUT_DIR/.runs.tar.gz.part"
  (cd "$WORK" && tar --warning=no-file-changed --exclude='ckpt.pt' --exclude='best.pt' --exclude='.*.tmp*' \
     -czf "$tmp" $(ls -d runs logs status.tsv rescore_status.tsv env.txt 2>/dev/null)) || true
  [ -s "$tmp" ] && mv -f "$tmp" "$OUT_DIR/runs.tar.gz" || rm -f "$tmp"
  # publish.tar.gz: what changed under results/ assets/ checkpoints/ of the code root since the snapshot
  if [ -f "$WORK/snapshot.md5" ]; then
    (cd "$CODE_ROOT" && find results assets checkpoints -type f ! -name '.*' -print0 2>/dev/null | sort -z \
       | xargs -0 -r md5sum) > "$WORK/now.md5" || true
    awk 'NR == FNR { old[$2] = $1; next } { if (!($2 in old) || old[$2] != $1) print $2 }' \
      "$WORK/snapshot.md5" "$WORK/now.md5" > "$WORK/changed.txt"
    awk 'NR == FNR { now[$2] = 1; next } { if (!($2 in now)) print $2 }' \
      "$WORK/now.md5" "$WORK/snapshot.md5" > "$WORK/deleted.txt"
    # --eval-only --publish re-saves the checkpoint it evaluated (same weights; other bytes under another torch):
    # not packed, it would only take space (six of them are ~12 MB of the 16 MiB a file may have)
    : > "$WORK/resaved.txt"
    [ -f "$WORK/rescore_jobs.tsv" ] && cut -f1 "$WORK/rescore_jobs.tsv" | sed 's|^|checkpoints/|; s|$|.pt|' > "$WORK/resaved.txt"
    grep -vxF -f "$WORK/resaved.txt" "$WORK/changed.txt" > "$WORK/packed.txt" || true
    {
      echo "gpu_campaign publish manifest"
      echo "mode=$MODE"
      echo "commit=$COMMIT"
      echo "started=$STARTED"
      echo "packed=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
      grep -E '^(gpu|torch)=' "$WORK/env.txt" 2>/dev/null || true
      echo "# changed or new (md5  path, relative to the repo root)"
      grep -F -f "$WORK/packed.txt" "$WORK/now.md5" 2>/dev/null || true
      echo "# re-saved by --eval-only --publish (the weights it evaluated), not packed"
      grep -xF -f "$WORK/resaved.txt" "$WORK/changed.txt" 2>/dev/null | sed 's/^/resaved  /' || true
      echo "# deleted"
      sed 's/^/deleted  /' "$WORK/deleted.txt"
    } > "$WORK/gpu_campaign_manifest.txt"
    tmp="$OUT_DIR/.publish.tar.gz.part"
    if (cd "$CODE_ROOT" && tar -czf "$tmp" -T "$WORK/packed.txt" -C "$WORK" gpu_campaign_manifest.txt); then
      mv -f "$tmp" "$OUT_DIR/publish.tar.gz"
    else
      rm -f "$tmp"; echo "[campaign] WARNING: packing publish.tar.gz failed" >&2
    fi
    local b
    for b in $(grep -E '^results/bench_[^/]*\.json$' "$WORK/packed.txt" || true); do
      cp -f "$CODE_ROOT/$b" "$OUT_DIR/$(basename "$b")"
    done
  fi
  summary_text > "$OUT_DIR/.SUMMARY.txt.part" 2>&1 || true
  mv -f "$OUT_DIR/.SUMMARY.txt.part" "$OUT_DIR/SUMMARY.txt"
  local f
  for f in "$OUT_DIR"/*; do
    [ -f "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt $((16 * 1024 * 1024 - 65536)) ]; then
      echo "[campaign] WARNING: $f is $(du -h "$f" | cut -f1), over the 16 MiB a file may take back" >&2
    fi
  done
  return 0
)

if [ "$PACK_ONLY" = 1 ]; then
  [ -n "$WORK" ] && [ -f "$WORK/env.sh" ] || die "--pack-only needs --work DIR of a running campaign"
  # shellcheck disable=SC1091
  . "$WORK/env.sh"
  pack_out
  exit 0
fi

# ------------------------------------------------------------------------------------------------- setup
[ -n "$OUT_DIR" ] || die "no output folder: pass --out DIR (or run where \$OUT is set)"
mkdir -p "$OUT_DIR" 2>/dev/null || die "cannot create --out $OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
touch "$OUT_DIR/.write-test" 2>/dev/null && rm -f "$OUT_DIR/.write-test" || die "--out $OUT_DIR is not writable"
case ",$STEPS," in *,[!1-5,]*) die "--steps takes a comma-separated subset of 1,2,3,4,5, got $STEPS" ;; esac
if [ -n "$RESUME_RUNS" ]; then RESUME_RUNS="$(cd "$RESUME_RUNS" 2>/dev/null && pwd)" || die "--resume-runs: no such directory"; fi
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
[ -n "$PY" ] || die "no python3 on PATH"
export PYTHONUNBUFFERED=1 VAE_DATA_DOWNLOAD=0 PYTHONDONTWRITEBYTECODE=1
START=$(date +%s)
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

if [ "$DRY" = 1 ]; then
  MODE="dry-run (cpu)"; DEV=cpu; BUDGET_S="${BUDGET_S:-1800}"
  T_QUICK1=600; T_QUICK=600; T_BENCH=600; M01_MAX_MIN=0.3; STEP4_RESERVE_S=60; STEP3_OVERHEAD_S=120; M04_MAX_MIN=0.3
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  OMP_CUDA=$OMP_NUM_THREADS; OMP_GLOO=$OMP_NUM_THREADS; PARALLEL=0
else
  MODE="gpu"; DEV=cuda; BUDGET_S="${BUDGET_S:-720}"
  T_QUICK1=120; T_QUICK=180; T_BENCH=150; M01_MAX_MIN=6; STEP4_RESERVE_S=120; STEP3_OVERHEAD_S=60; M04_MAX_MIN=8
  OMP_CUDA=2; OMP_GLOO=4; PARALLEL=1
fi
DEADLINE=$((START + BUDGET_S))
if [ -z "$WORK" ]; then WORK="$(mktemp -d /tmp/vae_gpu_campaign.XXXXXX)"; fi
mkdir -p "$WORK/logs" "$WORK/runs"
WORK="$(cd "$WORK" && pwd)"
: > "$WORK/status.tsv"; : > "$WORK/pids"

# all output also into $OUT/campaign.log
exec > >(tee -a "$OUT_DIR/campaign.log") 2>&1

stamp() { echo "t+$(( $(date +%s) - START ))s"; }
left_s() { echo $(( DEADLINE - $(date +%s) )); }
log() { echo "[campaign $(stamp)] $*"; }
want_step() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

record() {  # record STEP LABEL STATUS SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/status.tsv"
  if [ "$3" = FAILED ]; then
    echo "FAILED: step $1 $2 ($5) after $4 s"
  else
    log "step $1 $2: $3 ($4 s)${5:+ $5}"
  fi
}

run_cmd() {  # run_cmd STEP LABEL LIMIT_S CMD...   (cwd: the code root; output: $WORK/logs/STEP_LABEL.log)
  local step=$1 label=$2 limit=$3; shift 3
  local logf="$WORK/logs/${step}_${label}.log" t0 rc=0 secs
  if [ "$INJECT_FAIL" = "$label" ]; then set -- sh -c 'echo "injected failure (--inject-fail)" >&2; exit 3'; fi
  if [ "$limit" -le 0 ]; then record "$step" "$label" SKIPPED 0 "no time left"; return 0; fi
  log "step $step $label: start, limit ${limit}s: $*"
  t0=$(date +%s)
  ( cd "$CODE_ROOT" && exec timeout -k 20 "$limit" "$@" ) > "$logf" 2>&1 &
  local pid=$!
  echo "$pid" >> "$WORK/pids"
  wait "$pid" || rc=$?
  secs=$(( $(date +%s) - t0 ))
  case "$rc" in
    0) record "$step" "$label" OK "$secs" "" ;;
    75) record "$step" "$label" PARTIAL "$secs" "segment ended (exit 75), state saved" ;;
    124|137) record "$step" "$label" FAILED "$secs" "timed out after ${limit}s (exit $rc), log logs/${step}_${label}.log" ;;
    *) record "$step" "$label" FAILED "$secs" "exit $rc, log logs/${step}_${label}.log" ;;
  esac
  if [ "$rc" != 0 ] && [ "$rc" != 75 ]; then
    echo "----- last lines of logs/${step}_${label}.log -----"
    tail -n 25 "$logf" | cut -c1-400 || true
    echo "-----"
  fi
  return 0
}

kill_children() {
  local p
  for p in $(cat "$WORK/pids" 2>/dev/null); do kill -TERM "$p" 2>/dev/null || true; done
  for p in $(jobs -p); do kill -TERM "$p" 2>/dev/null || true; done
}

FINISHED=0
finish() {
  local rc=$?
  trap - EXIT INT TERM
  [ "$FINISHED" = 1 ] && return 0
  FINISHED=1
  set +e
  kill_children
  pack_out
  echo
  echo "================================================================ SUMMARY ($OUT_DIR/SUMMARY.txt)"
  cat "$OUT_DIR/SUMMARY.txt"
  echo "files in $OUT_DIR:"; ls -la "$OUT_DIR" | sed 's/^/  /'
  local failed; failed=$( { awk -F'\t' '$3 == "FAILED"' "$WORK/status.tsv"
    [ -f "$WORK/rescore_status.tsv" ] && awk -F'\t' '$2 == "FAILED"' "$WORK/rescore_status.tsv"; } 2>/dev/null | wc -l)
  if [ "$failed" -gt 0 ]; then
    echo "CAMPAIGN FAILED: $failed job(s) FAILED (see the FAILED lines above and runs.tar.gz:logs/)"
    rc=1
  elif [ "$rc" -ne 0 ]; then
    echo "CAMPAIGN FAILED: the script itself stopped with exit $rc"
    rc=1
  else
    echo "CAMPAIGN OK ($(( $(date +%s) - START )) s)"
  fi
  [ "$DRY" = 1 ] && [ "${KEEP_WORK:-0}" != 1 ] && rm -rf "$WORK/repo" "$WORK/data"
  exit "$rc"
}
on_signal() { echo "FAILED: campaign interrupted by SIG$1 at $(stamp); packing what there is"; kill_children; exit 143; }
trap finish EXIT
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

log "mode $MODE, budget ${BUDGET_S}s, steps $STEPS, out $OUT_DIR, work $WORK"

# the code that runs and publishes: the repo itself on the device (a throw-away copy there); in a rehearsal a
# scratch copy, so that --publish never touches this checkout's tracked results/, assets/, checkpoints/
if [ "$DRY" = 1 ]; then
  CODE_ROOT="$WORK/repo"
  mkdir -p "$CODE_ROOT"
  cp "$REPO"/*.py "$CODE_ROOT"/
  cp -r "$REPO/results" "$REPO/assets" "$REPO/checkpoints" "$CODE_ROOT"/
else
  CODE_ROOT="$REPO"
fi
[ -n "$COMMIT" ] || COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
(cd "$CODE_ROOT" && find results assets checkpoints -type f ! -name '.*' -print0 2>/dev/null | sort -z \
   | xargs -0 -r md5sum) > "$WORK/snapshot.md5"

# environment probe
{
  echo "mode=$MODE"; echo "started=$STARTED"; echo "commit=$COMMIT"; echo "budget_s=$BUDGET_S"
  "$PY" - "$DEV" <<'EOF' || echo "torch=IMPORT FAILED"
import platform, sys
import torch
print(f"torch={torch.__version__}")
print(f"python={platform.python_version()}")
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"gpu_count={n}")
print(f"gpu={torch.cuda.get_device_name(0) if n else 'none (cpu)'}")
print(f"cuda={torch.version.cuda}")
EOF
  echo "cpu_count=$(nproc --all 2>/dev/null || echo ?)"
} > "$WORK/env.txt" 2>&1
GPU_COUNT=$(sed -n 's/^gpu_count=//p' "$WORK/env.txt"); GPU_COUNT=${GPU_COUNT:-0}
log "environment: $(tr '\n' ' ' < "$WORK/env.txt")"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>&1 | sed 's/^/  /' || true
if [ "$DEV" = cuda ] && [ "$GPU_COUNT" -lt 1 ]; then
  record 0 cuda FAILED 0 "torch sees no CUDA GPU (see env.txt); every step would fail"
fi

# data: devdata (xz + MANIFEST.tsv) -> plain idx files under $WORK/data, md5-checked; or a plain data root as is
if [ -d "$DATA" ]; then DATA_ABS="$(cd "$DATA" && pwd)"
elif [ -d "$REPO/$DATA" ]; then DATA_ABS="$(cd "$REPO/$DATA" && pwd)"
else DATA_ABS=""; fi
DATA_DIR=""
if [ -z "$DATA_ABS" ]; then
  record 0 data FAILED 0 "--data $DATA does not exist (run scripts/prepare_gpu_data.sh and carry devdata)"
elif [ -f "$DATA_ABS/MANIFEST.tsv" ]; then
  t0=$(date +%s)
  if "$PY" - "$DATA_ABS" "$WORK/data" > "$WORK/logs/0_data.log" 2>&1 <<'EOF'
import hashlib, os, subprocess, sys
from pathlib import Path
try:
    from lzma import decompress
except ImportError:  # a Python built without liblzma: the xz program instead
    def decompress(data):
        return subprocess.run(["xz", "-dc"], input=data, capture_output=True, check=True).stdout
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
bad = 0
for line in (src / "MANIFEST.tsv").read_text().splitlines()[1:]:
    rel, raw_md5, raw_bytes = line.split("\t")[:3]
    path = src / rel
    if not path.is_file():
        print(f"missing {path}"); bad += 1; continue
    raw = decompress(path.read_bytes())
    if len(raw) != int(raw_bytes) or hashlib.md5(raw).hexdigest() != raw_md5:
        print(f"corrupt {path}: md5 {hashlib.md5(raw).hexdigest()} != {raw_md5}"); bad += 1; continue
    out = dest / rel[:-len(".xz")]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(raw)
    print(f"ok {rel} -> {out} ({len(raw)} bytes, md5 {raw_md5})")
sys.exit(1 if bad else 0)
EOF
  then
    DATA_DIR="$WORK/data"; record 0 data OK $(( $(date +%s) - t0 )) "devdata decompressed into $DATA_DIR"
  else
    DATA_DIR="$WORK/data"; record 0 data FAILED $(( $(date +%s) - t0 )) "$(tr '\n' ';' < "$WORK/logs/0_data.log" | cut -c1-300)"
  fi
else
  DATA_DIR="$DATA_ABS"; record 0 data OK 0 "plain data root $DATA_DIR used in place"
fi
already_rescored() {  # already_rescored RESULT_JSON: true when that published result is at S >= 5000 with its
  # per-image values (campaign.rescored, the CPU campaign's own test: one definition of "needs no re-score")
  [ -f "$1" ] && "$PY" -c 'import json, sys; sys.path.insert(0, sys.argv[2]); import campaign
sys.exit(0 if campaign.rescored(json.load(open(sys.argv[1])), per_image=True) else 1)' "$1" "$CODE_ROOT"
}

have() {  # have mnist|fashion
  local folder; [ "$1" = mnist ] && folder=MNIST || folder=FashionMNIST
  [ -n "$DATA_DIR" ] || return 1
  local s
  for s in train-images-idx3-ubyte t10k-images-idx3-ubyte; do
    [ -f "$DATA_DIR/$folder/raw/$s" ] || [ -f "$DATA_DIR/$folder/raw/$s.gz" ] || return 1
  done
}
echo "data_dir=$DATA_DIR" >> "$WORK/env.txt"

cat > "$WORK/env.sh" <<EOF
WORK='$WORK'; OUT_DIR='$OUT_DIR'; CODE_ROOT='$CODE_ROOT'; PY='$PY'; MODE='$MODE'; COMMIT='$COMMIT'; STARTED='$STARTED'
EOF
pack_out

# sizes: the dry run shrinks every run by explicit flags (they override --quick's values)
if [ "$DRY" = 1 ]; then
  QUICK_TINY=(--max-steps 20 --val-every 10 --val-samples 5 --n-test 50 --eval-samples 10 --log-every 5 --checkpoint-every 10)
else
  QUICK_TINY=()
fi
Q="$WORK/runs/quick"

# ------------------------------------------------------------------------------------------------- step 1
if want_step 1; then
  log "===== step 1: --quick of every rung on $DEV"
  if have mnist; then
    run_cmd 1 quick_model01 "$(( $(left_s) < T_QUICK1 ? $(left_s) : T_QUICK1 ))" \
      env OMP_NUM_THREADS=$OMP_CUDA "$PY" model01.py --quick --device $DEV --data-dir "$DATA_DIR" --out-dir "$Q/model01" "${QUICK_TINY[@]}"
  else record 1 quick_model01 SKIPPED 0 "no MNIST in the data"; fi
  pack_out

  # the rest at once on the GPU (a rehearsal runs them one after another: 2 shared CPU cores)
  if [ "$GPU_COUNT" -ge 2 ] && [ "$DEV" = cuda ]; then
    TR_DEV=cuda; TR_NOTE="NCCL, 2 GPUs"
  else
    TR_DEV=cpu; TR_NOTE="gloo on CPU: NCCL needs one GPU per process and ${GPU_COUNT} GPU(s) are visible"
  fi
  log "torchrun: $TR_NOTE"
  limit=$(( $(left_s) < T_QUICK ? $(left_s) : T_QUICK ))
  group=(); gpids=()
  have fashion && group+=(quick_model02 quick_model02_unbounded quick_model03)
  have mnist && group+=(quick_model04 quick_model01_compile torchrun_model01)
  have fashion || for l in quick_model02 quick_model02_unbounded quick_model03; do record 1 $l SKIPPED 0 "no Fashion-MNIST in the data"; done
  have mnist || for l in quick_model04 quick_model01_compile torchrun_model01; do record 1 $l SKIPPED 0 "no MNIST in the data"; done
  for label in "${group[@]}"; do
    case $label in
      quick_model02) cmd=("$PY" model02.py --quick --dataset fashion-mnist) ;;
      quick_model02_unbounded) cmd=("$PY" model02.py --quick --dataset fashion-mnist --no-variance-bound) ;;
      quick_model03) cmd=("$PY" model03.py --quick --dataset fashion-mnist) ;;
      quick_model04) cmd=("$PY" model04.py --quick) ;;
      quick_model01_compile) cmd=("$PY" model01.py --quick --compile) ;;
      torchrun_model01) cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node=2 model01.py --quick) ;;
    esac
    if [ "$label" = torchrun_model01 ]; then d=$TR_DEV; omp=$OMP_GLOO; else d=$DEV; omp=$OMP_CUDA; fi
    full=(env OMP_NUM_THREADS=$omp "${cmd[@]}" --device $d --data-dir "$DATA_DIR" --out-dir "$Q/${label#quick_}" "${QUICK_TINY[@]}")
    if [ "$PARALLEL" = 1 ]; then
      run_cmd 1 "$label" "$limit" "${full[@]}" &
      gpids+=($!)
    else
      run_cmd 1 "$label" "$(( $(left_s) < T_QUICK ? $(left_s) : T_QUICK ))" "${full[@]}"
    fi
  done
  # (a bare `wait` would also wait for the tee behind campaign.log, for ever)
  for p in "${gpids[@]}"; do wait "$p" || true; done
  pack_out
else
  record 1 quick SKIPPED 0 "not in --steps"
fi

# ------------------------------------------------------------------------------------------------- step 2
if want_step 2; then
  log "===== step 2: bench.py on $DEV"
  if [ "$DRY" = 1 ]; then
    BENCH=(--device cpu --models model01 --threads 1 --steps 2 --warmup-steps 1 --repeats 1 --eval-samples 10 --eval-images 2 --eval-repeats 1)
  else
    BENCH=(--device cuda --repeats 3 --eval-samples 2000 --eval-repeats 2)
  fi
  if have mnist; then
    run_cmd 2 bench "$(( $(left_s) < T_BENCH ? $(left_s) : T_BENCH ))" \
      env OMP_NUM_THREADS=$OMP_CUDA "$PY" bench.py "${BENCH[@]}" --data-dir "$DATA_DIR"
  else record 2 bench SKIPPED 0 "no MNIST in the data (bench trains every rung on MNIST)"; fi
  pack_out
else
  record 2 bench SKIPPED 0 "not in --steps"
fi

# ------------------------------------------------------------------------------------------------- step 3
if want_step 3; then
  log "===== step 3: model01 k=5, iwae schedule, L5000 on the full test set, --publish"
  # minutes of training: up to M01_MAX_MIN, keeping STEP4_RESERVE_S for step 4 when step 4 runs
  reserve=$STEP4_RESERVE_S; want_step 4 || reserve=0
  sizing=$("$PY" - "$Q/model01/log.jsonl" "$(left_s)" "$reserve" "$STEP3_OVERHEAD_S" "$M01_MAX_MIN" "$DRY" <<'EOF' || echo "0 0 1 error"
import json, statistics, sys
log, left, reserve, overhead, max_min, dry = sys.argv[1], *map(float, sys.argv[2:6]), sys.argv[6] == "1"
minutes = min(max_min, (left - reserve - overhead) / 60)
if minutes < 1 and not dry:  # late: step 3 before step 4's reserve
    minutes = min(max_min, (left - overhead) / 60)
rate, src = None, "fallback"
try:
    rates = [json.loads(l)["images_per_s"] for l in open(log) if '"type": "train"' in l]
    rates = [r for r in rates[1:] if r]  # the first interval holds the warm-up
    if rates:
        rate, src = statistics.median(rates), "measured"
except (OSError, ValueError, KeyError):
    pass
if rate is None:
    rate = 300.0 if dry else 30000.0  # a guess; the time limit still stops training
epochs = int(max(1, min(3280, 0.85 * minutes * 60 * rate / 59000)))
print(f"{minutes:.2f} {rate:.0f} {epochs} {src}")
EOF
  )
  read -r M01_MIN M01_RATE M01_EPOCHS M01_SRC <<< "$sizing"
  { echo "m01_minutes=$M01_MIN"; echo "m01_rate=$M01_RATE images/s ($M01_SRC)"; echo "m01_epochs=$M01_EPOCHS"; } >> "$WORK/env.txt"
  log "model01: ${M01_MIN} min of training at ${M01_RATE} images/s (${M01_SRC}) -> --epochs ${M01_EPOCHS}"
  if [ "$DRY" = 1 ]; then
    M01_TINY=(--max-steps 50 --val-every 25 --val-samples 10 --eval-samples 10 --n-test 50 --log-every 10)
  else
    M01_TINY=()
  fi
  if ! have mnist; then
    record 3 model01_k5 SKIPPED 0 "no MNIST in the data"
  elif awk -v m="$M01_MIN" 'BEGIN { exit !(m < 0.05) }'; then
    record 3 model01_k5 SKIPPED 0 "no time left (${M01_MIN} min)"
  else
    limit=$(awk -v m="$M01_MIN" -v o="$STEP3_OVERHEAD_S" 'BEGIN { printf "%d", m * 60 + o + 120 }')
    run_cmd 3 model01_k5 "$(( $(left_s) < limit ? $(left_s) : limit ))" \
      env OMP_NUM_THREADS=$OMP_CUDA "$PY" model01.py --importance-samples 5 --lr-schedule iwae --epochs "$M01_EPOCHS" \
      --max-train-minutes "$M01_MIN" --device $DEV --data-dir "$DATA_DIR" --out-dir "$WORK/runs/model01_k5" --publish "${M01_TINY[@]}"
  fi
  pack_out
else
  record 3 model01_k5 SKIPPED 0 "not in --steps"
fi

# ------------------------------------------------------------------------------------------------- step 5
# (before step 4, which gives its re-scores all the time left)
if want_step 5; then
  log "===== step 5: model04 at its GPU-sized defaults on binarized MNIST, its own row, --publish"
  reserve=$STEP4_RESERVE_S; want_step 4 || reserve=0
  read -r M04_MIN M04_STEPS <<< "$("$PY" - "$(left_s)" "$reserve" "$M04_MAX_MIN" "$DRY" <<'EOF' || echo "0 0"
import sys
left, reserve, max_min, dry = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
minutes = max(0.0, min(max_min, (left - reserve - 240) / 60))  # 240 s: start-up, test L_100, figures, publishing
rate = 100.0 if dry else 3300.0  # images/s of model04's training step on an H200 (results/bench_h200.json, batch 100)
print(f"{minutes:.2f} {max(20, int(0.85 * minutes * 60 * rate / (32 if dry else 256)))}")
EOF
  )"
  { echo "m04_minutes=$M04_MIN"; echo "m04_steps=$M04_STEPS"; } >> "$WORK/env.txt"
  log "model04: ${M04_MIN} min of training -> --max-steps ${M04_STEPS}"
  if [ "$DRY" = 1 ]; then
    M04_SIZES=(--width 8 --latent-channels 2 --batch-size 32 --n-test 50 --eval-samples 10 --val-samples 5)
  else
    M04_SIZES=(--eval-samples 100)
  fi
  if ! have mnist; then
    record 5 model04_default SKIPPED 0 "no MNIST in the data"
  elif awk -v m="$M04_MIN" 'BEGIN { exit !(m < 0.05) }'; then
    record 5 model04_default SKIPPED 0 "no time left (${M04_MIN} min)"
  else
    limit=$(awk -v m="$M04_MIN" 'BEGIN { printf "%d", m * 60 + 240 }')
    run_cmd 5 model04_default "$(( $(left_s) < limit ? $(left_s) : limit ))" \
      env OMP_NUM_THREADS=$OMP_CUDA "$PY" model04.py --max-steps "$M04_STEPS" --kl-warmup-steps $(( M04_STEPS / 5 )) \
      --warmup-steps $(( M04_STEPS / 20 )) --val-every $(( M04_STEPS / 4 )) --checkpoint-every $(( M04_STEPS / 4 )) \
      --max-train-minutes "$M04_MIN" --device $DEV --data-dir "$DATA_DIR" --out-dir "$WORK/runs/model04_default" \
      --publish "${M04_SIZES[@]}"
  fi
  pack_out
else
  record 5 model04_default SKIPPED 0 "not in --steps"
fi

# ------------------------------------------------------------------------------------------------- step 4
if want_step 4; then
  log "===== step 4: L5000 re-scores of the published model02/03/04 checkpoints"
  : > "$WORK/rescore_jobs.tsv"
  last=""
  for ck in $(cd "$CODE_ROOT" && ls checkpoints/model02_*.pt checkpoints/model03_*.pt checkpoints/model04_*.pt 2>/dev/null); do
    name=$(basename "$ck" .pt)
    model=${name%%_*}
    case "$name" in
      *fashion-mnist*) need=fashion ;;
      *) need=mnist ;;
    esac
    if [ -n "$RESCORE" ]; then case ",$RESCORE," in *",$name,"*) ;; *) continue ;; esac; fi
    if ! have $need; then record 4 "$name" SKIPPED 0 "no $need data"; continue; fi
    # already published at S >= 5000 with per-image values (e.g. by the CPU campaign, campaign.py): nothing to do.
    # Not in a --dry-run, which re-scores every checkpoint at tiny sizes to rehearse each rung's path.
    if [ "$DRY" != 1 ] && already_rescored "$CODE_ROOT/results/$name.json"; then
      record 4 "$name" SKIPPED 0 "already published at L5000 with per-image values (results/$name.json)"; continue
    fi
    if [ -n "$RESUME_RUNS" ] && [ -f "$RESUME_RUNS/rescore/$name/test_eval.pt" ]; then
      mkdir -p "$WORK/runs/rescore/$name"
      cp "$RESUME_RUNS/rescore/$name/test_eval.pt" "$WORK/runs/rescore/$name/"
      log "$name: continuing the partial evaluation from $RESUME_RUNS/rescore/$name/test_eval.pt"
    fi
    if [ "$DRY" = 1 ]; then sizes=(--eval-samples 10 --n-test 50); else sizes=(--eval-samples 5000); fi
    if [ "$INJECT_FAIL" = "$name" ]; then sizes+=(--no-such-flag); fi
    printf '%s\t%s\t%s\n' "$name" "$model" "$(printf '%s\t' --eval-only --checkpoint "$ck" "${sizes[@]}" --eval-chunk 0 \
      --device $DEV --data-dir "$DATA_DIR" --out-dir "$WORK/runs/rescore/$name" --publish)" >> "$WORK/rescore_jobs.tsv"
    last=$name
  done
  if [ -s "$WORK/rescore_jobs.tsv" ]; then
    force=(); if [ "$DRY" = 1 ] && [ -z "$RESUME_RUNS" ]; then force=(--force-partial "$last"); fi
    : > "$WORK/rescore_status.tsv"
    t0=$(date +%s); rc=0
    log "step 4 rescore: $(wc -l < "$WORK/rescore_jobs.tsv") jobs, $(left_s) s left"
    ( cd "$CODE_ROOT" && exec timeout -k 20 "$(( $(left_s) > 0 ? $(left_s) + 30 : 30 ))" env OMP_NUM_THREADS=$OMP_CUDA "$PY" "$REPO/scripts/gpu_rescore.py" \
        --code-root "$CODE_ROOT" --deadline "$DEADLINE" --status "$WORK/rescore_status.tsv" --jobs "$WORK/rescore_jobs.tsv" \
        "${force[@]}" --after-each "bash '$SELF' --pack-only --work '$WORK'" ) > "$WORK/logs/4_rescore.log" 2>&1 &
    pid=$!; echo "$pid" >> "$WORK/pids"
    wait "$pid" || rc=$?
    grep -E '^\[rescore\]|^test L_|^published|^error' "$WORK/logs/4_rescore.log" | cut -c1-300 | sed 's/^/  /' || true
    # a job without a status line: the driver died on it (or before it)
    while IFS=$'\t' read -r name _rest; do
      if ! cut -f1 "$WORK/rescore_status.tsv" | grep -qx "$name"; then
        printf '%s\t%s\t%s\t%s\n' "$name" FAILED $(( $(date +%s) - t0 )) "rescore driver exit $rc before this job finished (logs/4_rescore.log)" >> "$WORK/rescore_status.tsv"
        echo "FAILED: step 4 $name (rescore driver exit $rc)"
      fi
    done < "$WORK/rescore_jobs.tsv"
    while IFS=$'\t' read -r name status secs detail; do
      if [ "$status" = FAILED ]; then echo "FAILED: step 4 $name ($detail) after $secs s"; fi
    done < "$WORK/rescore_status.tsv"
    if [ "$rc" != 0 ]; then
      echo "----- last lines of logs/4_rescore.log -----"; tail -n 25 "$WORK/logs/4_rescore.log" | cut -c1-400; echo "-----"
    fi
  else
    record 4 rescore SKIPPED 0 "no published model02/03/04 checkpoint to re-score"
  fi
  pack_out
else
  record 4 rescore SKIPPED 0 "not in --steps"
fi

log "all steps done"
