import importlib
import inspect
from importlib.metadata import entry_points

import pytest

EXPECTED = {"nnUNetv2_mmssl_convert", "nnUNetv2_mmssl_plan_and_preprocess", "nnUNetv2_mmssl_predict",
            "nnUNetv2_mmssl_evaluate", "nnUNetv2_mmssl_demo", "nnUNetv2_mmssl_pseudolabel",
            "nnUNetv2_mmssl_evaluate_missing", "nnUNetv2_mmssl_study", "nnUNetv2_mmssl_check_model",
            "nnUNetv2_mmssl_selftrain"}


def _scripts():
    return {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("nnUNetv2_mmssl")}


def test_all_console_scripts_installed_and_loadable():
    scripts = _scripts()
    assert set(scripts) == EXPECTED
    for ep in scripts.values():
        main = ep.load()
        assert list(inspect.signature(main).parameters) == ["argv"]


@pytest.mark.parametrize("module", sorted(m.replace("nnUNetv2_mmssl_", "") for m in EXPECTED))
def test_help_exits_zero(module, capsys):
    mod = importlib.import_module(f"nnunet_mmssl.cli.{module}")
    try:
        code = mod.main(["--help"])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(m.replace("nnUNetv2_mmssl_", "") for m in EXPECTED))
def test_every_console_script_has_verbose(module):
    """``--verbose`` (show the traceback of an error) is accepted by every console script of ours."""
    mod = importlib.import_module(f"nnunet_mmssl.cli.{module}")
    options = {option for action in mod.build_parser()._actions for option in action.option_strings}
    assert "--verbose" in options


@pytest.mark.parametrize("raised, code, line", [
    (ValueError("file x.nii.gz is bad.\nFix it."), 2, "PROG: error: file x.nii.gz is bad. Fix it."),
    (FileNotFoundError("no such folder y"), 2, "PROG: error: no such folder y"),
    (KeyError("z"), 1, "PROG: unexpected error (KeyError): 'z'. Rerun with --verbose"),
    (KeyboardInterrupt(), 130, "PROG: interrupted"),
])
@pytest.mark.parametrize("verbose", [False, True])
def test_run_cli_reports_one_line(raised, code, line, verbose, capsys):
    import argparse

    from nnunet_mmssl.cli._common import add_verbose, run_cli

    def body(args):
        raise raised

    parser = add_verbose(argparse.ArgumentParser(prog="PROG"))
    assert run_cli("PROG", parser, body, ["--verbose"] if verbose else []) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(line)
    has_traceback = "Traceback" in err
    assert has_traceback == (verbose and code != 130)
    if not verbose:
        assert len(err.strip().splitlines()) == 1
