"""Our trainers' excepthook: a user error under nnUNetv2_train is one line; anything else keeps its traceback."""

import sys

import pytest

from nnunet_mmssl.dataloading.image_checks import ImageFileError
from nnunet_mmssl.dataloading.unlabeled_preprocessing import UnlabeledDataError
from nnunet_mmssl.trainers.user_errors import VERBOSE_VARIABLE, install_user_error_hook, report_user_errors


@pytest.mark.parametrize("error", [UnlabeledDataError("folder /x holds no cases.\n Run  A."),
                                   ImageFileError("/y.nii.gz is truncated")])
def test_user_errors_are_one_line(error, capsys, monkeypatch):
    monkeypatch.delenv(VERBOSE_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/nnUNetv2_train", "1", "2d", "0"])
    passed = []
    report_user_errors(lambda *args: passed.append(args))(type(error), error, None)
    err = capsys.readouterr().err
    assert passed == [] and err.count("\n") == 1
    assert err.startswith("nnUNetv2_train: error: ") and " ".join(str(error).split()) in err


def test_other_errors_and_verbose_go_to_the_previous_hook(capsys, monkeypatch):
    passed = []
    hook = report_user_errors(lambda *args: passed.append(args[0]))
    hook(KeyError, KeyError("x"), None)
    monkeypatch.setenv(VERBOSE_VARIABLE, "1")
    hook(UnlabeledDataError, UnlabeledDataError("y"), None)
    assert passed == [KeyError, UnlabeledDataError] and capsys.readouterr().err == ""


def test_installed_once(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    install_user_error_hook()
    first = sys.excepthook
    install_user_error_hook()
    assert sys.excepthook is first and first.mmssl_user_errors
