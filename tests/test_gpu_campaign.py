"""scripts/gpu_campaign.sh --dry-run: the GPU campaign's every step (quick runs of every rung incl. --compile and
torchrun, bench, model01 with L_S, the re-scores of every published checkpoint, one forced PARTIAL, the packing of
$OUT) rehearsed on the CPU at tiny sizes, so the one script for a machine with a GPU for a limited time cannot rot
unnoticed between the times a GPU is at hand. It must leave the repo's published files untouched."""
import hashlib
import subprocess

from conftest import ROOT

PUBLISHED = ("results", "assets", "checkpoints")


def published_hashes() -> dict:
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in PUBLISHED for p in sorted((ROOT / d).rglob("*")) if p.is_file()}


def test_dry_run_rehearses_every_step_and_changes_no_published_file(data_dir, tmp_path):
    before = published_hashes()
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(["bash", "scripts/gpu_campaign.sh", "--dry-run", "--steps", "1,2,3,4,5", "--out", str(out),
                           "--work", str(work),
                           "--data", str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    summary = (out / "SUMMARY.txt").read_text() if (out / "SUMMARY.txt").exists() else ""
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"SUMMARY.txt", "campaign.log", "bench_cpu.json", "publish.tar.gz",
                                               "runs.tar.gz"}
    rows = [line.split() for line in summary.splitlines() if line[:1].isdigit()]
    jobs = {row[1]: row[2] for row in rows}
    for job in ("quick_model01", "quick_model02", "quick_model02_unbounded", "quick_model03", "quick_model04",
                "quick_model01_compile", "torchrun_model01", "bench", "model01_k5", "model04_default"):
        assert jobs.get(job) == "OK", summary
    rescores = [row for row in rows if row[0] == "4"]
    # the six published model02/03/04 checkpoints and the one step 5 just published; one forced PARTIAL
    assert len(rescores) == 7 and [r[2] for r in rescores].count("PARTIAL") == 1, summary
    assert "0 FAILED" in summary
    assert published_hashes() == before  # the rehearsal published into a scratch copy only


def test_a_failing_step_is_reported_and_fails_the_script(data_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu_campaign.sh", "--dry-run", "--steps", "2", "--inject-fail", "bench",
                           "--out", str(out), "--work", str(tmp_path / "work"), "--data", str(data_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "FAILED: step 2 bench" in proc.stdout + proc.stderr
    assert "1 FAILED" in (out / "SUMMARY.txt").read_text()


def _pack_and_unpack(pub, repo, tmp_path):
    """Pack pub/results and pub's manifest as the device would, then unpack them into `repo` with --apply."""
    import tarfile

    files = tmp_path / "files"
    files.mkdir()
    with tarfile.open(files / "publish.tar.gz", "w:gz") as tar:
        tar.add(pub / "results", arcname="results")
        tar.add(pub / "gpu_campaign_manifest.txt", arcname="gpu_campaign_manifest.txt")
    proc = subprocess.run(["bash", "scripts/gpu_campaign_unpack.sh", str(files), "--repo", str(repo), "--apply",
                           "--no-readme", "--stage", str(tmp_path / "stage")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_unpack_stamps_the_campaign_commit_over_the_devices_stale_git(tmp_path):
    """The device's copy of the repo can carry a stale .git (an older commit + "-dirty" in every result while the
    tree sent was a later commit). The unpack script must record the campaign's --commit, keep
    the device's view beside it, and restamp that campaign's evaluation segments only."""
    import json
    import shutil

    repo = tmp_path / "repo"
    for d in ("results", "assets", "checkpoints"):
        (repo / d).mkdir(parents=True)
    shutil.copy(ROOT / "compare.py", repo / "compare.py")
    name = "model02_fashion-mnist_iwae_k5_unbounded_seed0"
    old = {"run_name": name, "model": "model02", "dataset": "fashion-mnist", "eval_samples": 100, "n_test": 10000,
           "test_ll_nats": -2401.0, "device_type": "cpu", "git_commit": "cpu-commit"}
    (repo / "results" / f"{name}.json").write_text(json.dumps(old))
    stale = "0000000000000000000000000000000000000000-dirty"
    new = {**old, "eval_samples": 5000, "test_ll_nats": -2386.0, "device_type": "cuda", "git_commit": stale,
           "evaluated_checkpoint": f"checkpoints/{name}.pt",
           "eval_segment_log": [{"from_image": 0, "device": "CPU", "git_commit": "cpu-commit"},
                                {"from_image": 50, "device": "NVIDIA H200", "git_commit": stale}]}
    pub = tmp_path / "pub"
    (pub / "results").mkdir(parents=True)
    (pub / "results" / f"{name}.json").write_text(json.dumps(new))
    sent = "1111111111111111111111111111111111111111"
    (pub / "gpu_campaign_manifest.txt").write_text(
        f"gpu_campaign publish manifest\nmode=gpu\ncommit={sent}\n# changed or new (md5  path, relative to the repo "
        f"root)\nabc  results/{name}.json\n# re-saved by --eval-only --publish (the weights it evaluated), not packed\n"
        "# deleted\n")
    proc = _pack_and_unpack(pub, repo, tmp_path)
    got = json.loads((repo / "results" / f"{name}.json").read_text())
    assert got["test_ll_nats"] == -2386.0
    assert got["git_commit"] == sent and got["device_git_commit"] == stale
    assert [s["git_commit"] for s in got["eval_segment_log"]] == ["cpu-commit", sent]


def test_unpack_brings_each_kept_result_with_its_per_image_values(tmp_path):
    """A result that names results/per_image/<run>.npy comes with that file (compare.py checks it by sha256);
    one whose file the pack lacks is skipped, so that README never names a missing file."""
    import json

    repo, pub = tmp_path / "repo", tmp_path / "pub"
    for d in ("results", "assets", "checkpoints"):
        (repo / d).mkdir(parents=True)
    (pub / "results" / "per_image").mkdir(parents=True)
    names = ("model03_fashion-mnist_iwae_k5_seed0", "model02_fashion-mnist_iwae_k5_seed0")
    for name in names:
        (pub / "results" / f"{name}.json").write_text(json.dumps(
            {"run_name": name, "model": name[:7], "dataset": "fashion-mnist", "eval_samples": 5000, "n_test": 2,
             "test_ll_nats": -1900.0, "device_type": "cuda", "evaluated_checkpoint": f"checkpoints/{name}.pt",
             "test_ll_per_image": f"per_image/{name}.npy", "test_ll_per_image_sha256": "x"}))
    (pub / "results" / "per_image" / f"{names[0]}.npy").write_bytes(b"per-image values")  # names[1]'s is missing
    (pub / "gpu_campaign_manifest.txt").write_text(
        "gpu_campaign publish manifest\nmode=gpu\n# changed or new (md5  path, relative to the repo root)\n"
        + "".join(f"abc  results/{name}.json\n" for name in names) + f"abc  results/per_image/{names[0]}.npy\n")
    proc = _pack_and_unpack(pub, repo, tmp_path)
    assert (repo / "results" / "per_image" / f"{names[0]}.npy").read_bytes() == b"per-image values"
    assert (repo / "results" / f"{names[0]}.json").is_file()
    assert not (repo / "results" / f"{names[1]}.json").exists()
    assert f"skip: its per-image values results/per_image/{names[1]}.npy are not in the pack" in proc.stdout
