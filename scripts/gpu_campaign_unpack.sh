#!/usr/bin/env bash
# gpu_campaign_unpack.sh: bring what scripts/gpu_campaign.sh packed on the device into this repo.
#
#     bash scripts/gpu_campaign_unpack.sh FILES_DIR                 # stage + compare, changes nothing tracked
#     bash scripts/gpu_campaign_unpack.sh FILES_DIR --apply         # + copy what is worth keeping, update README
#
# FILES_DIR: the folder holding SUMMARY.txt, publish.tar.gz, runs.tar.gz, ... (the GPU machine's $OUT, copied back, or
# a rehearsal's --out). Options:
#   --stage DIR      where to unpack (default runs/gpu_campaign/<UTC time>/, git-ignored)
#   --repo DIR       the repo to apply to (default this script's repo; a scratch copy to try it out)
#   --apply          copy the kept files into DIR's results/, assets/, checkpoints/ and run
#                    `python compare.py --update-readme` there
#   --force          keep every published result, even a worse or smaller one
#   --with-figures   also copy the figures a re-score (--eval-only) redrew; by default a re-score brings only its
#                    result JSON: its weights are the published ones and its figures are redraws of them
#   --no-stamp       leave git_commit as the device wrote it (default: a result or bench JSON whose git_commit is
#                    not the --commit the campaign was given, recorded in the manifest, gets that commit -- the
#                    device's copy may have no .git ("unknown") or a stale one ("<older commit>-dirty") -- and
#                    keeps the device's view as device_git_commit, its segment log entries likewise; nothing is
#                    stamped when the manifest has none)
#   --no-readme      with --apply: do not run compare.py --update-readme
#
# Rules, per published result results/<run>.json (the manifest lists what the campaign changed):
#   bench_<gpu>.json                       kept
#   re-score (has "evaluated_checkpoint")  kept when it is new, or its evaluation is at least as large as the
#                                          current file's (eval_samples and n_test both >=); never its checkpoint
#   either, when kept                      with its per-image values (results/per_image/<run>.npy); a result
#                                          whose per-image file is missing from the pack is skipped
#   training run                           kept (with checkpoints/<run>.pt and its assets/ figures) when new, or
#                                          when its evaluation is at least as large and its test_ll_nats higher
#   a --quick result                       never
#   anything from a --dry-run rehearsal    never, unless --force (try --apply --force on a --repo scratch copy)
# Exit status: 0 fine; 1 nothing to unpack / a bad archive; 2 bad arguments; compare.py's status if it fails.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FILES=""; STAGE=""; APPLY=0; FORCE=0; FIGS=0; STAMP=1; README=1
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) STAGE="$2"; shift 2 ;;
    --repo) REPO="$(cd "$2" && pwd)"; shift 2 ;;
    --apply) APPLY=1; shift ;;
    --force) FORCE=1; shift ;;
    --with-figures) FIGS=1; shift ;;
    --no-stamp) STAMP=0; shift ;;
    --no-readme) README=0; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "gpu_campaign_unpack.sh: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$FILES" ] || { echo "gpu_campaign_unpack.sh: one FILES_DIR only" >&2; exit 2; }; FILES="$1"; shift ;;
  esac
