"""Shared test settings: few worker processes, the location of the real data (may be absent), and one converted and
planned phantom per session for the slow end-to-end tests."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("nnUNet_def_n_proc", "2")
os.environ.setdefault("nnUNet_n_proc_DA", "0")
os.environ.setdefault("nnUNet_compile", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def planned_phantom(tmp_path_factory) -> Path:
    """The two-modality phantom converted, planned and preprocessed once per session (tests/phantom_workspace.py);
    copy it with ``phantom_workspace.copy_into(planned_phantom, your_folder)``, never write into it."""
    import phantom_workspace

    return phantom_workspace.build(tmp_path_factory.mktemp("planned_phantom"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA
