"""Shared by the integration tests that drive nnU-Net's and our console scripts in child processes."""

import os
import subprocess
import tempfile
from pathlib import Path


def run_console(args: list[str], env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a console script; with ``ok`` assert it succeeded (its output's tail in the message)."""
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if ok:
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def run_consoles(commands: list[list[str]], env: dict, ok: bool = True) -> list[subprocess.CompletedProcess]:
    """Independent console scripts at the same time (their start -- importing torch and nnU-Net -- is most of a
    short command's time, and it runs on one core); like :func:`run_console` for each, results in order."""
    started = []
    for args in commands:  # output into files, so that no command waits on a full pipe
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        started.append((args, subprocess.Popen(args, env=env, stdout=out, stderr=err, text=True), out, err))
    results = []
    for args, process, out, err in started:
        process.wait()
        texts = []
        for stream in (out, err):
            stream.seek(0)
            texts.append(stream.read())
            stream.close()
        results.append(subprocess.CompletedProcess(args, process.returncode, *texts))
    if ok:
        for result in results:
            assert result.returncode == 0, \
                f"{result.args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return results


def console_environment(root: Path, trainer_module: str, trainer_source: str) -> dict:
    """nnU-Net's three folders under ``root``, a user's trainer module (``trainer_source``) in a folder on
    ``nnUNet_extTrainer`` (our install hook adds ours to it), 2 processes, no augmentation workers, no compile."""
    user_folder = root / "user_trainers"
    user_folder.mkdir()
    (user_folder / trainer_module).write_text(trainer_source)
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_extTrainer=str(user_folder), nnUNet_def_n_proc="2",
               nnUNet_n_proc_DA="0", nnUNet_compile="false")
    env.pop("NNUNET_MMSSL_NO_EXT_TRAINER", None)
    return env


def assert_user_error(code: int, err: str, prog: str, *expected: str) -> str:
    """Exit code 2, exactly one ``PROG: error:`` line containing every ``expected`` substring, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, err
    for substring in expected:
        assert substring in errors[0], f"{substring!r} not in {errors[0]!r}"
    return errors[0]


def listing(folder: Path) -> list[str]:
    """Every path below ``folder`` (hidden ones included), relative; [] if it does not exist."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
