"""Faults around the input: short writes (full disk, file-size limit), Ctrl-C, and option values that used to fail
late or with an unhelpful message (issue 23, points 4, 10 and 11).

Each user error asserts exit code 2, exactly one ``PROG: error:`` line naming the file or value and the fix, no
traceback, and nothing published. The short writes are real: a subprocess runs with a small ``RLIMIT_FSIZE`` (Python
ignores SIGXFSZ, so a write past the limit fails with EFBIG, exactly as on a full disk -- and SimpleITK's writer then
returns without an error, leaving a truncated image). The interruptions send a real SIGINT.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from console_harness import assert_user_error, listing

from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases

REPO = Path(__file__).resolve().parents[1]
CONVERT_ARGS = ["--modality", "MRA=MRA.nii.gz", "--modality", "MRB=MRB.nii.gz", "--label", "seg.nii.gz"]
SIZE_LIMIT = 5000  # bytes: above Python's own small writes, below one phantom image (about 12 kB)


def env_for(root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"))
    return env


def limited(size: int):
    """``preexec_fn`` giving the child a file-size limit of ``size`` bytes."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.skip(f"console script {name} is not installed beside {sys.executable}")
    return str(path)


@pytest.fixture(scope="module")
def phantom_sources(tmp_path_factory) -> Path:
    return make_phantom_cases(tmp_path_factory.mktemp("phantom"), num_labeled=3, num_unlabeled=2,
                              shape=(8, 20, 20), seed=7)


# ------------------------------------------------------------------------------------------------------------------
# 1. every file we write is verified
# ------------------------------------------------------------------------------------------------------------------

