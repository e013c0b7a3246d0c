#!/usr/bin/env bash
# prepare_gpu_data.sh: copy exactly the data files scripts/gpu_campaign.sh needs into ./devdata (the git-ignored
# folder that travels to the GPU machine beside the working tree), print its size and the size of everything that
# would travel, and fail when either is over budget (64 MiB by default: small enough to send with the job).
#
#     bash scripts/prepare_gpu_data.sh                      # from ../shared/data (or $VAE_DATA_DIR) into ./devdata
#     bash scripts/prepare_gpu_data.sh --src DIR --dest DIR --max-mib 35 --format xz|gz
#
# Which files. data.py reads, for every data set the campaign touches, only the two image files of a torchvision
# raw folder (labels are never read; the validation split is carved from the train file, which --eval-only loads
# too):
#     binarized-mnist (model01, model04, bench's model01/04)  MNIST/raw/{train,t10k}-images-idx3-ubyte
#     mnist           (bench's model02/03: 8-bit MNIST)       the same MNIST files
#     fashion-mnist   (model02/03 quick runs, the published model02/03/04 fashion checkpoints)
#                                                              FashionMNIST/raw/{train,t10k}-images-idx3-ubyte
# BinarizedMNIST/*.amat (binarized-mnist-static) is used by no step, CIFAR-10 / SVHN by none either.
#
# Why xz. The four original .gz files are 42.4 MB = 40.4 MiB, over the ~35 MiB that the 64 MiB travel limit leaves
# beside the repo's tracked files (~15.5 MiB) and the untracked campaign/ folder (~7.5 MiB). Recompressed with
# xz -9e they take 33.9 MiB, and everything fits without dropping a data set. data.py cannot read .xz, so
# gpu_campaign.sh decompresses them on the device into a scratch data root as plain idx files (data.py reads an
# uncompressed idx file without its .gz md5 check) after verifying each against the md5 of the original's
# contents, recorded here in devdata/MANIFEST.tsv (and the originals' .gz md5 are checked against torchvision's
# before anything is written). --format gz copies the original .gz files instead (no decompression step; 40.4 MiB).
#
# Exit status: 0 fine; 1 over budget or a bad/missing source file; 2 bad arguments. Idempotent: an .xz whose
# manifest entry matches its source is not recompressed (the first run takes about a minute of one CPU core).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${VAE_DATA_DIR:-$REPO/../shared/data}"
DEST="$REPO/devdata"
MAX_MIB=35
TRAVEL_MAX_MIB=64
FORMAT=xz

while [ $# -gt 0 ]; do
  case "$1" in
    --src) SRC="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    --max-mib) MAX_MIB="$2"; shift 2 ;;
    --format) FORMAT="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "prepare_gpu_data.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$FORMAT" in xz|gz) ;; *) echo "prepare_gpu_data.sh: --format must be xz or gz" >&2; exit 2 ;; esac
PY="${PYTHON:-$(command -v python3 || command -v python)}"

echo "source: $SRC"
echo "dest:   $DEST (format $FORMAT)"
mkdir -p "$DEST"
# a stale copy in the other format must not travel too
if [ "$FORMAT" = xz ]; then find "$DEST" -name '*.gz' -type f -delete; else find "$DEST" \( -name '*.xz' -o -name MANIFEST.tsv \) -type f -delete; fi

FORMAT="$FORMAT" "$PY" - "$SRC" "$DEST" <<'EOF'
import gzip, hashlib, lzma, os, shutil, sys
from pathlib import Path

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
fmt = os.environ["FORMAT"]
NEEDED = [("MNIST", "train-images-idx3-ubyte"), ("MNIST", "t10k-images-idx3-ubyte"),
          ("FashionMNIST", "train-images-idx3-ubyte"), ("FashionMNIST", "t10k-images-idx3-ubyte")]
try:  # the md5 sums data.py checks the .gz files against
    import torchvision
    MD5 = {"MNIST": dict(torchvision.datasets.MNIST.resources),
           "FashionMNIST": dict(torchvision.datasets.FashionMNIST.resources)}
except Exception as e:  # noqa: BLE001
    print(f"warning: torchvision unavailable ({e}); the source .gz md5 sums are not checked", file=sys.stderr)
    MD5 = {}

manifest_path = dest / "MANIFEST.tsv"
old = {}
if fmt == "xz" and manifest_path.exists():
    for line in manifest_path.read_text().splitlines()[1:]:
        f = line.split("\t")
        if len(f) == 5:
            old[f[0]] = f
