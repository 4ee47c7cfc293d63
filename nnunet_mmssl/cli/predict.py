"""``nnUNetv2_mmssl_predict``: nnU-Net prediction with a choice of output heads.

``nnUNetv2_predict`` works unchanged on our model folders and predicts the mean of all heads' logits. This command
adds ``--head``: predict with the heads of the given modality groups only (by channel name, e.g. ``FLAIR``, or head
index). With MemCif's CIF the selected head still reads the fused bottleneck, so all channels must be given; only
variants without fusion (``MemCifSSLTrainer_noCIF`` / ``_plain``) make a head depend on its own modalities alone.

Models trained on an unregistered dataset (one image per case, a modality per case: DBDC, the pooled U-Net) need
``--modality NAME``: the images are normalised with that modality's scheme and intensity fingerprint, and the
network's modality banks select that modality. Without it (or with an unknown name) the command stops and lists the
trained modalities -- it never guesses; one folder of inputs is one modality.

``--missing NAME ...`` predicts without those channels (names from ``dataset.json`` or indices): the input folder may
lack their files. Every network gets them as 0 after normalisation (the z-score mean); SMML also masks those
modalities' encoders. See :mod:`nnunet_mmssl.inference.missing`.
"""

import argparse
import os
import shutil
import tempfile

from nnunet_mmssl.cli._common import (
    add_model_arguments,
    add_verbose,
    check_image_dimensions,
    check_output_folder,
    check_step_size,
    run_cli,
)

PROG = "nnUNetv2_mmssl_predict"


def resolve_heads(head_specs: list[str], modality_groups: list[list[int]], channel_names: dict) -> tuple[int, ...]:
    """Map head specs (channel names or head indices) to head indices.

    Raises:
        ValueError: naming the unknown spec and the valid choices.
    """
    heads = []
    names = {str(v): int(k) for k, v in channel_names.items()}
    for spec in head_specs:
        if spec.isdigit() and int(spec) < len(modality_groups):
            heads.append(int(spec))
            continue
        if spec in names:
            channel = names[spec]
            heads.append(next(i for i, g in enumerate(modality_groups) if channel in g))
            continue
        choices = [f"{i} ({', '.join(channel_names[str(c)] for c in g)})" for i, g in enumerate(modality_groups)]
        raise ValueError(f"Unknown head {spec!r}. Choose a head index or a channel name: {'; '.join(choices)}.")
    return tuple(sorted(set(heads)))


def select_modality(predictor, modality: str | None, model_folder: str) -> str | None:
    """Point an initialised nnU-Net predictor at one modality of an unregistered model; return the modality.

    The predictor's plans get that modality's normalisation scheme and intensity fingerprint (what its preprocessing
    applies), and a network with modality banks selects it.

    Raises:
        ValueError: ``--modality`` missing for a model of several modalities, unknown, or given for a model that was
            not trained on an unregistered dataset (each message lists the choices).
    """
    from nnunet_mmssl.building_blocks.norm_bank import modality_not_set_message
    from nnunet_mmssl.dataset_conversion.modality_layout import is_unregistered
    from nnunet_mmssl.planners.modality_normalization import plans_for_modality

    block = predictor.plans_manager.plans.get("mmssl") or {}
    if not is_unregistered(block):
        if modality is not None:
            raise ValueError(f"--modality {modality}: {model_folder} was not trained on an unregistered dataset "
                             f"(one modality per case); its inputs carry every channel. Drop --modality.")
        return None
    modalities = list(block["modalities"])
    if modality is None:
        if len(modalities) > 1:
            raise ValueError(modality_not_set_message(modalities))
        modality = modalities[0]
    if modality not in modalities:
        raise ValueError(f"Unknown --modality {modality!r}: {model_folder} was trained on {modalities}.")
    plans = plans_for_modality(predictor.plans_manager.plans, modality)
    predictor.plans_manager.plans["foreground_intensity_properties_per_channel"] = \
        plans["foreground_intensity_properties_per_channel"]
    predictor.configuration_manager.configuration["normalization_schemes"] = [block["intensity_schemes"][modality]]
    network = getattr(predictor.network, "_orig_mod", predictor.network)
    if hasattr(network, "set_inference_modality"):
        network.set_inference_modality(modality)
    print(f"Modality {modality}: {block['intensity_schemes'][modality]} normalisation"
          + (", the network's modality banks" if hasattr(network, "set_inference_modality") else ""))
    return modality


