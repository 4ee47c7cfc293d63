"""``nnUNetv2_train`` with our trainers: a user error is one line, not a traceback.

nnU-Net's training entry point catches nothing, so an error a user can cause inside our trainers (no preprocessed
unlabelled data, a corrupt image) would reach the console as a traceback through nnU-Net's and torch's frames. Our
trainers install :func:`report_user_errors` as ``sys.excepthook`` when they are constructed: an uncaught exception of
one of :data:`USER_ERROR_TYPES` prints ``nnUNetv2_train: error: <message>`` (the exit status stays non-zero, 1);
every other exception, and every exception when ``NNUNET_MMSSL_VERBOSE=1`` is set, goes to the previous hook, which
prints the traceback as usual.
"""

import os
import sys

from nnunet_mmssl.dataloading.image_checks import ImageFileError
from nnunet_mmssl.dataloading.unlabeled_preprocessing import UnlabeledDataError
from nnunet_mmssl.safe_load import UnsafeModelError
from nnunet_mmssl.trainers.warm_start import WarmStartError

#: our exceptions that describe a user's input and say the fix
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UnlabeledDataError, ImageFileError, UnsafeModelError,
                                                     WarmStartError)
#: set to 1 to see the traceback of a user error too
VERBOSE_VARIABLE = "NNUNET_MMSSL_VERBOSE"


def report_user_errors(previous=None):
    """Return an excepthook printing our user errors as one line and passing anything else to ``previous``."""
    previous = previous or sys.__excepthook__

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, USER_ERROR_TYPES) and os.environ.get(VERBOSE_VARIABLE, "0") in ("", "0"):
            message = " ".join(str(exc).split())
            print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {message} (set {VERBOSE_VARIABLE}=1 for the "
                  f"traceback)", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    hook.mmssl_user_errors = True
    return hook


def install_user_error_hook() -> None:
    """Install :func:`report_user_errors` as ``sys.excepthook`` (once per process)."""
    if not getattr(sys.excepthook, "mmssl_user_errors", False):
        sys.excepthook = report_user_errors(sys.excepthook)
