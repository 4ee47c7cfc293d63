"""``nnUNetv2_mmssl_pseudolabel``: predicted labels, uncertainty maps and an annotation ranking for unlabelled cases.

For a trained model folder (any trainer of ours or nnU-Net's own) and a folder of unlabelled cases (default: the
dataset's ``imagesUnlabeled`` in ``nnUNet_raw``), nnU-Net's ``nnUNetPredictor`` predicts every case and exports its
probabilities on the case's original grid; this command writes::

    OUT/labels/CASE.nii.gz                    nnU-Net's segmentation files (review, correct, move to labelsTr)
    OUT/uncertainty/CASE_entropy.nii.gz       per-voxel entropy (float32, nats, same grid as the images)
    OUT/uncertainty/CASE_disagreement.nii.gz  multi-head models of ours: disagreement of the heads
    OUT/ranking.csv                           cases ordered by uncertainty: annotate rank 1 first
    OUT/README.txt, OUT/pseudolabel.json      the layout, the definitions, how to move a case, the settings

Definitions are in :mod:`nnunet_mmssl.semisup.uncertainty`. The entropy is that of the probabilities nnU-Net exports
(the labels are their argmax): nnU-Net averages the logits of folds and mirrorings, our multi-branch networks the
logits of their heads. Region (sigmoid) models get the mean binary entropy over regions. The disagreement needs one
extra prediction per head (the command runs nnU-Net's prediction K + 1 times; ``--no-disagreement`` skips it).

The pipeline is :func:`nnunet_mmssl.semisup.pseudolabel.pseudolabel`; this module is its command line.
"""

from __future__ import annotations

import argparse
import os

from nnunet_mmssl.cli._common import add_model_arguments, add_verbose, run_cli
from nnunet_mmssl.semisup.pseudolabel import (  # noqa: F401  (importable from here as before)
    DISAGREEMENT_SUFFIX,
    ENTROPY_SUFFIX,
    PROG,
    UserError,
    list_cases,
    pseudolabel,
    resolve_folds,
    write_float_map,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("-i", default=None,
                        help="folder of unlabelled cases, nnU-Net naming CASE_XXXX.ext (default: "
                             "$nnUNet_raw/<the model's dataset>/imagesUnlabeled)")
    add_model_arguments(parser)
    parser.add_argument("-f", nargs="+", default=None,
                        help="folds (default: every fold_X of the model folder with the checkpoint)")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name")
    parser.add_argument("--margin-mm", type=float, default=3.0,
                        help="ranking region: predicted foreground plus this margin in mm (default 3)")
    parser.add_argument("--uncertain-fraction", type=float, default=0.5,
                        help="ranking region also holds voxels whose entropy is at least this fraction of the "
                             "maximum (log C, or log 2 for regions); default 0.5; > 1 adds none")
    parser.add_argument("--rank-by", choices=["entropy", "disagreement"], default="entropy",
                        help="ranking score: mean entropy (default) or, for multi-head models, mean head "
                             "disagreement over the ranking region")
    parser.add_argument("--no-disagreement", action="store_true",
                        help="multi-head models: skip the per-head predictions and the disagreement maps")
    parser.add_argument("--keep-probabilities", action="store_true",
                        help="keep nnU-Net's CASE.npz/.pkl probabilities in OUT/probabilities")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--snapshots", action="store_true",
                        help="also write OUT/snapshots: a PNG montage per ranked case (slices through the predicted "
                             "foreground and the most uncertain region: image, label contours, entropy) and "
                             "index.html listing the cases in ranking order")
    parser.add_argument("-step_size", type=float, default=0.5)
    parser.add_argument("--disable_tta", action="store_true")
    parser.add_argument("-npp", type=int, default=2,
                        help="preprocessing processes (0: predict in this process, no worker processes)")
    parser.add_argument("-nps", type=int, default=2, help="export processes")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    return add_verbose(parser)


def _resolve_model_folder(args) -> str:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if args.m is None and (args.d is None or args.c is None):
        raise UserError("give a model folder with -m, or -d and -c (and -tr/-p)")
    try:
        model_folder = args.m or get_output_folder(args.d, args.tr, args.p, args.c)
    except RuntimeError as error:
        raise UserError(f"dataset {args.d!r}: {error}; give the model folder with -m") from None
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(model_folder, name)):
            raise UserError(f"{model_folder} is not a trained model folder (no {name}); give the folder "
                            f"TRAINER__PLANS__CONFIGURATION that holds fold_X/ with -m")
    return model_folder


def main(argv: list[str] | None = None) -> int:
    """Run the command line; 0 on success, 2 on user errors (one line on stderr; ``--verbose``: traceback)."""

    def body(args: argparse.Namespace) -> int:
        model_folder = _resolve_model_folder(args)
        rows = pseudolabel(model_folder, args.i, args.o, folds=args.f, checkpoint=args.chk, device=args.device,
                           margin_mm=args.margin_mm, uncertain_fraction=args.uncertain_fraction, rank_by=args.rank_by,
                           disagreement=not args.no_disagreement, keep_probabilities=args.keep_probabilities,
                           overwrite=args.overwrite, step_size=args.step_size, use_mirroring=not args.disable_tta,
                           num_processes_preprocessing=args.npp, num_processes_export=args.nps)
        if args.snapshots:
            from nnunet_mmssl.semisup.snapshots import INDEX, SNAPSHOTS_FOLDER, write_snapshots

            write_snapshots(os.path.abspath(args.o), args.i)
            print(f"{PROG}: snapshots: {os.path.join(os.path.abspath(args.o), SNAPSHOTS_FOLDER, INDEX)}")
        print(f"{PROG}: wrote {len(rows)} case(s) to {os.path.abspath(args.o)}; annotate first: "
              f"{', '.join(r['case'] for r in rows[:5])} (see ranking.csv and README.txt)")
        return 0

    return run_cli(PROG, build_parser(), body, argv)