def check_modalities_file(modalities_from: str, case_modality: dict[str, str], dataset_json: dict,
                          model_folder: str) -> None:
    """Refuse a ``--modalities-from`` file that does not belong to the model's dataset.

    The model folder's ``dataset.json`` is the dataset's own (nnU-Net copies it there) and records the dataset's
    ``name`` and, for an unregistered dataset, every case's modality (``mmssl.case_modality``); the file must record
    the same name (if it records one) and exactly the same case modalities. Another dataset's JSON with the same case
    ids would otherwise predict its cases as the wrong modality.

    Raises:
        ValueError: naming the file, the first difference and the fix.
    """
    import json

    fix = (f"Pass the dataset.json or mmssl_split.json of the dataset {model_folder} was trained on (its own "
           f"{os.path.join(model_folder, 'dataset.json')} records the same).")
    with open(modalities_from, encoding="utf-8") as stream:
        content = json.load(stream)
    name, model_name = content.get("name"), dataset_json.get("name")
    if name is not None and model_name is not None and name != model_name:
        raise ValueError(f"--modalities-from {modalities_from} belongs to dataset {name!r}, but {model_folder} was "
                         f"trained on {model_name!r}. {fix}")
    block = dataset_json.get("mmssl") if isinstance(dataset_json.get("mmssl"), dict) else {}
    recorded = {str(k): str(v) for k, v in (block.get("case_modality") or {}).items()}
    if not recorded:
        return
    for case in sorted(set(recorded) | set(case_modality)):
        mine, theirs = case_modality.get(case), recorded.get(case)
        if mine != theirs:
            said = f"records {case} as {mine}" if mine is not None else f"does not record {case}"
            model_said = f"as {theirs}" if theirs is not None else "not at all"
            raise ValueError(f"--modalities-from {modalities_from} {said}, but the model's dataset.json records it "
                             f"{model_said}: the file belongs to another dataset. {fix}")


def case_modalities(cases: dict[str, list[str]], modalities_from: str, dataset_json: dict,
                    model_folder: str) -> tuple[list[str], dict[str, str]]:
    """``(modalities, case id -> modality)`` of ``--modalities-from``, checked: it belongs to the model's dataset
    (:func:`check_modalities_file`), its modality names are plain names, and it records every input case.

    Raises:
        ValueError: naming the file and the problem.
    """
    from nnunet_mmssl.evaluation.report import read_case_modality
    from nnunet_mmssl.names import check_safe_name

    modalities, case_modality = read_case_modality(modalities_from)
    for modality in modalities:
        check_safe_name(modality, "modality name", f"--modalities-from {modalities_from}")
    check_modalities_file(modalities_from, case_modality, dataset_json, model_folder)
    unknown = sorted(c for c in cases if c not in case_modality)
    if unknown:
        raise ValueError(f"{len(unknown)} input case(s) have no modality in {modalities_from}: {unknown[:5]}. Pass "
                         f"--modality for a single-modality folder, or the dataset's own dataset.json.")
    return modalities, case_modality


def _inputs_by_modality(cases: dict[str, list[str]], modalities: list[str],
                        case_modality: dict[str, str]) -> list[tuple[str, str]]:
    """One temporary input folder (links to the case files) per modality (:func:`case_modalities`)."""
    result = []
    try:
        for modality in modalities:
            mine = [c for c in cases if case_modality[c] == modality]
            if not mine:
                continue
            folder = tempfile.mkdtemp(prefix=f"mmssl-predict-{modality}-")
            result.append((folder, modality))
            for case in mine:
                for file in cases[case]:
                    os.symlink(os.path.abspath(file), os.path.join(folder, os.path.basename(file)))
            print(f"{len(mine)} {modality} case(s)")
    except BaseException:
        for folder, _ in result:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return result


def head_folder_names(modality_groups: list[list[int]], channel_names: dict, model_folder: str) -> list[str]:
    """``head_<k>_<channels>`` per head (``--each-head``), the channel names checked to be plain file names.

    Raises:
        ValueError: a channel name of the model's ``dataset.json`` that is not a plain name (naming it).
    """
    from nnunet_mmssl.names import check_safe_name

    source = os.path.join(model_folder, "dataset.json")
    return [f"head_{k}_" + "-".join(check_safe_name(channel_names[str(c)], "channel name", source) for c in group)
            for k, group in enumerate(modality_groups)]


