"""What every console script of ours shares: ``--verbose``, and one message instead of a traceback.

A user error (a ``ValueError`` such as our ``ConversionError``, ``UnlabeledDataError`` and ``ImageFileError``, an
``OSError`` such as a missing file, or a ``RuntimeError`` such as nnU-Net's "Could not find a dataset with the ID")
prints ``PROG: error: <one line>`` on stderr and returns 2; anything else prints ``PROG: unexpected error`` with its
type and returns 1. ``--verbose`` adds the traceback. Ctrl-C returns 130 with one line.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)
"""Exception types reported as user errors (exit code 2)."""


def one_line(message: object) -> str:
    """``message`` as a single line (whitespace runs collapsed)."""
    return " ".join(str(message).split())


def add_verbose(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--verbose`` (show the Python traceback of an error) to ``parser``; return it."""
    parser.add_argument("--verbose", action="store_true",
                        help="on an error, print the Python traceback too (default: one line)")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the model folder arguments shared by our prediction scripts: ``-m`` or ``-d/-c/-tr/-p``."""
    model = parser.add_argument_group("model (either -m or -d/-c/-tr/-p)")
    model.add_argument("-m", default=None, help="trained model folder (TRAINER__PLANS__CONFIGURATION)")
    model.add_argument("-d", default=None, help="dataset name or id")
    model.add_argument("-c", default=None, help="configuration, e.g. 2d or 3d_fullres")
    model.add_argument("-tr", default="MemCifSSLTrainer", help="trainer name (default MemCifSSLTrainer)")
    model.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    return parser


def parse_or_exit_code(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """Parse ``argv``; argparse's own usage errors (already printed) and ``-h`` become an exit code."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2


def run_cli(prog: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
            argv: list[str] | None) -> int:
    """Parse ``argv`` with ``parser`` (which has ``--verbose``) and run ``body(args)``, reporting errors as one line.

    Args:
        prog: the console script's name, printed before each message.
        parser: the argument parser.
        body: the command; returns an exit code (None = 0).
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        ``body``'s exit code; 2 for a usage or user error, 1 for an unexpected error, 130 on Ctrl-C.
    """
    args = parse_or_exit_code(parser, argv)
    if isinstance(args, int):
        return args
    verbose = bool(getattr(args, "verbose", False))
    try:
        code = body(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 -- a console script reports, it does not dump a traceback
        if verbose:
            traceback.print_exc()
        print(f"{prog}: unexpected error ({type(error).__name__}): {one_line(error)}. Rerun with --verbose for the "
              f"traceback; if the input looks right, please report it.", file=sys.stderr)
        return 1
    return 0 if code is None else int(code)
