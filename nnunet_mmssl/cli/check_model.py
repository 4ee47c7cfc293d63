"""``nnUNetv2_mmssl_check_model``: check a downloaded or shared model folder without running anything from it.

Example::

    nnUNetv2_mmssl_check_model -m $nnUNet_results/Dataset502_BraTS/MemCifSSLTrainer__nnUNetPlans__3d_fullres

Checks, without importing or unpickling anything the folder names (:func:`nnunet_mmssl.safe_load.check_model_folder`):
every ``fold_X/*.pth`` opens with ``torch.load(weights_only=True)`` and nnU-Net's allowlist (tensors, plain containers,
numpy scalars); ``plans.json`` names only ``dynamic_network_architectures`` / ``nnunet_mmssl`` network classes and
``torch.nn`` layers; ``dataset.json``'s channel and modality names are plain file names. Prints ``OK <file>`` per
file, or one error line naming the file and what was refused (exit 2). Our commands and trainers run the same checks
themselves; stock ``nnUNetv2_predict`` / ``nnUNetv2_train`` do not (they read checkpoints with
``weights_only=False``), so check a folder from elsewhere with this command before giving it to them.
"""

import argparse
import os

from nnunet_mmssl.cli._common import add_model_arguments, add_verbose, run_cli

PROG = "nnUNetv2_mmssl_check_model"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("-f", nargs="+", default=None, help="folds to check (default: every fold_X folder)")
    parser.add_argument("-chk", default=None, help="checkpoint file name to check (default: every .pth of the folds)")
    return add_verbose(parser)


def _run(args: argparse.Namespace) -> int:
    from nnunet_mmssl.safe_load import check_model_folder

    if args.m is None and (args.d is None or args.c is None):
        raise ValueError("give a model folder with -m, or -d and -c (and -tr/-p)")
    if args.m is None:
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        folder = get_output_folder(args.d, args.tr, args.p, args.c)
    else:
        folder = args.m
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder. Give the model folder TRAINER__PLANS__CONFIGURATION "
                                f"with -m.")
    checked = check_model_folder(folder, args.f, args.chk, progress=print)
    checkpoints = len(checked) - 2
    if checkpoints == 0:
        raise FileNotFoundError(f"{folder} holds no checkpoint (no fold_X/*.pth); nothing to check. Pass the folder "
                                f"that nnUNetv2_train wrote.")
    print(f"{PROG}: {folder}: {checkpoints} checkpoint(s), plans.json and dataset.json passed; no code from the "
          f"folder was run")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 if the folder passed, 2 on a refused file (one line on stderr)."""
    return run_cli(PROG, build_parser(), _run, argv)