def inside(folder: str, sub: str) -> str:
    """``folder/sub``, refused unless it resolves inside ``folder`` (a name from a model folder never escapes -o).

    Raises:
        ValueError: naming the path.
    """
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, sub))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"output sub-folder {sub!r} resolves to {path}, outside the output folder {folder}; refused. "
                         f"Check the model's channel names.")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, help="input folder (nnU-Net naming CASE_XXXX.ext)")
    parser.add_argument("-o", required=True, help="output folder")
    add_model_arguments(parser)
    parser.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds (default 0 1 2 3 4)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--head", nargs="+", default=None,
                       help="predict with these heads only: channel names (e.g. FLAIR) or head indices")
    heads.add_argument("--each-head", action="store_true",
                       help="write the fused prediction to OUT/fused and each head's own to OUT/head_<k>_<channels>")
    modality = parser.add_mutually_exclusive_group()
    modality.add_argument("--modality", default=None, metavar="NAME",
                          help="modality of the input images, for models trained on an unregistered dataset (DBDC, "
                               "the pooled U-Net): normalisation and the network's modality banks follow it")
    modality.add_argument("--modalities-from", default=None, metavar="JSON",
                          help="for an input folder mixing modalities: the dataset.json or mmssl_split.json that "
                               "records each case's modality (e.g. imagesTs of a converted unregistered dataset); "
                               "each case is predicted as its modality")
    parser.add_argument("--missing", nargs="+", default=None, metavar="CHANNEL",
                        help="predict without these channels (names from dataset.json channel_names, or indices); "
                             "the input folder may lack their files. Absent channels are 0 after normalisation "
                             "(the z-score mean); SMML also masks their encoders")
    parser.add_argument("-step_size", type=float, default=0.5)
    parser.add_argument("--disable_tta", action="store_true")
    parser.add_argument("--save_probabilities", action="store_true")
    parser.add_argument("-npp", type=int, default=2, help="preprocessing processes")
    parser.add_argument("-nps", type=int, default=2, help="export processes")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    return add_verbose(parser)


def _model_folder(args: argparse.Namespace) -> str:
    """The model folder of ``-m`` or ``-d/-c/-tr/-p``, checked to hold ``plans.json`` and the requested folds.

    Raises:
        ValueError, FileNotFoundError: naming the folder or fold and the fix.
    """
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if args.m is None and (args.d is None or args.c is None):
        raise ValueError("give a model folder with -m, or -d and -c (and -tr/-p)")
    model_folder = args.m or get_output_folder(args.d, args.tr, args.p, args.c)
    if not os.path.isfile(os.path.join(model_folder, "plans.json")):
        parent = os.path.dirname(os.path.abspath(model_folder))
        others = sorted(d for d in os.listdir(parent) if os.path.isfile(os.path.join(parent, d, "plans.json"))) \
            if os.path.isdir(parent) else []
        hint = (f" Trained model folders beside it: {others}; pick the trainer with -tr (and -p/-c) or pass -m."
                if others else " Train it first, or check -d/-c/-tr/-p (or -m).")
        raise FileNotFoundError(f"{model_folder} is not a trained model folder (no plans.json).{hint}")
    available = sorted(d[len("fold_"):] for d in os.listdir(model_folder) if d.startswith("fold_")
                       and os.path.isfile(os.path.join(model_folder, d, args.chk)))
    missing = [f for f in args.f if f not in available]
    if missing:
        raise FileNotFoundError(f"{model_folder}: no {args.chk} for fold(s) {missing}; folds with {args.chk}: "
                                f"{available or 'none'}. Pass -f with trained folds (e.g. -f {' '.join(available)})"
                                f" or another checkpoint with -chk (e.g. checkpoint_best.pth).")
    return model_folder


def _move_into(tmp: str, final: str) -> None:
    """Move the finished predictions from ``tmp`` into ``final`` (a rename if ``final`` does not exist yet)."""
    if not os.path.exists(final):
        os.replace(tmp, final)
        return
    for root, _, names in os.walk(tmp):
        target = os.path.join(final, os.path.relpath(root, tmp))
        os.makedirs(target, exist_ok=True)
        for name in names:
            os.replace(os.path.join(root, name), os.path.join(target, name))
    shutil.rmtree(tmp, ignore_errors=True)


def _verify_predictions(tmp: str, final: str, file_ending: str) -> None:
    """Read back every image nnU-Net's export wrote into ``tmp`` (SimpleITK's writer leaves a truncated file on a full
    disk or at the file-size limit without an error).

    Raises:
        WriteError: naming the file by its place in ``final``, the cause and the fix.
    """
    from nnunet_mmssl.io_checks import verify_image_file

    for root, _, names in os.walk(tmp):
        for name in sorted(names):
            if name.endswith(file_ending):
                path = os.path.join(root, name)
                verify_image_file(path, shown=os.path.join(final, os.path.relpath(path, tmp)))


