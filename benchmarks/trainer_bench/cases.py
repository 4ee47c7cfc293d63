"""The benchmark's data and plans: the environment of its processes, the two phantom datasets (built, converted and
planned in ``--workdir``, reused when their recipe is unchanged) and the case files it predicts."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence

from trainer_bench.rows import DEFAULT_PLANNER

PHANTOM_ID = 979
PHANTOM_NAME = "MMSSLBenchPhantom"
PHANTOM_MARKER = "benchmark_phantom.json"
#: the unregistered phantom (CT-like cases of some patients, MR-like of others) for DBDC and the pooled U-Net
UNREGISTERED_PHANTOM_ID = 978
UNREGISTERED_PHANTOM_NAME = "MMSSLBenchPhantomUnreg"
UNREGISTERED_PHANTOM_MARKER = "benchmark_phantom_unregistered.json"


def benchmark_environment(args: argparse.Namespace, workdir: str) -> dict:
    """Environment of the children (and of this process's phantom build)."""
    from nnunet_mmssl._ext_trainer_hook import EXT_TRAINER_FOLDER, EXT_TRAINER_VARIABLE

    env = dict(os.environ)
    if args.phantom:
        env.update(nnUNet_raw=os.path.join(workdir, "nnUNet_raw"),
                   nnUNet_preprocessed=os.path.join(workdir, "nnUNet_preprocessed"))
    else:
        for key in ("nnUNet_raw", "nnUNet_preprocessed"):
            if not env.get(key):
                raise SystemExit(f"-d needs {key} to be set (or use --phantom).")
    env.update(nnUNet_results=os.path.join(workdir, "nnUNet_results"), nnUNet_n_proc_DA=str(args.n_proc_da),
               nnUNet_compile="true" if args.compile else "false",
               nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", str(max(1, args.num_processes))))
    paths = [p for p in env.get(EXT_TRAINER_VARIABLE, "").split(os.pathsep) if p]
    if EXT_TRAINER_FOLDER not in paths:
        env[EXT_TRAINER_VARIABLE] = os.pathsep.join(paths + [EXT_TRAINER_FOLDER])
    env.pop("NNUNET_MMSSL_NO_EXT_TRAINER", None)
    return env


def plan_in_child(dataset_id: int, configurations: Sequence[str], num_processes: int, log_file: str,
                  gpu_memory_target: float | None = None, timeout: float = 3600.0,
                  planner: str = DEFAULT_PLANNER) -> None:
    """``nnUNetv2_mmssl_plan_and_preprocess`` in a child process (environment: this process's), output in
    ``log_file``. Planning the unregistered phantom in the benchmark's own process was seen to hang on a futex (a
    lock held by a thread of an earlier import); a fresh process does not inherit it.

    Raises:
        RuntimeError: the child failed or timed out (with the log's tail).
    """
    script = "import sys; from nnunet_mmssl.cli.plan_and_preprocess import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "-d", str(dataset_id), "-c", *configurations, "-np", str(num_processes)]
    if gpu_memory_target is not None:
        argv += ["-gpu_memory_target", str(gpu_memory_target)]
    if planner != DEFAULT_PLANNER:
        argv += ["-pl", planner]
    with open(log_file, "w") as log:
        try:
            code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        with open(log_file) as log:
            tail = "".join(log.readlines()[-20:])
        reason = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
        raise RuntimeError(f"planning the phantom failed ({reason}; log {log_file}):\n{tail}")


def prepare_unregistered_phantom(args: argparse.Namespace, workdir: str) -> str:
    """Build (or reuse) the unregistered phantom (CT-like and MR-like cases of different "patients", each
    modality its own grid and label numbering; :mod:`~nnunet_mmssl.dataset_conversion.unregistered_phantom`),
    converted with the unregistered converter and planned in a child process; return its name."""
    from nnunet_mmssl.dataset_conversion.unregistered import convert_unregistered
    from nnunet_mmssl.dataset_conversion.unregistered_phantom import make_unregistered_phantom_sources

    labelled, unlabelled = args.phantom_cases
    num_test = max(1, args.predict_cases)
    geometry = unregistered_geometry(args.unregistered_shape)
    recipe = {"kind": "unregistered", "labelled": labelled, "unlabelled": unlabelled, "test": num_test,
              "configurations": sorted(args.configurations), "gpu_memory_target": args.gpu_memory_target,
              "shape": args.unregistered_shape, **_planner_recipe(args)}
    name = f"Dataset{UNREGISTERED_PHANTOM_ID:03d}_{UNREGISTERED_PHANTOM_NAME}"
    marker = os.path.join(workdir, UNREGISTERED_PHANTOM_MARKER)
    if _reuse_phantom(marker, recipe):
        print(f"reusing the unregistered phantom dataset in {workdir}", flush=True)
        return name
    print(f"building the unregistered phantom dataset in {workdir}: per modality (CT-like, MR-like; different "
          f"cases) {labelled} labelled + {unlabelled} unlabelled + {num_test} test; planning "
          f"{' '.join(args.configurations)}{_planner_words(args)} in a child process", flush=True)
    sources = make_unregistered_phantom_sources(os.path.join(workdir, "phantom_unregistered"),
                                                num_labeled=labelled + num_test, num_unlabeled=unlabelled, seed=0,
                                                geometry=geometry)
    convert_unregistered([os.path.join(sources, "CT"), os.path.join(sources, "MR")], ["CT", "MR"], "image.nii.gz",
                         "label.nii.gz", os.environ["nnUNet_raw"], UNREGISTERED_PHANTOM_ID, UNREGISTERED_PHANTOM_NAME,
                         num_labeled=labelled, num_test=num_test, seed=0, labels={"background": 0, "lesion": 1},
                         label_maps={"CT": {5: 1}}, overwrite=True)
    plan_in_child(UNREGISTERED_PHANTOM_ID, list(args.configurations), max(1, args.num_processes),
                  os.path.join(workdir, "logs", "plan_and_preprocess_unregistered.log"), args.gpu_memory_target,
                  planner=getattr(args, "planner", DEFAULT_PLANNER))
    with open(marker, "w") as handle:
        json.dump(recipe, handle)
    return name


def unregistered_geometry(shape: Sequence[int] | None) -> dict | None:
    """The unregistered phantom's per-modality ``(shape, spacing, label value)`` for CT-like cases of ``shape`` voxels
    at 1 mm and MR-like cases of the same extent at 1.2 mm; None (the phantom module's grids) without a shape."""
    if shape is None:
        return None
    from nnunet_mmssl.dataset_conversion.unregistered_phantom import UNREGISTERED_PHANTOM_GEOMETRY as table

    mr = tuple(max(8, round(s / 1.2)) for s in shape)
    return {"CT": (tuple(int(s) for s in shape), (1.0, 1.0, 1.0), table["CT"][2]),
            "MR": (mr, (1.2, 1.2, 1.2), table["MR"][2])}


def _planner_recipe(args: argparse.Namespace) -> dict:
    """The planner's entry of a phantom's recipe: none for nnU-Net's default planner (the recipes of phantoms built
    before ``-pl`` existed stay valid), else ``{"planner": name}`` (a phantom of another planner is rebuilt)."""
    planner = getattr(args, "planner", DEFAULT_PLANNER)
    return {} if planner == DEFAULT_PLANNER else {"planner": planner}


def _planner_words(args: argparse.Namespace) -> str:
    """`` with PLANNER`` for the build message, empty for nnU-Net's default planner."""
    planner = getattr(args, "planner", DEFAULT_PLANNER)
    return "" if planner == DEFAULT_PLANNER else f" with {planner}"


def _reuse_phantom(marker: str, recipe: dict) -> bool:
    """True when ``marker`` records the same recipe with at least the requested configurations; else the marker is
    removed (the phantom will be rebuilt)."""
    if not os.path.isfile(marker):
        return False
    with open(marker) as handle:
        old = json.load(handle)
    if {**old, "configurations": []} == {**recipe, "configurations": []} and \
            set(recipe["configurations"]) <= set(old["configurations"]):
        return True
    os.remove(marker)
    return False


def prepare_phantom(args: argparse.Namespace, workdir: str) -> str:
    """Build (or reuse) the phantom dataset with the requested configurations preprocessed; return its name."""
    if args.phantom_kind == "unregistered":
        return prepare_unregistered_phantom(args, workdir)
    from nnunet_mmssl.dataset_conversion import PHANTOM_LABEL_GLOB, PHANTOM_MODALITY_GLOBS, convert_dataset
    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases
    from nnunet_mmssl.planners.plan_and_preprocess import plan_and_preprocess

    labelled, unlabelled = args.phantom_cases
    num_test = max(1, args.predict_cases)
    recipe = {"shape": list(args.phantom_shape), "spacing": list(args.phantom_spacing), "labelled": labelled,
              "unlabelled": unlabelled, "test": num_test, "configurations": sorted(args.configurations),
              "gpu_memory_target": args.gpu_memory_target, **_planner_recipe(args)}
    name = f"Dataset{PHANTOM_ID:03d}_{PHANTOM_NAME}"
    marker = os.path.join(workdir, PHANTOM_MARKER)
    if _reuse_phantom(marker, recipe):
        print(f"reusing the phantom dataset in {workdir}", flush=True)
        return name
    print(f"building the phantom dataset in {workdir}: {labelled} labelled + {unlabelled} unlabelled + {num_test} "
          f"test cases of {tuple(args.phantom_shape)} voxels; planning {' '.join(args.configurations)}"
          f"{_planner_words(args)}", flush=True)
    sources = make_phantom_cases(os.path.join(workdir, "phantom"), num_labeled=labelled + num_test,
                                 num_unlabeled=unlabelled, shape=tuple(args.phantom_shape),
                                 spacing=tuple(args.phantom_spacing), seed=0)
    convert_dataset([os.path.join(sources, "labeled"), os.path.join(sources, "unlabeled")], PHANTOM_MODALITY_GLOBS,
                    PHANTOM_LABEL_GLOB, os.environ["nnUNet_raw"], PHANTOM_ID, PHANTOM_NAME, num_labeled=labelled,
                    num_test=num_test, seed=0, labels={"background": 0, "lesion": 1}, overwrite=True)
    log = os.path.join(workdir, "logs", "plan_and_preprocess.log")
    with open(log, "w") as handle:
        plan_and_preprocess(PHANTOM_ID, list(args.configurations), num_processes=max(1, args.num_processes),
                            gpu_memory_target_in_gb=args.gpu_memory_target,
                            planner=getattr(args, "planner", DEFAULT_PLANNER),
                            progress=lambda message: handle.write(message + "\n"))
    with open(marker, "w") as handle:
        json.dump(recipe, handle)
    return name


def case_file_lists(file_names: Sequence[str], file_ending: str, max_cases: int) -> list[tuple[str, list[str]]]:
    """Group nnU-Net image files (``CASE_XXXX<ending>``) by case: ``[(case, [files in channel order]), ...]`` for the
    first ``max_cases`` cases in sorted order."""
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: dict[str, list[tuple[int, str]]] = {}
    for name in file_names:
        match = pattern.match(os.path.basename(name))
        if match:
            cases.setdefault(match.group(1), []).append((int(match.group(2)), name))
    return [(case, [f for _, f in sorted(cases[case])]) for case in sorted(cases)[:max_cases]]


def cases_by_modality(cases: Sequence[tuple[str, list[str]]],
                      case_modality: dict[str, str] | None) -> list[tuple[str | None, list[tuple[str, list[str]]]]]:
    """Group :func:`case_file_lists` output by the modality recorded per case (an unregistered dataset's
    ``mmssl.case_modality``), modalities in order of first appearance; ``[(None, cases)]`` without a record.

    Raises:
        ValueError: a case without a recorded modality (naming it).
    """
    if not case_modality:
        return [(None, list(cases))]
    groups: dict[str, list] = {}
    for case, files in cases:
        if case not in case_modality:
            raise ValueError(f"case {case} has no modality in dataset.json's mmssl.case_modality: reconvert the "
                             f"dataset with nnUNetv2_mmssl_convert --source-modality")
        groups.setdefault(case_modality[case], []).append((case, files))
    return list(groups.items())
