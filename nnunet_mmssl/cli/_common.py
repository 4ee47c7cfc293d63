"""What every console script of ours shares: ``--verbose``, and one message instead of a traceback.

A user error (a ``ValueError`` such as our ``ConversionError``, ``UnlabeledDataError`` and ``ImageFileError``, an
``OSError`` such as a missing file, or a ``RuntimeError`` such as nnU-Net's "Could not find a dataset with the ID")
prints ``PROG: error: <one line>`` on stderr and returns 2; anything else prints ``PROG: unexpected error`` with its
type and returns 1. ``--verbose`` adds the traceback. An ``OSError`` naming one of our hidden temporary files (a
full disk, a permission) names the file it stands for instead (:func:`nnunet_mmssl.io_checks.public_path`).

Ctrl-C (SIGINT) at any point returns 130 with one line and no traceback (:func:`interrupts_as_exit_code`): worker
processes started meanwhile (ours and nnU-Net's multiprocessing pools) have SIGINT blocked, so only this process
reacts; it unwinds (temporary files and folders are removed, nothing half-written is published), stops the workers
that remain, and exits. If unwinding takes longer than :data:`INTERRUPT_GRACE_S` seconds, or Ctrl-C is pressed
again, the workers are killed and the process exits at once (what is left are hidden temporary names, removed by the
next run).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence

from nnunet_mmssl.option_checks import (  # noqa: F401  (the commands import them from here)
    check_finite_number,
    check_output_folder,
    check_step_size,
)

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)
"""Exception types reported as user errors (exit code 2)."""


INTERRUPT_GRACE_S = 20.0
"""Seconds an interrupted command may take to unwind before it is ended at once."""

_OS_FIXES = {
    errno.EACCES: "Choose a location you may write to, or change its permissions",
    errno.EPERM: "Choose a location you may write to, or change its permissions",
    errno.EROFS: "Choose a location on a writable file system",
    errno.ENOSPC: "Free disk space and run the command again",
    errno.EDQUOT: "Free disk space (or raise the quota) and run the command again",
    errno.EFBIG: "Raise the file-size limit (ulimit -f unlimited) and run the command again",
    errno.EISDIR: "That path is a folder; give a file name there, or remove the folder",
    errno.ENOTDIR: "A part of that path is a file, not a folder; choose another path",
    errno.EEXIST: "It is in the way; remove it or choose another path",
    errno.ENOENT: "Check the path",
}


def one_line(message: object) -> str:
    """``message`` as a single line (whitespace runs collapsed)."""
    return " ".join(str(message).split())


def describe_error(error: BaseException) -> str:
    """The one-line message of a user error. A bare ``OSError`` (``[Errno 28] No space left on device: '.x.tmp'``)
    becomes ``<file>, <what is wrong>. <the fix>.`` with our hidden temporary names replaced by the names they stand
    for."""
    from nnunet_mmssl.io_checks import public_path

    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        names = list(dict.fromkeys(public_path(f) for f in (error.filename, error.filename2) if f is not None))
        what = error.strerror[:1].lower() + error.strerror[1:]
        fix = _OS_FIXES.get(error.errno, "Check the path and the disk")
        subject = " -> ".join(names) if names else "a file"
        return one_line(f"{subject}, {what}. {fix}.")
    return one_line(error)


def check_image_dimensions(files: Sequence[str], fix: str) -> None:
    """Refuse, from the headers (cheap), an image that is not one scalar 2D or 3D image per file (a 4D series or a
    vector image would fail deep inside nnU-Net's workers).

    Args:
        files: the image files.
        fix: the last sentence of the message (what to do instead).

    Raises:
        ValueError: naming the file, its size and components, and ``fix``.
    """
    import SimpleITK as sitk

    for path in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue  # not a SimpleITK format: left to nnU-Net's reader
        size, components = tuple(reader.GetSize()), reader.GetNumberOfComponents()
        if len(size) > 3:
            raise ValueError(f"{path}, is a {len(size)}D image (size {size}); each file must hold one 3D (or 2D) "
                             f"image of one channel. {fix}")
        if components != 1:
            raise ValueError(f"{path}, has {components} components per voxel (a vector/RGB image); each file must "
                             f"hold one scalar channel. {fix}")


_SUBPROCESSES: set = set()
"""Running ``subprocess.Popen`` children registered with :func:`tracked` (ended by :func:`stop_children`)."""


@contextlib.contextmanager
def tracked(process):
    """Register a ``subprocess.Popen`` child (a training run) so that Ctrl-C ends it too; yield it. Leaving the block
    by an exception (Ctrl-C included) ends it before the exception goes on."""
    _SUBPROCESSES.add(process)
    try:
        yield process
    except BaseException:
        end_process(process)
        raise
    finally:
        _SUBPROCESSES.discard(process)


def end_process(process, timeout: float = 10.0) -> None:
    """Terminate a ``subprocess.Popen`` child, then kill it if it is still running after ``timeout`` seconds."""
    with contextlib.suppress(Exception):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except Exception:  # noqa: BLE001 -- subprocess.TimeoutExpired
                process.kill()
                process.wait(2.0)


_START_LOCK = threading.RLock()
"""Held while a worker process is being started (the start wrapped by :func:`_block_sigint_in_children`) and while
:func:`stop_children` ends the children: a start never falls between collecting the children and ending them."""

_STOPPING = threading.Event()
"""Set by :func:`stop_children`, cleared when an interruptible block is entered or left: the wrapped start refuses,
so that no worker is started after the children were ended (a pool replaces its dead workers from its own thread;
such a worker would outlive the command, hold its output open and wait forever)."""


class _WorkerStartRefused(BaseException):
    """Raised in a thread other than the main one that starts a worker after :func:`stop_children` (it ends that
    thread, e.g. a pool's worker handler, silently: see :func:`_quiet_refused_threads`)."""


def _new_start_lock_in_child() -> None:
    global _START_LOCK
    _START_LOCK = threading.RLock()  # a forked child must not inherit the lock its parent held while forking it


os.register_at_fork(after_in_child=_new_start_lock_in_child)


def stop_children(timeout: float = 5.0, rounds: int = 5) -> None:
    """Terminate (then kill) the worker processes and tracked subprocesses of this process that still run; within an
    interruptible block no worker starts from then on.

    A start under way is waited for (:data:`_START_LOCK`, at most ``timeout`` seconds), and the children are
    collected again until none is left, at most ``rounds`` times."""
    locked = _START_LOCK.acquire(timeout=timeout)
    try:
        _STOPPING.set()
        for process in list(_SUBPROCESSES):
            end_process(process, timeout)
        for _ in range(rounds):
            children = multiprocessing.active_children()
            if not children:
                break
            for child in children:
                with contextlib.suppress(Exception):
                    child.terminate()
            for child in children:
                with contextlib.suppress(Exception):
                    child.join(timeout)
                    if child.is_alive():
                        child.kill()
                        child.join(1.0)
    finally:
        if locked:
            _START_LOCK.release()


def _quiet_refused_threads() -> Callable[[], None]:
    """Let a thread ended by :class:`_WorkerStartRefused` end without a traceback; return the function that undoes
    it."""
    original = threading.excepthook

    def hook(args):
        if args.exc_type is not None and issubclass(args.exc_type, _WorkerStartRefused):
            return
        original(args)

    threading.excepthook = hook

    def undo() -> None:
        if threading.excepthook is hook:
            threading.excepthook = original

    return undo


def _block_sigint_in_children() -> Callable[[], None]:
    """Make worker processes started from now on (``multiprocessing``'s ``Process.start``: every start method, our
    pools and nnU-Net's) start with SIGINT blocked -- the signal mask is inherited through fork and exec -- and keep
    SIGINT blocked in this process while a worker is being started, so that an interrupt never leaves a worker
    half-started (it would print a traceback of its own); after :func:`stop_children` a start is refused
    (KeyboardInterrupt in the main thread, :class:`_WorkerStartRefused` in another); return the function that undoes
    it."""
    from multiprocessing.process import BaseProcess

    original = BaseProcess.start

    def start(self):
        with _START_LOCK:  # see stop_children
            if _STOPPING.is_set():
                if threading.current_thread() is threading.main_thread():
                    raise KeyboardInterrupt
                raise _WorkerStartRefused(f"{self.name}: not started, the command is being interrupted")
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                return original(self)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a SIGINT that came meanwhile is delivered now

    start.__doc__ = original.__doc__
    BaseProcess.start = start
    _STOPPING.clear()
    quiet_undo = _quiet_refused_threads()

    def undo() -> None:
        if BaseProcess.start is start:
            BaseProcess.start = original
        quiet_undo()
        _STOPPING.clear()

    return undo


_MAX_DEFERRALS = 20
_DEFERRAL_S = 0.05


def _exception_would_be_ignored(frame) -> bool:
    """Whether ``frame`` (or a caller of it) runs where Python prints an exception and carries on: a weakref
    callback (weakref's and WeakSet's own, multiprocessing's ``Finalize``) or a ``__del__``."""
    while frame is not None:
        code = frame.f_code
        if (code.co_name == "__del__" or os.path.basename(code.co_filename) in ("weakref.py", "_weakrefset.py")
                or getattr(code, "co_qualname", "") == "Finalize.__call__"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def interrupts_as_exit_code(prog: str, grace_s: float | None = None) -> Iterator[None]:
    """Within the block, SIGINT raises KeyboardInterrupt in this process only (workers started meanwhile have it
    blocked),
    and a second SIGINT, or unwinding longer than ``grace_s``, ends the process at once with exit code 130 and the
    one line. The caller catches KeyboardInterrupt (see :func:`run_cli`)."""
    grace = INTERRUPT_GRACE_S if grace_s is None else grace_s
    main_thread = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    if not main_thread:
        yield
        return
    interrupted = threading.Event()
    timers: list[threading.Timer] = []

    def force_exit() -> None:
        # the lock is kept until os._exit: no worker starts after the children were ended (a worker started then,
        # e.g. by the main thread still unwinding, would outlive the command and hold its output open)
        _START_LOCK.acquire(timeout=5.0)
        with contextlib.suppress(Exception):
            stop_children(timeout=1.0)
        with contextlib.suppress(Exception):
            print(interrupted_message(prog), file=sys.stderr, flush=True)
        os._exit(130)

    deferred = []

    def handler(signum, frame):
        if interrupted.is_set():
            force_exit()
        if not timers:  # the grace time counts from the first Ctrl-C
            timers.append(threading.Timer(grace, force_exit))
            timers[-1].daemon = True
            timers[-1].start()
        if len(deferred) < _MAX_DEFERRALS and _exception_would_be_ignored(frame):
            # raised here, the KeyboardInterrupt would be printed as "Exception ignored in ..." and lost: ask again
            deferred.append(threading.Timer(_DEFERRAL_S, os.kill, (os.getpid(), signal.SIGINT)))
            deferred[-1].daemon = True
            deferred[-1].start()
            return
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    undo = _block_sigint_in_children()
    try:
        yield
    finally:
        for timer in timers + deferred:
            timer.cancel()
        undo()
        signal.signal(signal.SIGINT, previous)


def interrupted_message(prog: str) -> str:
    """The one line printed on Ctrl-C."""
    return (f"{prog}: interrupted (Ctrl-C); nothing half-written was published (temporary files are removed now or "
            f"by the next run). Run the command again to finish.")


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


def call_interruptibly(prog: str, call: Callable[[], int | None]) -> int | None:
    """``call()`` under :func:`interrupts_as_exit_code`: its result, or 130 after the one line on Ctrl-C (children
    stopped). Other exceptions pass to the caller."""
    try:
        with interrupts_as_exit_code(prog):
            try:
                return call()
            except KeyboardInterrupt:
                stop_children()
                print(interrupted_message(prog), file=sys.stderr)
                return 130
    except KeyboardInterrupt:  # between the call's end and leaving the block
        print(interrupted_message(prog), file=sys.stderr)
        return 130


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
        code = call_interruptibly(prog, lambda: body(args))
    except USER_ERRORS as error:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {describe_error(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 -- a console script reports, it does not dump a traceback
        if verbose:
            traceback.print_exc()
        print(f"{prog}: unexpected error ({type(error).__name__}): {one_line(error)}. Rerun with --verbose for the "
              f"traceback; if the input looks right, please report it.", file=sys.stderr)
        return 1
    return 0 if code is None else int(code)
