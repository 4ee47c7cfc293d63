"""Shared test settings: few worker processes, and the location of the real data (may be absent)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_compile", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA
