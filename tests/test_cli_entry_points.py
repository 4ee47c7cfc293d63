import importlib
import inspect
from importlib.metadata import entry_points

import pytest

EXPECTED = {"nnUNetv2_mmssl_convert", "nnUNetv2_mmssl_plan_and_preprocess", "nnUNetv2_mmssl_predict",
            "nnUNetv2_mmssl_evaluate", "nnUNetv2_mmssl_demo"}


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
