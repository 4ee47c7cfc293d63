"""Extra per-epoch log keys for our trainers, drawn in nnU-Net's progress.png.

nnU-Net's ``LocalLogger`` only accepts the keys it declares and plots a fixed figure. :func:`register_log_keys`
replaces the trainer's local logger once, before anything is logged, with :class:`MMSSLLocalLogger`, which declares
the extra keys, stores them in the checkpoint's ``logging`` entry like nnU-Net's own, and adds two panels under
nnU-Net's three: the loss terms with the unsupervised weight, and the gradient share of the unsupervised term
(log scale). nnU-Net's first panel compares ``train_losses`` with ``val_losses``: our trainers log as
``train_losses`` the same loss of the same (fused) output that nnU-Net validates, so the two curves are comparable.
"""

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # sets matplotlib's 'agg' backend, as in nnU-Net


class MMSSLLocalLogger(LocalLogger):
    """nnU-Net's local logger with extra list-valued keys and a fourth progress panel.

    Args:
        extra_keys: the new keys, one value per epoch each.
        verbose: as in nnU-Net.
    """

    def __init__(self, extra_keys: Sequence[str], verbose: bool = False):
        super().__init__(verbose)
        self.extra_keys = tuple(extra_keys)
        for key in self.extra_keys:
            self.my_fantastic_logging.setdefault(key, [])

    def load_checkpoint(self, checkpoint: dict):
        """nnU-Net's loading; keys that an older checkpoint lacks are filled with NaN for its epochs."""
        super().load_checkpoint(checkpoint)
        epochs = len(self.my_fantastic_logging.get("train_losses", []))
        for key in self.extra_keys:
            values = self.my_fantastic_logging.setdefault(key, [])
            values.extend([float("nan")] * (epochs - len(values)))

    def plot_progress_png(self, output_folder: str) -> None:
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        modality_keys = [k for k in PER_MODALITY_KEYS if k in self.extra_keys]
        timing_keys = [k for k in TIMING_KEYS if k in self.extra_keys]
        fig, axes = plt.subplots(6 if modality_keys else 5, 1, figsize=(14, 36 if modality_keys else 30))
        ax = axes[0]
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", label="loss_tr (labelled, output as validated)")
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", label="loss_val")
        twin = ax.twinx()
        twin.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice")
        twin.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", label="pseudo dice (mov. avg.)")
        ax.set_ylabel("loss")
        twin.set_ylabel("pseudo dice")
        ax.legend(loc="upper left")
        twin.legend(loc="upper right")
        durations = [e - s for s, e in zip(log["epoch_start_timestamps"][:epoch + 1],
                                           log["epoch_end_timestamps"][:epoch + 1])]
        axes[1].plot(x, durations, color="b", label="epoch duration")
        for key in timing_keys:
            axes[1].plot(x, log[key][:epoch + 1], color="m", ls="--", label=key)
        axes[1].set_ylim(bottom=0)
        axes[1].set_ylabel("time [s]")
        axes[1].legend(loc="upper left")
        axes[2].plot(x, log["lrs"][:epoch + 1], color="b", label="learning rate")
        axes[2].set_ylabel("learning rate")
        axes[2].legend(loc="upper left")
        ax = axes[3]
        other = [k for k in self.extra_keys if k not in modality_keys and k not in timing_keys]
        weight_keys = [k for k in other if "weight" in k]
        share_keys = [k for k in other if "share" in k]
        loss_keys = [k for k in other if k not in weight_keys and k not in share_keys]
        for key in loss_keys:
            values = np.asarray(log[key][:epoch + 1], dtype=float)
            if key == "train_unsup_losses" and "unsup_weights" in log:
                # the weighted term is what enters the objective; the raw loss can be orders of magnitude larger
                values = values * np.asarray(log["unsup_weights"][:epoch + 1], dtype=float)
                key = "unsup_weights x train_unsup_losses"
            ax.plot(x, values, label=key)
        ax.set_ylabel("loss (terms of the objective)")
        ax.legend(loc="upper left")
        if weight_keys:
            twin = ax.twinx()
            for key in weight_keys:
                twin.plot(x, log[key][:epoch + 1], ls="--", color="k", label=key)
            twin.set_ylabel("weight")
            twin.legend(loc="upper right")
        ax = axes[4]
        for key in share_keys:
            values = np.asarray(log[key][:epoch + 1], dtype=float)
            ax.plot(x, values, marker=".", label=key)
        ax.axhline(0.01, color="grey", ls=":", label="1 % of the supervised gradient")
        ax.set_yscale("log")
        ax.set_ylabel("|grad w*L_unsup| / |grad L_sup|")
        ax.legend(loc="upper left")
        if modality_keys:
            self._plot_modalities(axes[5], x, epoch, modality_keys)
        for ax in axes:
            ax.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(join(output_folder, "progress.png"))
        plt.close(fig)


    def _plot_modalities(self, ax, x, epoch: int, keys: Sequence[str]) -> None:
        """Per-modality validation pseudo Dice (solid) and MAW weights (dashed, right axis), one colour each."""
        log = self.my_fantastic_logging
        names = list(getattr(self, "modality_names", []) or [])
        twin = ax.twinx() if "maw_weights" in keys else None
        for key in keys:
            rows = [r if isinstance(r, (list, tuple)) else [np.nan] * max(1, len(names)) for r in log[key][:epoch + 1]]
            values = np.asarray(rows, dtype=float)
            target, style = (twin, "--") if key == "maw_weights" else (ax, "-")
            for k in range(values.shape[1]):
                name = names[k] if k < len(names) else str(k)
                target.plot(x, values[:, k], ls=style, color=f"C{k}", label=f"{key} {name}")
        ax.set_ylabel("validation pseudo dice per modality")
        ax.legend(loc="upper left")
        if twin is not None:
            twin.set_ylabel("MAW weight")
            twin.legend(loc="upper right")


#: list-valued keys (one value per modality) drawn in their own panel
PER_MODALITY_KEYS = ("modality_val_dice", "maw_weights")
#: seconds per epoch spent in a part of the step, drawn beside the epoch duration
TIMING_KEYS = ("prototype_seconds",)


def register_log_keys(meta_logger, extra_keys: Sequence[str]) -> MMSSLLocalLogger:
    """Give nnU-Net's ``MetaLogger`` a local logger that knows ``extra_keys``; call once, before logging."""
    if isinstance(meta_logger.local_logger, MMSSLLocalLogger):
        raise RuntimeError("register_log_keys was called twice on the same logger.")
    local = MMSSLLocalLogger(extra_keys, verbose=meta_logger.local_logger.verbose)
    meta_logger.local_logger = local
    return local