rows = []
for folder, stem in NEEDED:
    gz = src / folder / "raw" / f"{stem}.gz"
    if not gz.is_file():
        sys.exit(f"FAILED: {gz} is missing (needed by the campaign); point --src or VAE_DATA_DIR at the data root")
    raw_gz = gz.read_bytes()
    gz_md5 = hashlib.md5(raw_gz).hexdigest()
    want = MD5.get(folder, {}).get(f"{stem}.gz")
    if want is not None and gz_md5 != want:
        sys.exit(f"FAILED: {gz} has md5 {gz_md5}, not the original's {want}")
    if fmt == "gz":
        out = dest / folder / "raw" / f"{stem}.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(gz, out)
        print(f"  copied {folder}/raw/{stem}.gz ({len(raw_gz) / 2**20:.2f} MiB)")
        continue
    rel = f"{folder}/raw/{stem}.xz"
    out = dest / rel
    prev = old.get(rel)
    if prev is not None and prev[3] == gz_md5 and out.is_file() and hashlib.md5(out.read_bytes()).hexdigest() == prev[4]:
        rows.append(prev)
        print(f"  kept   {rel} ({out.stat().st_size / 2**20:.2f} MiB, up to date)")
        continue
    raw = gzip.decompress(raw_gz)
    packed = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(packed)
    os.replace(tmp, out)
    rows.append([rel, hashlib.md5(raw).hexdigest(), str(len(raw)), gz_md5, hashlib.md5(packed).hexdigest()])
    print(f"  wrote  {rel} ({len(packed) / 2**20:.2f} MiB; the .gz was {len(raw_gz) / 2**20:.2f} MiB)")
if fmt == "xz":
    manifest_path.write_text("path\traw_md5\traw_bytes\torig_gz_md5\txz_md5\n" + "".join("\t".join(r) + "\n" for r in rows))
EOF

DATA_BYTES=$(du -sb "$DEST" | cut -f1)
DATA_MIB=$(awk -v b="$DATA_BYTES" 'BEGIN { printf "%.2f", b / 1048576 }')
echo "devdata: $DATA_MIB MiB ($DATA_BYTES bytes) in $DEST"

# what travels to the GPU machine: tracked + untracked-not-ignored files (what exists now), plus devdata/
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  TREE_BYTES=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | "$PY" -c '
import os, sys
names = set(n for n in sys.stdin.buffer.read().split(b"\0") if n)
print(sum(os.path.getsize(n) for n in names if os.path.isfile(n)))')
  TREE_MIB=$(awk -v b="$TREE_BYTES" 'BEGIN { printf "%.2f", b / 1048576 }')
  TRAVEL_MIB=$(awk -v a="$TREE_BYTES" -v b="$DATA_BYTES" 'BEGIN { printf "%.2f", (a + b) / 1048576 }')
  echo "working tree that travels: $TREE_MIB MiB (tracked + untracked, not ignored) + devdata $DATA_MIB MiB = $TRAVEL_MIB MiB (limit $TRAVEL_MAX_MIB MiB)"
  if ! git -C "$REPO" check-ignore -q "$DEST" 2>/dev/null; then
    echo "WARNING: $DEST is not git-ignored: it would travel as an untracked folder too (and could be committed)" >&2
  fi
  # the value to pass as gpu_campaign.sh --commit: training.git_commit()'s rule, computed here where git works
  SHA=$(git -C "$REPO" rev-parse HEAD)
  DIRTY=$(cd "$REPO" && git --no-optional-locks status --porcelain --untracked-files=no -- . ':(exclude)results' ':(exclude)assets' \
          ':(exclude)checkpoints')
  echo "commit for gpu_campaign.sh --commit: ${SHA}${DIRTY:+-dirty}"
  if awk -v t="$TRAVEL_MIB" -v m="$TRAVEL_MAX_MIB" 'BEGIN { exit !(t > m) }'; then
    echo "FAILED: $TRAVEL_MIB MiB would travel, over the device's $TRAVEL_MAX_MIB MiB" >&2
    exit 1
  fi
fi
if awk -v t="$DATA_MIB" -v m="$MAX_MIB" 'BEGIN { exit !(t > m) }'; then
  echo "FAILED: devdata is $DATA_MIB MiB, over the budget of $MAX_MIB MiB (--max-mib)" >&2
  exit 1
fi
echo "OK: send $(basename "$DEST")/ with the working tree"