def _run(args: argparse.Namespace) -> int:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_mmssl.dataloading.image_checks import check_input_folder
    from nnunet_mmssl.inference.missing import MissingModalityPredictor, resolve_missing_channels
    from nnunet_mmssl.io_checks import short_writes_reported

    check_step_size(args.step_size)
    check_output_folder(args.o, [args.i])
    model_folder = _model_folder(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("-device cuda, but no CUDA GPU is available here; pass -device cpu")
    dataset_json = load_json(os.path.join(model_folder, "dataset.json"))
    if args.each_head:  # the channel names become folder names: checked before any work
        head_folder_names([[int(c)] for c in dataset_json["channel_names"]], dataset_json["channel_names"],
                          model_folder)
    missing = resolve_missing_channels(args.missing or [], dataset_json["channel_names"])
    cases = check_input_folder(args.i, dataset_json, num_processes=max(1, args.npp), absent_channels=missing)
    check_image_dimensions([f for files in cases.values() for f in files],
                           f"Split a 4D series into one file per channel (CASE_0000{dataset_json['file_ending']}, "
                           f"CASE_0001..., the channels {dataset_json['channel_names']}).")
    if missing:
        names = [dataset_json["channel_names"][str(c)] for c in missing]
        print(f"Checked {len(cases)} input cases in {args.i} (channels {names} declared missing, the others "
              f"present; images complete and finite)")
    else:
        print(f"Checked {len(cases)} input cases in {args.i} (all channels present, images complete and finite)")
    recorded = case_modalities(cases, args.modalities_from, dataset_json, model_folder) \
        if args.modalities_from else None
    folds = [f if f == "all" else int(f) for f in args.f]
    predictor = MissingModalityPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                         use_mirroring=not args.disable_tta,
                                         perform_everything_on_device=args.device == "cuda",
                                         device=torch.device(args.device))
    predictor.initialize_from_trained_model_folder(model_folder, folds, args.chk)
    predictor.set_missing_channels(missing)
    if missing:
        network = getattr(predictor.network, "_orig_mod", predictor.network)
        masked = hasattr(network, "set_missing_modalities")
        print(f"Missing channels {names}: set to 0 after normalisation"
              + (f"; {type(network).__name__} masks their encoders" if masked else ""))
    inputs = [(args.i, args.modality)]
    if args.modalities_from:
        inputs = _inputs_by_modality(cases, *recorded)
    else:
        select_modality(predictor, args.modality, model_folder)
    runs = [(None, "")]
    if args.head or args.each_head:
        network = predictor.network._orig_mod if hasattr(predictor.network, "_orig_mod") else predictor.network
        if not hasattr(network, "inference_heads"):
            raise ValueError(f"{model_folder} holds a single-head network ({type(network).__name__}); --head/"
                             f"--each-head need an nnunet_mmssl multi-branch model. Drop --head/--each-head (or use "
                             f"nnUNetv2_predict) for this model.")
        channel_names = dataset_json["channel_names"]
        if args.head:
            runs = [(resolve_heads(args.head, network.modality_groups, channel_names), "")]
        else:
            runs = [(None, "fused")] + [
                ((k,), name) for k, name in enumerate(head_folder_names(network.modality_groups, channel_names,
                                                                        model_folder))]
    final = os.path.abspath(args.o)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.partial-", dir=os.path.dirname(final))
    try:
        for heads, sub in runs:
            output_folder = inside(tmp, sub) if sub else tmp
            shown = os.path.join(final, sub) if sub else final
            if heads is not None:
                network.inference_heads = heads
                print(f"Predicting with head(s) {heads} of modality groups {network.modality_groups} -> {shown}")
            elif args.each_head:
                network.inference_heads = None
                print(f"Predicting with the mean of all heads -> {shown}")
            for input_folder, modality in inputs:
                if args.modalities_from:
                    select_modality(predictor, modality, model_folder)
                with short_writes_reported(shown, output_folder):
                    predictor.predict_from_files(input_folder, output_folder,
                                                 save_probabilities=args.save_probabilities, overwrite=True,
                                                 num_processes_preprocessing=args.npp,
                                                 num_processes_segmentation_export=args.nps)
        _verify_predictions(tmp, final, dataset_json["file_ending"])
        _move_into(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for input_folder, _ in inputs:
            if input_folder != args.i:
                shutil.rmtree(input_folder, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a user error (one line on stderr), 1 on an unexpected error."""
    return run_cli(PROG, build_parser(), _run, argv)