done
[ -n "$FILES" ] && [ -d "$FILES" ] || { echo "usage: gpu_campaign_unpack.sh FILES_DIR [--apply] (see --help)" >&2; exit 2; }
[ -f "$FILES/publish.tar.gz" ] || [ -f "$FILES/runs.tar.gz" ] || { echo "no publish.tar.gz or runs.tar.gz in $FILES" >&2; exit 1; }
PY="${PYTHON:-$(command -v python3 || command -v python)}"
STAGE="${STAGE:-$REPO/runs/gpu_campaign/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$STAGE/publish"
cp -f "$FILES"/*.txt "$FILES"/*.log "$FILES"/*.json "$STAGE"/ 2>/dev/null || true
[ -f "$FILES/publish.tar.gz" ] && tar -xzf "$FILES/publish.tar.gz" -C "$STAGE/publish"
[ -f "$FILES/runs.tar.gz" ] && tar -xzf "$FILES/runs.tar.gz" -C "$STAGE"  # -> runs/, logs/, status files
echo "staged in $STAGE"
[ -f "$STAGE/SUMMARY.txt" ] && sed -n '1,200p' "$STAGE/SUMMARY.txt" | sed 's/^/  | /'

"$PY" - "$STAGE" "$REPO" "$APPLY" "$FORCE" "$FIGS" "$STAMP" <<'EOF'
import json, shutil, sys
from pathlib import Path

stage, repo = Path(sys.argv[1]), Path(sys.argv[2])
apply, force, figs, stamp = (a == "1" for a in sys.argv[3:7])
pub = stage / "publish"
manifest = {}
mf = pub / "gpu_campaign_manifest.txt"
changed = []
if mf.exists():
    for line in mf.read_text().splitlines():
        if "=" in line and not line.startswith("#") and "  " not in line:
            k, v = line.split("=", 1)
            manifest[k] = v
        elif line.startswith("deleted  "):
            print(f"note: the campaign deleted {line.split('  ', 1)[1]} on the device (not applied here)")
        elif line.startswith("resaved  "):
            continue
        elif "  " in line and not line.startswith("#"):
            changed.append(line.split("  ", 1)[1])
commit = manifest.get("commit", "")
print(f"\ncampaign: mode {manifest.get('mode', '?')}, commit {commit or '?'}, {manifest.get('gpu', '?')}, "
      f"torch {manifest.get('torch', '?')}; {len(changed)} changed files")

def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None

def fmt(d):
    if d is None:
        return "-"
    return (f"{d.get('test_ll_nats', float('nan')):.2f} (L_{d.get('eval_samples')}, n={d.get('n_test')}, "
            f"{d.get('device_type', '?')}{', quick' if d.get('quick') else ''})")

copies = []  # (source, target)
print(f"\n{'file':58} {'current':34} {'new':34} decision")
for rel in sorted(changed):
    src = pub / rel
    if not src.is_file() or not rel.startswith("results/") or not rel.endswith(".json"):
        continue
    new = load(src)
    if new is None:
        print(f"{rel:58} unreadable, skipped")
        continue
    if stamp and commit and new.get("git_commit") != commit:
        # The device's copy may have no .git ("unknown") or a stale one (the .git of an older checkout), so every
        # result says "<that commit>-dirty" while the tree sent was --commit. The campaign's --commit names the code that ran; the device's own view is kept beside it.
        device_view = new.get("git_commit")
        new["git_commit"] = commit
        new["device_git_commit"] = device_view
        for seg in new.get("eval_segment_log") or []:  # this campaign's segments (a CPU segment keeps its own)
            if isinstance(seg, dict) and seg.get("git_commit") == device_view:
                seg["git_commit"] = commit
        src.write_text(json.dumps(new, indent=2) + "\n")
    rehearsal = manifest.get("mode", "").startswith("dry-run")
    if Path(rel).name.startswith("bench_"):
        keep = force or not rehearsal
        print(f"{rel:58} {'':34} {'bench report':34} {'keep' if keep else 'skip: a rehearsal (--force keeps it)'}")
        if keep:
            copies.append((src, repo / rel))
        continue
    old = load(repo / rel)
    bigger = old is None or (new.get("eval_samples", 0) >= old.get("eval_samples", 0)
                             and new.get("n_test", 0) >= old.get("n_test", 0))
    rescore = bool(new.get("evaluated_checkpoint"))
    if new.get("quick"):
        keep, why = False, "skip: a --quick result"
    elif force:
        keep, why = True, "keep (--force)"
    elif rehearsal:
        keep, why = False, "skip: a --dry-run rehearsal (--force keeps it)"
    elif old is None:
        keep, why = True, "keep: new"
    elif not bigger:
        keep, why = False, "skip: a smaller evaluation than the current one"
    elif rescore:
        keep, why = True, "keep: re-score at least as large"
    elif new["test_ll_nats"] > old["test_ll_nats"]:
        keep, why = True, "keep: better"
    else:
        keep, why = False, "skip: not better than the current run (--force keeps it)"
    per_image = new.get("test_ll_per_image")  # results/per_image/<run>.npy, named relative to results/
    if keep and per_image and not (src.parent / per_image).is_file():
        keep, why = False, f"skip: its per-image values results/{per_image} are not in the pack"
    print(f"{rel:58} {fmt(old):34} {fmt(new):34} {why}")
    if not keep:
        continue
    copies.append((src, repo / rel))
    if per_image:  # compare.py checks the file against the sha256 in the result
        copies.append((src.parent / per_image, repo / "results" / per_image))
    run = new.get("run_name", Path(rel).stem)
    if not rescore:
        ck = pub / "checkpoints" / f"{run}.pt"
        if ck.is_file():
            copies.append((ck, repo / "checkpoints" / ck.name))
    if not rescore or figs:
        prefix, dataset = new.get("figure_prefix") or new.get("model"), new.get("dataset")
        for fig in sorted((pub / "assets").glob(f"{prefix}_{dataset}_*.png")):
            copies.append((fig, repo / "assets" / fig.name))
print()
for src, dst in copies:
    print(f"{'copy' if apply else 'would copy'} {src.relative_to(stage)} -> {dst.relative_to(repo)}")
    if apply:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
(stage / "apply_list.txt").write_text("".join(f"{d.relative_to(repo)}\n" for _, d in copies))
if not copies:
    print("nothing to copy")
elif not apply:
    print("(dry: pass --apply to copy these and update README)")
EOF

if [ "$APPLY" = 1 ] && [ "$README" = 1 ] && [ -s "$STAGE/apply_list.txt" ]; then
  echo
  (cd "$REPO" && "$PY" compare.py --update-readme && "$PY" compare.py)
  echo "then review: git diff --stat; the README prose (e.g. 'published test bound is L_100') may need words"
fi
