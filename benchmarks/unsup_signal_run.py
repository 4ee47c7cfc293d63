"""Does the unlabelled data act? Gradient share and validation Dice of every SSL trainer on the real BraTS data.

For each trainer (and the "before" settings kept as variants) one short run of nnU-Net's own ``nnUNetv2_train`` on
fold 0 of the real FLAIR+T1 data beside the project, then nnU-Net's own final validation on that fold's validation
cases (never the test cases). Reported per trainer, from the model folder's checkpoint and ``validation/summary.json``:

* the gradient share ``|grad(w L_unsup)| / |grad(L_sup)|`` logged by the trainer (``unsup_grad_shares``: per epoch,
  the mean over the sampled iterations; here sampled every ``--share-every`` iterations), its median over the epochs
  and its last value;
* the mean unsupervised weight and loss of the last epoch;
* nnU-Net's validation Dice (foreground mean over the fold-0 validation cases) and the last pseudo Dice.

Variants: ``MemCifSSLTrainer_printedConsistency`` (eq. 4 as printed, against the default mean reduction) and
``MeanTeacherTrainer_ramp40ep`` (the settings in force until 2026-12: the sigmoid ramp over a fixed 40 epochs, i.e.
``unsupervised_rampup_fraction = 40 / epochs`` of this run).

    python benchmarks/unsup_signal_run.py --workdir /tmp/mmssl_signal --spacing 2 2 2 --epochs 12 --iterations 25

Conversion, planning and the batch-size plans copy are those of ``benchmarks/real_data_run.py`` (same data, more
labelled cases so that fold 0 has a validation set). Skips with a message (exit 0) when the data folder is absent.
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import real_data_run as rdr  # noqa: E402  (the shared real-data steps, as benchmarks/missing_subsets_run.py uses them)

DEFAULT_TRAINERS = ("MemCifSSLTrainer", "MemCifSSLTrainer_printedConsistency", "MeanTeacherTrainer",
                    "MeanTeacherTrainer_ramp40ep", "MMFMCMLTrainer")
_MODULE = '''"""Short-schedule variants written by benchmarks/unsup_signal_run.py (nnUNet_extTrainer finds them)."""
import torch
from nnunet_mmssl.trainers import *  # noqa: F403


class MeanTeacherTrainer_ramp40ep(MeanTeacherTrainer):  # noqa: F405
    unsupervised_rampup_fraction = 40 / {epochs}


def _budget(cls):
    class Budget(cls):
        gradient_share_every = {share_every}

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = {epochs}
            self.num_iterations_per_epoch = {iterations}
            self.num_val_iterations_per_epoch = {val_iterations}

    Budget.__name__ = Budget.__qualname__ = cls.__name__ + "__signal"
    return Budget


{classes}
'''


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data"))
    parser.add_argument("--workdir", default="mmssl_signal_run")
    parser.add_argument("-c", "--configuration", default="2d", choices=["2d", "3d_fullres"])
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar="MM")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--val-iterations", type=int, default=2)
    parser.add_argument("--share-every", type=int, default=5, help="measure the gradient share every N iterations")
    parser.add_argument("--num-labeled", type=int, default=6, help="labelled training cases (fold 0 validates on "
                        "a fifth of them)")
    parser.add_argument("--num-test", type=int, default=2, help="held out and never used here")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("-tr", "--trainers", nargs="+", default=list(DEFAULT_TRAINERS))
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None)
    return parser


def summarise(checkpoint_logging: dict, validation_summary: dict | None) -> dict:
    """Per-run figures from nnU-Net's checkpoint ``logging`` entry and its ``validation/summary.json``."""
    shares = np.asarray(checkpoint_logging.get("unsup_grad_shares", []), dtype=float)
    finite = shares[np.isfinite(shares)]
    return {
        "grad_share_per_epoch": [None if not np.isfinite(s) else float(s) for s in shares],
        "grad_share_median": float(np.median(finite)) if finite.size else None,
        "grad_share_last": float(finite[-1]) if finite.size else None,
        "unsup_weight_last": float(checkpoint_logging["unsup_weights"][-1]),
        "unsup_loss_last": float(checkpoint_logging["train_unsup_losses"][-1]),
        "sup_loss_last": float(checkpoint_logging["train_sup_losses"][-1]),
        "pseudo_dice_last": float(checkpoint_logging["mean_fg_dice"][-1]),
        "val_dice": None if validation_summary is None else
        float(validation_summary["foreground_mean"]["Dice"]),
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = os.path.abspath(args.data)
    sources = [os.path.join(data, "brats2018_flair_t1"), os.path.join(data, "brats_4seq_unlabeled")]
    if not all(os.path.isdir(s) for s in sources):
        print(f"real data not found under {data}: skipped")
        return 0
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    root = os.path.abspath(args.workdir)
    env, logs, ext_folder = rdr.workdir_environment(root)
    _, preprocessed, plans_name, configuration = rdr.prepare_dataset(args, sources, env, logs, [])
    dataset = f"Dataset{rdr.DATASET_ID}_{rdr.DATASET_NAME}"

    os.makedirs(ext_folder, exist_ok=True)
    with open(os.path.join(ext_folder, "mmssl_signal_trainers.py"), "w") as f:
        f.write(_MODULE.format(epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations,
                               share_every=args.share_every,
                               classes="\n".join(f"{t}__signal = _budget({t})" for t in args.trainers)))

    results = {}
    for trainer in args.trainers:
        name = trainer + "__signal"
        model = os.path.join(env["nnUNet_results"], dataset, f"{name}__{plans_name}__{args.configuration}", "fold_0")
        if not os.path.isfile(os.path.join(model, "validation", "summary.json")):
            cmd = ["nnUNetv2_train", str(rdr.DATASET_ID), args.configuration, "0", "-tr", name, "-p", plans_name,
                   "-device", args.device]
            seconds = rdr._run(cmd, env, os.path.join(logs, f"train_{trainer}.log"))
            print(f"train {trainer}: {seconds:.0f} s", flush=True)
        checkpoint = torch.load(os.path.join(model, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
        results[trainer] = summarise(checkpoint["logging"], load_json(os.path.join(model, "validation",
                                                                                   "summary.json")))
        r = results[trainer]
        print(f"  {trainer}: share median {_fmt(r['grad_share_median'], '.3g')}, val Dice "
              f"{_fmt(r['val_dice'], '.3f')}", flush=True)

    splits = load_json(os.path.join(preprocessed, "splits_final.json"))  # nnU-Net's, written by the first training
    header = (f"{'trainer':<34} {'share med':>10} {'share last':>10} {'weight':>8} {'unsup loss':>11} "
              f"{'sup loss':>9} {'pseudo Dice':>11} {'val Dice':>9}")
    lines = [header, "-" * len(header)]
    for trainer, r in results.items():
        lines.append(f"{trainer:<34} {_fmt(r['grad_share_median'], '10.3g')} {_fmt(r['grad_share_last'], '10.3g')} "
                     f"{r['unsup_weight_last']:>8.3g} {r['unsup_loss_last']:>11.4g} {r['sup_loss_last']:>9.4f} "
                     f"{r['pseudo_dice_last']:>11.3f} {_fmt(r['val_dice'], '9.3f')}")
    table = "\n".join(lines)
    print(f"\nfold 0 ({len(splits[0]['val'])} validation cases), {args.configuration}, patch "
          f"{configuration['patch_size']}, spacing {configuration['spacing']}, {args.epochs} epochs x "
          f"{args.iterations} iterations, batch {args.batch_size} (+{args.batch_size} unlabelled)\n{table}")
    save_json({"args": vars(args), "plans": plans_name, "patch_size": configuration["patch_size"],
               "spacing": configuration["spacing"], "results": results, "table": table},
              args.json or os.path.join(root, "results.json"), sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
