"""Tests of ``benchmarks/mutation/mutate.py`` on toy modules (the tool itself is run by hand, not in CI)."""

import ast
import hashlib
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mutation" / "mutate.py"
_spec = importlib.util.spec_from_file_location("mutation_mutate_under_test", SCRIPT)
mutate = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = mutate  # dataclasses look their module up while the file executes
_spec.loader.exec_module(mutate)

TOY = '''"""A toy module."""


def area(width, height):
    return width * height


def clamp_low(x, low=0):
    if x < low:
        raise ValueError(f"{x} is below {low + 1}")
    return max(x, low)


def flip(t, keep=True):
    return -t.sum(dim=1).detach()
'''

#: by hand: (kind, line, original -> mutated); nothing from the raise line (its f-string and the check's message)
TOY_MUTANTS = [
    ("binop", 5, "width * height -> width / height"),
    ("number", 8, "0 -> 1"),
    ("compare", 9, "x < low -> x <= low"),
    ("swap_args", 11, "max(x, low) -> max(low, x)"),
    ("bool", 14, "True -> False"),
    ("unary_minus", 15, "-t.sum(dim=1).detach() -> t.sum(dim=1).detach()"),
    ("dim", 15, "t.sum(dim=1) -> t.sum(dim=2)"),  # the constant 1 -> 2 is the same program: listed once
    ("detach", 15, "t.sum(dim=1).detach() -> t.sum(dim=1)"),
    ("number", 15, "1 -> 0"),
]


def _differences(a: ast.AST, b: ast.AST, where: str = "") -> list[str]:
    """Paths at which two trees differ (not descending below a difference); positions ignored."""
    if type(a) is not type(b):
        return [where or "<root>"]
    if isinstance(a, list):
        if len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if not isinstance(a, ast.AST):
        return [] if a == b else [where]
    return [d for name in a._fields for d in _differences(getattr(a, name), getattr(b, name), f"{where}.{name}")]


def _changed_node(a: ast.AST, b: ast.AST) -> ast.AST:
    """The smallest node of ``a`` with a position that holds every difference between ``a`` and ``b``."""
    differences = _differences(a, b)
    assert differences
    prefix = os.path.commonprefix(differences)
    while not all(d == prefix or d[len(prefix)] in ".[" for d in differences):
        prefix = prefix[:-1]  # back to a whole step: args[0] and args[1] share "args[", not a node
    steps = re.findall(r"\.(\w+)|\[(\d+)\]", prefix)
    chain = [a]
    for field, index in steps:
        chain.append(getattr(chain[-1], field) if field else chain[-1][int(index)])
    return next(node for node in reversed(chain) if hasattr(node, "lineno"))


def test_enumeration_gives_the_hand_listed_mutants():
    mutants = mutate.enumerate_mutants(TOY)
    assert [(m.kind, m.line, m.label) for m in mutants] == TOY_MUTANTS
    assert [m.function for m in mutants[:4]] == ["area", "clamp_low", "clamp_low", "clamp_low"]


def test_filters_by_function_and_kind():
    assert [m.line for m in mutate.enumerate_mutants(TOY, functions=["clamp_low"])] == [8, 9, 11]
    # without the dim kind, dim=1 -> 2 is a number mutant again
    assert [m.label for m in mutate.enumerate_mutants(TOY, kinds=["number"])] == ["0 -> 1", "1 -> 0", "1 -> 2"]
    assert mutate.enumerate_mutants(TOY, functions=["area"], kinds=["compare"]) == []


@pytest.mark.parametrize("index", range(len(TOY_MUTANTS)))
def test_applying_a_mutant_changes_exactly_one_node_and_nothing_else(index):
    mutant = mutate.enumerate_mutants(TOY)[index]
    mutated = mutate.apply_mutant(TOY, mutant)
    changed = _changed_node(ast.parse(TOY), ast.parse(mutated))  # one node holds every difference ...
    assert (mutant.line, mutant.col) <= (changed.lineno, changed.col_offset)  # ... and it lies in the mutant's segment
    assert (changed.end_lineno, changed.end_col_offset) <= (mutant.end_line, mutant.end_col)
    lines, new_lines = TOY.splitlines(), mutated.splitlines()
    assert lines[:mutant.line - 1] == new_lines[:mutant.line - 1]  # text before and after the segment untouched
    assert lines[mutant.end_line:] == new_lines[len(new_lines) - (len(lines) - mutant.end_line):]
    assert lines[mutant.line - 1][:mutant.col] == new_lines[mutant.line - 1][:mutant.col]


