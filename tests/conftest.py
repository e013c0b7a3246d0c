"""Shared test fixtures. Tests that need real data skip with the reason when VAE_DATA_DIR is unset;
CI sets VAE_DATA_DIR=../shared/data so none of them skip there."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))
# No test downloads data: without a network each attempt waits on DNS for tens of seconds.
os.environ["VAE_DATA_DOWNLOAD"] = "0"
# MKL may otherwise use fewer threads than asked when the machine is busy (MKL_DYNAMIC defaults to true), which
# splits a matrix product's sums differently: the bit-exact resume tests compare runs made in separate processes.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")


# CI passes a relative VAE_DATA_DIR (../shared/data); tests that run scripts from other working
# directories need it absolute, so resolve it once against the directory pytest started in.
if os.environ.get("VAE_DATA_DIR"):
    os.environ["VAE_DATA_DIR"] = str(Path(os.environ["VAE_DATA_DIR"]).expanduser().resolve())


def _real_data_dir() -> Path | None:
    value = os.environ.get("VAE_DATA_DIR")
    return Path(value) if value and Path(value).is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root holding MNIST/raw, FashionMNIST/raw and BinarizedMNIST (torchvision layout)."""
    root = _real_data_dir()
    if root is None or not (root / "MNIST" / "raw").is_dir():
        pytest.skip("needs the real MNIST/FashionMNIST files: set VAE_DATA_DIR to a directory holding "
                    "MNIST/raw/*.gz (CI uses VAE_DATA_DIR=../shared/data)")
    return root


def run_script(script: str, *args, timeout: float = 300, env: dict | None = None, cwd: Path = ROOT):
    """Run `python <script> <args>` from the repo root; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
