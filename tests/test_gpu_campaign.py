"""scripts/gpu_campaign.sh --dry-run: the GPU campaign's every step (quick runs of every rung incl. --compile and
torchrun, bench, model01 with L_S, the re-scores of every published checkpoint, one forced PARTIAL, the packing of
$OUT) rehearsed on the CPU at tiny sizes, so the one prepared device script cannot rot unnoticed between the
sessions that are lent a GPU. It must leave the repo's published files untouched."""
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
    proc = subprocess.run(["bash", "scripts/gpu_campaign.sh", "--dry-run", "--out", str(out), "--work", str(work),
                           "--data", str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    summary = (out / "SUMMARY.txt").read_text() if (out / "SUMMARY.txt").exists() else ""
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"SUMMARY.txt", "campaign.log", "bench_cpu.json", "publish.tar.gz",
                                               "runs.tar.gz"}
    rows = [line.split() for line in summary.splitlines() if line[:1].isdigit()]
    jobs = {row[1]: row[2] for row in rows}
    for job in ("quick_model01", "quick_model02", "quick_model02_unbounded", "quick_model03", "quick_model04",
                "quick_model01_compile", "torchrun_model01", "bench", "model01_k5"):
        assert jobs.get(job) == "OK", summary
    rescores = [row for row in rows if row[0] == "4"]
    assert len(rescores) == 6 and [r[2] for r in rescores].count("PARTIAL") == 1, summary  # one forced PARTIAL
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