def test_simpleitk_really_writes_a_truncated_image_without_an_error(tmp_path):
    """The premise: at the file-size limit SimpleITK's writer returns normally and leaves a cut file."""
    code = textwrap.dedent("""
        import sys, numpy as np, SimpleITK as sitk
        image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 20, 20)).astype(np.float32))
        sitk.WriteImage(image, sys.argv[1], True)
    """)
    target = tmp_path / "x.nii.gz"
    result = subprocess.run([sys.executable, "-c", code, str(target)], preexec_fn=limited(SIZE_LIMIT),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and target.stat().st_size == SIZE_LIMIT, result.stderr


def test_convert_at_the_file_size_limit_fails_naming_the_file(phantom_sources, tmp_path):
    """Today's fault: 'Wrote ...' and exit 0 over truncated images. Now: exit 2, the final file named, nothing left."""
    raw = tmp_path / "raw"
    command = [script("nnUNetv2_mmssl_convert"), "-i", str(phantom_sources / "labeled"),
               str(phantom_sources / "unlabeled"), *CONVERT_ARGS, "-d", "571", "-n", "Cut", "-o", str(raw)]
    result = subprocess.run(command, preexec_fn=limited(SIZE_LIMIT), env=env_for(tmp_path), capture_output=True,
                            text=True, timeout=300)
    line = assert_user_error(result.returncode, result.stderr, "nnUNetv2_mmssl_convert", "file-size limit",
                             "could not be written completely", "ulimit -f")
    named = line.split("nnUNetv2_mmssl_convert: error: ")[1].split(",")[0]
    assert named.startswith(str(raw / "Dataset571_Cut" / "imagesTr")) and named.endswith(".nii.gz"), line
    assert "Wrote" not in result.stdout and "done:" not in result.stdout
    assert listing(raw) == [], "nothing published, no temporary folder left"


WRITERS = textwrap.dedent("""
    import json, sys
    import nibabel, numpy as np, SimpleITK as sitk
    from nnunet_mmssl import io_checks
    from nnunet_mmssl.cli.pseudolabel import write_float_map
    from nnunet_mmssl.dataloading.unlabeled_preprocessing import save_case_verified

    folder = sys.argv[1]
    big = np.random.default_rng(0).normal(size=(8, 20, 20)).astype(np.float32)
    geometry = {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                               "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}}
    writers = {
        "prior.npy": lambda p: io_checks.save_npy(big, p),
        "image.nii.gz": lambda p: io_checks.write_image(sitk.GetImageFromArray(big), p),
        "nib.nii": lambda p: io_checks.write_nibabel(nibabel.Nifti1Image(big, np.eye(4)), p),
        "big.json": lambda p: io_checks.write_json({"x": big.ravel().tolist()}, p),
        "entropy.nii.gz": lambda p: write_float_map(big, p, geometry),
        ".nnUNetPlans_2d_unlabeled.partial-abc/case": lambda p: save_case_verified(
            big[None], np.zeros((1, 8, 20, 20), np.int16), {"spacing": [1, 1, 1]}, p),
    }
    out = {}
    for name, write in writers.items():
        path = folder + "/" + name
        try:
            write(path)
            out[name] = "written"
        except io_checks.WriteError as error:
            out[name] = str(error)
    print(json.dumps(out))
""")


def test_every_writer_refuses_a_short_write(tmp_path):
    """Converter images, priors (.npy), nibabel/SimpleITK maps of pseudolabel, JSON, unlabelled cases (blosc2):
    each raises WriteError naming the final file and the cause, and leaves no file (nor temporary file) behind."""
    (tmp_path / ".nnUNetPlans_2d_unlabeled.partial-abc").mkdir()
    result = subprocess.run([sys.executable, "-c", WRITERS, str(tmp_path)], preexec_fn=limited(SIZE_LIMIT),
                            env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    for name, message in outcome.items():
        shown = str(tmp_path / name.replace(".nnUNetPlans_2d_unlabeled.partial-abc", "nnUNetPlans_2d_unlabeled"))
        assert message.startswith(shown), (name, message)
        assert "file-size limit" in message and "could not be written completely" in message, (name, message)
    # the unlabelled case's files sit in its temporary folder, which build_folder_atomically removes on the error
    assert [p for p in listing(tmp_path) if not p.startswith(".nnUNetPlans_2d_unlabeled.partial-abc/")] == [
        ".nnUNetPlans_2d_unlabeled.partial-abc"]


def test_writers_publish_what_they_were_given(tmp_path):
    """The control: without a limit every writer publishes the exact content, and no temporary file remains."""
    from nnunet_mmssl import io_checks

    array = np.arange(8 * 20 * 20, dtype=np.float32).reshape(8, 20, 20)
    io_checks.write_image(sitk.GetImageFromArray(array), tmp_path / "a.nii.gz")
    io_checks.save_npy(array, tmp_path / "a.npy")
    io_checks.write_json({"a": [1, 2]}, tmp_path / "a.json")
    io_checks.write_text("rank,case\r\n1,x\r\n", tmp_path / "a.csv")  # a CSV's line ends kept as they are
    assert (tmp_path / "a.csv").read_bytes() == b"rank,case\r\n1,x\r\n"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nii.gz"))), array)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array)
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.json", "a.nii.gz", "a.npy"]
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        io_checks.write_json({"margin_mm": float("nan")}, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()


def test_failure_cause_says_disk_full(tmp_path, monkeypatch):
    from nnunet_mmssl import io_checks

    written = tmp_path / "x.nii.gz"
    written.write_bytes(b"12345")
    monkeypatch.setattr(io_checks, "file_size_limit", lambda: None)
    monkeypatch.setattr(io_checks, "free_bytes", lambda path: 0)
    assert io_checks.failure_cause(written).startswith("the disk is full")
    assert io_checks.failure_cause(written, OSError(errno.ENOSPC, "No space left on device")).startswith(
        "the disk is full")
    monkeypatch.setattr(io_checks, "free_bytes", lambda path: 10 ** 12)
    assert io_checks.failure_cause(written, OSError(errno.EFBIG, "File too large")).startswith(
        "the file-size limit")
    assert "incomplete" in io_checks.failure_cause(written)


@pytest.fixture
def stock_model(tmp_path, monkeypatch, phantom_sources) -> tuple[Path, Path]:
    """A stock nnUNetTrainer model folder (random weights) and an input folder of 2 phantom cases."""
    from plans_fixtures import DATASET_JSON, PLANS
    from test_bad_input import _phantom_inputs, _stock_model_folder

    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    folder = _stock_model_folder(tmp_path / "results" / "Dataset999_X" / "nnUNetTrainer__nnUNetPlans__2d", PLANS,
                                 DATASET_JSON)
    return folder, _phantom_inputs(phantom_sources, tmp_path / "input")


def test_predict_refuses_a_prediction_cut_by_the_export(stock_model, tmp_path, capsys, monkeypatch):
    """nnU-Net's export writes with SimpleITK (silent on a short write): each written prediction is read back, and a
    cut one is an error naming its final path; nothing is published."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_mmssl.cli.predict import PROG, main

    model, inputs = stock_model
    out = tmp_path / "pred"

    def export_cut_short(self, source, output_folder, **kwargs):
        for case in ("case0", "case1"):
            path = Path(output_folder, f"{case}.nii.gz")
            sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 20, 20), np.uint8)), str(path), True)
        path.write_bytes(path.read_bytes()[:20])  # what the file-size limit leaves

    monkeypatch.setattr(nnUNetPredictor, "predict_from_files", export_cut_short)
    code = main(["-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0", "-device", "cpu"])
    assert_user_error(code, capsys.readouterr().err, PROG, f"{out / 'case1.nii.gz'}, could not be written completely",
                      "ulimit -f")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pred")]


# ------------------------------------------------------------------------------------------------------------------
# 2. interruptions
# ------------------------------------------------------------------------------------------------------------------

def _report_sigint_blocked(queue) -> None:
    queue.put(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_workers_started_by_a_command_have_sigint_blocked(capsys):
    """Only the command's own process reacts to Ctrl-C: a spawn worker started inside run_cli has SIGINT blocked,
    one started outside does not; and a KeyboardInterrupt in the body is exit 130 with one line."""
    import argparse
    import multiprocessing

    from nnunet_mmssl.cli._common import run_cli

    context = multiprocessing.get_context("spawn")

    def blocked_in_worker() -> bool:
        queue = context.Queue()
        process = context.Process(target=_report_sigint_blocked, args=(queue,))
        process.start()
        try:
            return queue.get(timeout=120)
        finally:
            process.join(30)

    seen = {}

    def body(args):
        seen["inside"] = blocked_in_worker()
        raise KeyboardInterrupt

    code = run_cli("prog", argparse.ArgumentParser(), body, [])
    err = capsys.readouterr().err
    assert code == 130 and err.strip().splitlines() == [err.strip()] and err.startswith("prog: interrupted")
    assert seen["inside"] is True
    assert blocked_in_worker() is False
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


STUCK = textwrap.dedent("""
    import argparse, sys, time
    from nnunet_mmssl.cli import _common

    def body(args):
        print("started", flush=True)
        try:
            time.sleep(120)
        finally:
            while True:  # a cleanup that never ends, and swallows further interrupts
                try:
                    time.sleep(120)
                except KeyboardInterrupt:
                    pass

    _common.INTERRUPT_GRACE_S = float(sys.argv[1])
    sys.exit(_common.run_cli("stuck", argparse.ArgumentParser(), body, []))
""")


@pytest.mark.parametrize("second", [False, True])
def test_an_interrupted_command_never_hangs(tmp_path, second):
    """A cleanup that does not end: the command ends anyway after the grace time, or at once on a second Ctrl-C,
    with exit 130 and the one line."""
    process = subprocess.Popen([sys.executable, "-c", STUCK, "60" if second else "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env_for(tmp_path))
    assert process.stdout.readline().strip() == "started"
    start = time.monotonic()
    process.send_signal(signal.SIGINT)
    if second:
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and time.monotonic() - start < 10, err
    assert err.strip().startswith("stuck: interrupted") and len(err.strip().splitlines()) == 1, err


class _InterruptedWhileDeleted:
    """Its ``__del__`` is interrupted: a Ctrl-C that lands there (Python prints "Exception ignored" and goes on)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # the handler runs here, inside __del__
            pass


def test_ctrl_c_inside_a_finaliser_is_not_lost(capsys):
    """A Ctrl-C landing in a ``__del__`` or weakref callback (a pool being collected) is raised just after it, where
    it can stop the command, instead of being printed as an ignored exception and lost until the grace time."""
    from nnunet_mmssl.cli._common import interrupts_as_exit_code

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with interrupts_as_exit_code("prog", grace_s=60):
            thing = _InterruptedWhileDeleted()
            del thing  # __del__ runs now
            time.sleep(5)  # the interrupt, asked again, arrives here
    assert time.monotonic() - start < 3
    assert "Exception ignored" not in capsys.readouterr().err


CHURN = textwrap.dedent("""
    import argparse, multiprocessing, sys
    from nnunet_mmssl.cli import _common

    def body(args):
        print("started", flush=True)
        while True:  # pools started and ended without pause: an interrupt lands at any point of a pool's life
            try:
                with multiprocessing.get_context("fork").Pool(2) as pool:
                    pool.map(abs, range(8))
            except KeyboardInterrupt:
                if sys.argv[1] == "raised":
                    raise

    _common.INTERRUPT_GRACE_S = 1.0
    sys.exit(_common.run_cli("churn", argparse.ArgumentParser(), body, []))
""")


def _process_group(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except OSError:
                pass
    return members


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to list a process group")
@pytest.mark.parametrize("body", ["raised", "swallowed"])
def test_no_worker_outlives_an_interrupted_command(tmp_path, body):
    """A command interrupted while pools start and end (a pool replaces its dead workers from its own thread): no
    worker of it is left once it has exited -- a worker started after the children were ended waited forever with
    the command's output open (seen as a CI run's hang). The interrupt propagates (``raised``: the workers are
    ended before the one line) or is swallowed by the body (``swallowed``: the grace time ends the command).
    Repeated, as the interrupt lands at a different point each time."""
    for attempt in range(4):
        with open(tmp_path / f"err{attempt}.txt", "w+") as err:
            process = subprocess.Popen([sys.executable, "-c", CHURN, body], stdout=subprocess.PIPE, stderr=err,
                                       text=True, env=env_for(tmp_path), start_new_session=True)
            try:
                assert process.stdout.readline().strip() == "started"
                time.sleep(0.2 + 0.1 * attempt)
                os.killpg(process.pid, signal.SIGINT)
                assert process.wait(timeout=60) == 130
                deadline = time.monotonic() + 5.0  # a terminated worker may take a moment to be gone
                while _process_group(process.pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                left = _process_group(process.pid)
                assert left == [], f"attempt {attempt}: processes {left} outlived the command"
                err.seek(0)
                text = err.read().strip()
                assert text.startswith("churn: interrupted") and len(text.splitlines()) == 1, text
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                process.stdout.close()


def test_interrupted_rerun_keeps_the_published_labelled_folder(tmp_path, monkeypatch):
    """nnU-Net empties a configuration's folder before refilling it; ours builds it aside and swaps it in, so an
    interrupted rerun keeps the previous complete folder (and leaves no temporary plans or folder), and a finished
    one replaces it whole."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning import plan_and_preprocess_api
    from plans_fixtures import PLANS

    from nnunet_mmssl.planners.plan_and_preprocess import _preprocess_labelled

    folder = tmp_path / "Dataset999_X"
    published = folder / "nnUNetPlans_2d"
    published.mkdir(parents=True)
    (published / "old_case.b2nd").write_text("previous run")
    (folder / "nnUNetPlans.json").write_text(json.dumps(PLANS))

    def nnunet_preprocess(dataset_id, identifier, configurations, num_processes, verbose):
        plans = load_json(folder / f"{identifier}.json")
        target = folder / plans["configurations"][configurations[0]]["data_identifier"]
        shutil.rmtree(target)  # as nnU-Net does
        target.mkdir()
        (target / "new_case.b2nd").write_text("this run")
        if interrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(plan_and_preprocess_api, "preprocess_dataset", nnunet_preprocess)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        _preprocess_labelled(999, "nnUNetPlans", ["2d"], 1, None, str(folder), progress=lambda m: None)
    assert listing(published) == ["old_case.b2nd"]
    assert [p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []
    interrupt = False
    _preprocess_labelled(999, "nnUNetPlans", ["2d"], 1, None, str(folder), progress=lambda m: None)
    assert listing(published) == ["new_case.b2nd"]
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["nnUNetPlans.json",
                                                                                         "nnUNetPlans_2d"]


def _interrupt_when(command: list[str], env: dict, marker: str, delay: float) -> tuple[int, str, float]:
    """Start ``command`` in its own process group, send SIGINT to the group (as a terminal's Ctrl-C does) ``delay``
    seconds after ``marker`` appears on stdout; return (exit code, stderr, seconds from SIGINT to exit).

    The seconds are the command's own exit (what the user waits for). Its stderr is read until every process that
    holds the pipe has closed it (a multiprocessing pool's workers may outlive the command by a few seconds, more on a
    loaded machine), so a late worker traceback is still seen."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                break
        assert any(marker in line for line in lines), "".join(lines) + process.stderr.read()
        time.sleep(delay)
        assert process.poll() is None, "the command ended before the interrupt"
        start = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        streams = {}
        readers = [threading.Thread(target=lambda name=name: streams.update({name: getattr(process, name).read()}),
                                    daemon=True) for name in ("stdout", "stderr")]
        for reader in readers:
            reader.start()
        process.wait(timeout=60)
        seconds = time.monotonic() - start
        for reader in readers:
            reader.join(timeout=180)
        assert "stderr" in streams, "the command's stderr stayed open 180 s after it exited"
        return process.returncode, streams["stderr"], seconds
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def assert_interrupted(code: int, err: str, prog: str) -> None:
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: interrupted"), err


def test_ctrl_c_during_conversion(tmp_path):
    """Ctrl-C while the worker pool writes: exit 130, one line, no worker traceback, nothing published."""
    sources = make_phantom_cases(tmp_path / "src", num_labeled=12, num_unlabeled=12, shape=(16, 48, 48), seed=3)
    raw = tmp_path / "raw"
    command = [script("nnUNetv2_mmssl_convert"), "-i", str(sources / "labeled"), str(sources / "unlabeled"),
               *CONVERT_ARGS, "-d", "572", "-n", "Int", "-o", str(raw), "-np", "2"]
    code, err, seconds = _interrupt_when(command, env_for(tmp_path), "wrote", 0.2)
    assert_interrupted(code, err, "nnUNetv2_mmssl_convert")
    assert seconds < 30
    assert listing(raw) == []


@pytest.mark.slow
@pytest.mark.parametrize("marker", ["Fingerprint of", "Preprocessing labelled cases"])
def test_ctrl_c_during_plan_and_preprocess_rerun(phantom_sources, tmp_path, marker):
    """A rerun interrupted during nnU-Net's fingerprint (multiprocessing pool) or its preprocessing: exit 130, one
    line, no worker traceback, within seconds, and the published data folder of the previous run intact."""
    from nnunet_mmssl.dataset_conversion import PHANTOM_LABEL_GLOB, PHANTOM_MODALITY_GLOBS, convert_dataset

    convert_dataset([str(phantom_sources / "labeled"), str(phantom_sources / "unlabeled")], PHANTOM_MODALITY_GLOBS,
                    PHANTOM_LABEL_GLOB, str(tmp_path / "raw"), 573, "Int", num_labeled=3, num_test=0, seed=0)
    published = tmp_path / "preprocessed" / "Dataset573_Int" / "nnUNetPlans_2d"
    published.mkdir(parents=True)
    (published / "Int_000.b2nd").write_text("the previous run's case")
    command = [script("nnUNetv2_mmssl_plan_and_preprocess"), "-d", "573", "-c", "2d", "-np", "2",
               "--no-mmssl-plans"]
    code, err, seconds = _interrupt_when(command, env_for(tmp_path), marker, 0.5)
    assert_interrupted(code, err, "nnUNetv2_mmssl_plan_and_preprocess")
    assert seconds < 30
    assert listing(published) == ["Int_000.b2nd"]
    assert not [p for p in published.parent.iterdir() if ".partial-" in p.name]


# ------------------------------------------------------------------------------------------------------------------
# 3. messages: checked first, one line, the file or value and the fix
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["-step_size", "0"], ["-step_size 0", "(0, 1]", "-step_size 0.5"]),
    (["-step_size", "nan"], ["-step_size nan", "(0, 1]"]),
    (["-step_size", "1.5"], ["-step_size 1.5", "(0, 1]"]),
])
def test_predict_option_values_checked_first(tmp_path, capsys, args, expected):
    """Before the model folder is even looked at (-m does not exist here)."""
    from nnunet_mmssl.cli.predict import PROG, main

    code = main(["-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "no_model"), *args])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("where", ["existing file", "inside -i", "-i itself", "below a file"])
def test_predict_output_path_checked_first(tmp_path, capsys, where):
    from nnunet_mmssl.cli.predict import PROG, main

    inputs = tmp_path / "in"
    inputs.mkdir()
    (tmp_path / "file.txt").write_text("mine")
    out = {"existing file": tmp_path / "file.txt", "inside -i": inputs / "pred", "-i itself": inputs,
           "below a file": tmp_path / "file.txt" / "pred"}[where]
    before = listing(tmp_path)
    code = main(["-i", str(inputs), "-o", str(out), "-m", str(tmp_path / "no_model"), "-device", "cpu"])
    expected = {"existing file": [f"-o {out}, exists and is a file", "Give an output folder"],
                "inside -i": [f"-o {out}, is inside the input folder", "Choose an output folder outside"],
                "-i itself": [f"-o {out}, is inside the input folder"],
                "below a file": [f"-o {out}, is below the file {tmp_path / 'file.txt'}"]}[where]
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(tmp_path) == before


def _four_d(path: Path) -> None:
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([array, array]), isVector=False), str(path), True)


def test_predict_4d_input_checked_up_front(stock_model, tmp_path, capsys, monkeypatch):
    """Was a worker traceback and 'Background workers died ... RAM was full'; now one line before nnU-Net starts."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_mmssl.cli.predict import PROG, main

    model, inputs = stock_model
    _four_d(inputs / "case1_0000.nii.gz")
    monkeypatch.setattr(nnUNetPredictor, "initialize_from_trained_model_folder",
                        lambda *a, **k: pytest.fail("nnU-Net was started before the input check"))
    code = main(["-i", str(inputs), "-o", str(tmp_path / "pred"), "-m", str(model), "-f", "0", "-device", "cpu"])
    assert_user_error(code, capsys.readouterr().err, PROG, f"{inputs / 'case1_0000.nii.gz'}, is a 4D image",
                      "Split a 4D series into one file per channel")
    assert not (tmp_path / "pred").exists()


def test_convert_fully_4d_case(phantom_sources, tmp_path, capsys):
    """Was SimpleITK's 'Image_CopyInformation ... does not match this image's dimension'."""
    from nnunet_mmssl.cli.convert import PROG, main

    sources = Path(shutil.copytree(phantom_sources / "labeled", tmp_path / "src"))
    for path in (sources / "phantom_001").iterdir():
        _four_d(path)
    code = main(["-i", str(sources), *CONVERT_ARGS, "-d", "574", "-n", "Bad", "-o", str(tmp_path / "raw"), "-q"])
    assert_user_error(code, capsys.readouterr().err, PROG, "phantom_001", "is a 4D image", "Split it into one file")
    assert not (tmp_path / "raw").exists()


def test_convert_output_root_is_a_file(phantom_sources, tmp_path, capsys):
    from nnunet_mmssl.cli.convert import PROG, main

    (tmp_path / "raw").write_text("not a folder")
    code = main(["-i", str(phantom_sources / "labeled"), *CONVERT_ARGS, "-d", "575", "-n", "Bad", "-o",
                 str(tmp_path / "raw"), "-q"])
    assert_user_error(code, capsys.readouterr().err, PROG, f"{tmp_path / 'raw'}, is a file, not a folder", "-o")


@pytest.fixture
def pseudolabel_model(tmp_path) -> Path:
    """Enough of a model folder for the option checks, which come before anything is read."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "plans.json").write_text(json.dumps({"dataset_name": "Dataset999_X"}))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "A"}, "file_ending": ".nii.gz"}))
    return folder


@pytest.mark.parametrize("args, expected", [
    (["--margin-mm", "nan"], ["--margin-mm nan", "not a finite number"]),
    (["--margin-mm", "inf"], ["--margin-mm inf", "not a finite number"]),
    (["--uncertain-fraction", "nan"], ["--uncertain-fraction nan", "not a finite number"]),
    (["-step_size", "0"], ["-step_size 0", "(0, 1]"]),
])
def test_pseudolabel_option_values_checked_first(pseudolabel_model, tmp_path, capsys, args, expected):
    """--margin-mm nan used to be written into pseudolabel.json as NaN (invalid JSON) after the whole prediction."""
    from nnunet_mmssl.cli.pseudolabel import PROG, main

    before = listing(tmp_path)
    code = main(["-m", str(pseudolabel_model), "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-device", "cpu",
                 *args])
    assert_user_error(code, capsys.readouterr().err, PROG, *expected)
    assert listing(tmp_path) == before


def test_pseudolabel_output_inside_input(pseudolabel_model, tmp_path, capsys):
    from nnunet_mmssl.cli.pseudolabel import PROG, main

    inputs = tmp_path / "in"
    inputs.mkdir()
    code = main(["-m", str(pseudolabel_model), "-i", str(inputs), "-o", str(inputs / "out"), "-device", "cpu"])
    assert_user_error(code, capsys.readouterr().err, PROG, "is inside the input folder")


@pytest.mark.parametrize("value", ["0", "-5", "99"])
def test_study_bootstrap_checked_before_any_run(tmp_path, capsys, monkeypatch, value):
    """Was refused only after every run had trained (in the report)."""
    from nnunet_mmssl.cli.study import PROG, main

    monkeypatch.delenv("nnUNet_raw", raising=False)  # no dataset at all: the check comes first
    code = main(["-d", "1", "--labeled", "1", "-o", str(tmp_path / "study"), "--bootstrap", value])
    assert_user_error(code, capsys.readouterr().err, PROG, f"--bootstrap {value}", "at least 100")
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("error, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/raw/.Dataset914_RO.tmp-x1y2z3"),
     "/data/raw/Dataset914_RO, permission denied. Choose a location you may write to"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/o/.pr_ok.k0mrub6p.tmp", None, "/o/pr_ok"),
     "error: /o/pr_ok, is a directory. That path is a folder"),
    (FileExistsError(errno.EEXIST, "File exists", "/o/pred"), "/o/pred, file exists. It is in the way"),
    (OSError(errno.ENOSPC, "No space left on device", "/o/.pred.partial-abc/case.nii.gz"),
     "/o/pred/case.nii.gz, no space left on device. Free disk space"),
])
def test_bare_os_errors_name_the_real_target(error, expected, capsys):
    """Bare errno texts naming our hidden temporary files become 'target, what. fix.'."""
    import argparse

    from nnunet_mmssl.cli._common import run_cli

    def body(args):
        raise error

    assert run_cli("prog", argparse.ArgumentParser(), body, []) == 2
    assert_user_error(2, capsys.readouterr().err, "prog", expected)


