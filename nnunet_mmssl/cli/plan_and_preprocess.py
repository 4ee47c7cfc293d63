"""``nnUNetv2_mmssl_plan_and_preprocess``: nnU-Net planning on labelled cases + unlabelled preprocessing."""

import argparse

from nnunet_mmssl.cli._common import add_verbose, run_cli

PROG = "nnUNetv2_mmssl_plan_and_preprocess"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run nnU-Net's fingerprint extraction, planning and preprocessing on the labelled cases "
                    "(imagesTr/labelsTr), write the modality groups of our networks into the plans, and preprocess "
                    "imagesUnlabeled/ with the same plans into <data_identifier>_unlabeled/. For an unregistered "
                    "dataset (dataset.json mmssl.layout 'unregistered') every case is normalised by its modality "
                    "(CT scheme with the CT cases' intensity fingerprint, z-score otherwise) and the folds are "
                    "stratified by modality.")
    parser.add_argument("-d", nargs="+", type=int, required=True, help="dataset id(s)")
    parser.add_argument("-c", nargs="+", default=["2d", "3d_fullres"], help="configurations (default: 2d 3d_fullres)")
    parser.add_argument("-np", type=int, default=2, help="processes for each step (default: 2)")
    parser.add_argument("-pl", default="ExperimentPlanner",
                        help="nnU-Net experiment planner: ExperimentPlanner (PlainConvUNet, plans nnUNetPlans, ours "
                             "nnUNetMMSSLPlans) or a residual-encoder preset nnUNetPlannerResEncM/L/XL "
                             "(ResidualEncoderUNet, plans nnUNetResEncUNetMPlans etc., ours "
                             "nnUNetMMSSLResEncUNetMPlans etc.); default ExperimentPlanner")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help="as in nnUNetv2_plan_and_preprocess (default: the planner's; both plans files use it)")
    parser.add_argument("-overwrite_target_spacing", type=float, nargs=3, default=None, metavar="MM",
                        help="as in nnUNetv2_plan_and_preprocess: target spacing of 3d_fullres (and 2d) in the plans' "
                             "axis order, e.g. 2 2 2")
    parser.add_argument("-overwrite_plans_name", default=None,
                        help="nnU-Net's plans identifier (default the planner's, e.g. nnUNetPlans); ours is derived "
                             "from it: nnUNet<rest> -> nnUNetMMSSL<rest>, any other NAME -> NAME_MMSSL")
    parser.add_argument("--modality-groups", nargs="+", default=None, metavar="GROUP",
                        help="one argument per branch: channel names or indices separated by commas, e.g. "
                             "'FLAIR,T2' 'T1,T1ce' (default: first half / second half of the channels)")
    parser.add_argument("--verify_dataset_integrity", action="store_true", help="as in nnU-Net")
    parser.add_argument("--no_fingerprint", action="store_true", help="reuse an existing fingerprint")
    parser.add_argument("--no_pp", action="store_true", help="plan only, do not preprocess")
    parser.add_argument("--no-mmssl-plans", action="store_true",
                        help="do not write nnUNetMMSSLPlans (or nnUNetMMSSLResEncUNet*Plans: nnU-Net's planning "
                             "budgeted for our trainers' memory)")
    parser.add_argument("--budget-trainers", nargs="+", default=None, metavar="TRAINER",
                        help="trainers whose whole step nnUNetMMSSLPlans must fit in the GPU memory target (default: "
                             "MeanTeacherTrainer MemCifSSLTrainer MMFMCMLTrainer, or DBDCTrainer for an unregistered "
                             "dataset; the largest decides)")
    parser.add_argument("--no-unlabeled", action="store_true",
                        help="do not preprocess imagesUnlabeled/ (supervised-only trainers)")
    return add_verbose(parser)


def _run(args: argparse.Namespace) -> int:
    from nnunet_mmssl.planners.plan_and_preprocess import plan_and_preprocess

    if args.np < 1:
        raise ValueError(f"-np {args.np}: the number of processes must be >= 1")
    for dataset_id in args.d:
        plans_file = plan_and_preprocess(
            dataset_id, args.c, num_processes=args.np, planner=args.pl,
            gpu_memory_target_in_gb=args.gpu_memory_target, plans_name=args.overwrite_plans_name,
            modality_groups=args.modality_groups, verify_dataset_integrity=args.verify_dataset_integrity,
            fingerprint=not args.no_fingerprint, preprocess=not args.no_pp, unlabeled=not args.no_unlabeled,
            overwrite_target_spacing=args.overwrite_target_spacing,
            mmssl_plans=not args.no_mmssl_plans,
            budget_trainers=args.budget_trainers or None)
        print(f"Done: {plans_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a user error (one line on stderr), 1 on an unexpected error."""
    return run_cli(PROG, build_parser(), _run, argv)