def test_sampling_is_deterministic_and_keeps_source_order():
    mutants = mutate.enumerate_mutants(TOY)
    first = mutate.sample_mutants(mutants, 4, seed=3)
    assert first == mutate.sample_mutants(mutants, 4, seed=3)
    assert len(first) == 4 and all(m in mutants for m in first)
    assert sorted(first, key=mutants.index) == first
    assert {tuple(mutate.sample_mutants(mutants, 4, seed=s)) for s in range(6)} != {tuple(first)}
    assert mutate.sample_mutants(mutants, 100, seed=0) == mutants


def _toy_package(root: Path, tests_next_to_package: bool = False) -> tuple[Path, Path]:
    (root / "src" / "toypkg").mkdir(parents=True)
    (root / "src" / "toypkg" / "__init__.py").write_text("")
    module = root / "src" / "toypkg" / "calc.py"
    module.write_text("def area(width, height):\n    return width * height\n\n\n"
                      "def untested_offset(x):\n    return x + 1\n")
    test_dir = root / "src" if tests_next_to_package else root / "tests"
    test_dir.mkdir(exist_ok=True)
    test = test_dir / "test_toy.py"
    test.write_text("from toypkg.calc import area\n\n\ndef test_area():\n    assert area(3, 4) == 12\n")
    return module, test


def test_toy_suite_kills_the_tested_operator_and_the_untested_mutants_survive(tmp_path):
    module, test = _toy_package(tmp_path)
    before = hashlib.sha256(module.read_bytes()).hexdigest()
    report = mutate.mutate_module(mutate.Target.from_path(module), [str(test)], kinds=["binop"], preload=False,
                                  timeout=60)
    outcome = {(r.mutant.line, r.mutant.label): r.status for r in report.results}
    assert outcome == {(2, "width * height -> width / height"): "killed", (6, "x + 1 -> x - 1"): "survived"}
    assert report.results[0].killer.endswith("tests/test_toy.py::test_area")
    assert (report.total_mutants, report.killed, len(report.survived)) == (2, 1, 1)
    assert hashlib.sha256(module.read_bytes()).hexdigest() == before  # the original was never written
    assert mutate.format_survivors([report]) == "toypkg.calc:6:11 [untested_offset] binop: x + 1 -> x - 1"
    assert mutate.format_table([report]).splitlines()[2].split() == ["toypkg.calc", "2/2", "1", "1", "50%"]


def test_main_refuses_bad_input_in_one_line(tmp_path, capsys):
    module, test = _toy_package(tmp_path)
    assert mutate.main([str(tmp_path / "missing.py"), "--tests", str(test)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mutate: error: ") and "missing.py, no such file" in err and "\n" not in err
    assert mutate.main([str(test), "--tests", str(test)]) == 2  # test_toy.py is in no package
    assert "not inside a package" in capsys.readouterr().err
    assert mutate.main([str(module), "--tests", str(tmp_path / "nope.py")]) == 2
    assert "nope.py, no such test file" in capsys.readouterr().err
    assert mutate.main([str(module), "--tests", str(test), "--kinds", "binop,typo"]) == 2
    assert "--kinds typo, unknown kind" in capsys.readouterr().err


def test_list_prints_the_sample_without_running(tmp_path, capsys):
    module, test = _toy_package(tmp_path)
    assert mutate.main([str(module), "--tests", str(test), "--list", "--functions", "area"]) == 0
    assert capsys.readouterr().out.splitlines() == ["toypkg.calc: 1 of 1 mutants",
                                                    "  line 2:11 [area] binop: width * height -> width / height"]