def _two_label_folders(tmp_path: Path) -> tuple[Path, Path]:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for folder in (ref, pred):
        folder.mkdir()
        array = np.zeros((4, 8, 8), dtype=np.uint8)
        array[1:3, 2:6, 2:6] = 1
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / "case_0.nii.gz"))
    return ref, pred


def test_evaluate_output_that_is_a_folder_is_refused_first(tmp_path, capsys, monkeypatch):
    """``-o`` naming a folder is refused before any scoring (was a bare [Errno 21] naming our temporary file)."""
    import nnunet_mmssl.evaluation.report as report
    from nnunet_mmssl.cli.evaluate import PROG, main

    ref, pred = _two_label_folders(tmp_path)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(report, "evaluate_folders", lambda *a, **k: pytest.fail("scored before the -o check"))
    code = main(["-ref", str(ref), "-pred", str(pred), "-l", "1", "-o", str(tmp_path / "out")])
    assert_user_error(code, capsys.readouterr().err, PROG, str(tmp_path / "out"), "is a folder", "Give a file name")
    assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("raised, code_expected, expected", [
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
    (OSError(errno.ENOSPC, "No space left on device", "/o/.summary.json.abc.tmp"), 2, "no space left on device"),
])
def test_evaluate_interrupt_and_os_error_are_one_line(tmp_path, capsys, monkeypatch, raised, code_expected, expected):
    """Ctrl-C during the evaluation exits 130 with one line; an OSError is described, never a traceback."""
    import nnunet_mmssl.evaluation.report as report
    from nnunet_mmssl.cli.evaluate import PROG, main

    ref, pred = _two_label_folders(tmp_path)

    def interrupted(*args, **kwargs):
        raise raised

    monkeypatch.setattr(report, "evaluate_folders", interrupted)
    code = main(["-ref", str(ref), "-pred", str(pred), "-l", "1"])
    err = capsys.readouterr().err
    assert code == code_expected and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{PROG}:")]
    assert len(lines) == 1 and expected in lines[0], err
