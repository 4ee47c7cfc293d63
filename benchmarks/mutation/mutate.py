"""Mutation testing: change one operator or constant of a module at a time and check that the tests notice.

    python benchmarks/mutation/mutate.py nnunet_mmssl/losses/consistency.py --tests tests/test_losses_and_ramps.py \
        [--tests more_tests.py ...] [-k EXPR] [-m "not slow"] [--max-mutants 30] [--seed 0] \
        [--functions name,Class.method] [--kinds binop,compare,...] [--timeout SEC] [--json OUT.json] [--list]
    python benchmarks/mutation/mutate.py nnunet_mmssl/semisup/ema.py=tests/test_ema.py \
        nnunet_mmssl/semisup/ramps.py=tests/test_losses_and_ramps.py,tests/test_unsup_signal.py --max-mutants 30

``MODULE=TEST,TEST`` gives a module its own tests (instead of ``--tests``); several modules in one command share the
preloaded imports.

The module is parsed with :mod:`ast` and its mutants are enumerated (:data:`KINDS`): binary operator swaps
(``+``/``-``, ``*``/``/``, ``//`` -> ``/``, ``**`` -> ``*``, ``&``/``|``; also in ``+=`` etc.), comparison swaps
(``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``is``/``is not``, ``in``/``not in``), ``and``/``or``, numeric constants
(``0 -> 1``, ``1 -> 0, 2``, ``c -> c + 1, -c, c / 2``), ``True``/``False``, ``not`` and unary minus removed, the
first two positional arguments of a call swapped, ``.detach()`` removed, and a ``dim=``/``axis=`` argument moved by
one. Error messages (``raise``, ``assert``, f-strings) and annotations are not mutated.

**The working tree is never written.** The module's top-level package is copied to a temporary folder once; each
mutant is written over the module *in that copy*, and the tests run in a forked child process that puts the copy
first on ``sys.path`` (and ``PYTHONPATH`` for the tests' own child processes), drops every entry that points at the
original package, writes no bytecode, and afterwards reports the file its module object came from: a run whose module
was not imported from the copy is an error, not a survivor. Before the mutants, a *canary* (the module with a
``raise`` appended) must be killed and the unmodified copy must pass. The parent process imports the third-party
modules the tests need once (recorded in the first baseline run), so that a mutant costs the tests, not
``import torch``.

Each mutant runs ``pytest -x -q -p no:cacheprovider [-m MARK] [-k EXPR] TESTS``; tests failing (or a collection
error, or the per-mutant timeout) = killed, all passing = survived. Survivors are listed with their line,
``original -> mutant`` and enclosing function; some are equivalent mutants (no input can tell them apart), the rest
are gaps in the tests.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import copy
import gc
import hashlib
import importlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROG = "mutate"

#: mutant kinds, in the order they are reported
KINDS = ("binop", "augassign", "compare", "boolop", "number", "bool", "unary_minus", "not", "swap_args", "detach",
         "dim")

_BINOP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Add: (ast.Sub,), ast.Sub: (ast.Add,), ast.Mult: (ast.Div,), ast.Div: (ast.Mult,),
    ast.FloorDiv: (ast.Div,), ast.Pow: (ast.Mult,), ast.BitAnd: (ast.BitOr,), ast.BitOr: (ast.BitAnd,),
}
_COMPARE_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
_DIM_KEYWORDS = ("dim", "axis")


class UserError(Exception):
    """A problem with the command line or the inputs: reported in one line, exit 2."""


@dataclass(frozen=True)
class Mutant:
    """One change of one node of a module.

    ``line``/``col``/``end_line``/``end_col`` locate the replaced source segment (1-based lines, 0-based character
    columns); ``replacement`` is the text written there; ``original``/``mutated`` are short readable forms.
    """

    kind: str
    line: int
    col: int
    end_line: int
    end_col: int
    function: str
    original: str
    mutated: str
    replacement: str

    @property
    def label(self) -> str:
        return f"{self.original} -> {self.mutated}"


@dataclass
class MutantResult:
    mutant: Mutant
    status: str  # "killed", "survived", "timeout"
    seconds: float
    returncode: int | None
    killer: str = ""


@dataclass
class ModuleReport:
    module: str
    total_mutants: int
    results: list[MutantResult] = field(default_factory=list)

    @property
    def killed(self) -> int:
        return sum(r.status in ("killed", "timeout") for r in self.results)

    @property
    def survived(self) -> list[MutantResult]:
        return [r for r in self.results if r.status == "survived"]


# ----------------------------------------------------------------------------------------------------------- mutants
def _short(node: ast.AST, limit: int = 70) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _display(node: ast.AST) -> str:
    """A short readable form that keeps the mutated operator visible (long operands and arguments abridged)."""
    node = copy.deepcopy(node)

    def abridge(child: ast.AST) -> ast.AST:
        return child if len(ast.unparse(child)) <= 28 else ast.Name(id=_short(child, 28))

    if isinstance(node, ast.BinOp):
        node.left, node.right = abridge(node.left), abridge(node.right)
    elif isinstance(node, ast.Compare):
        node.left, node.comparators = abridge(node.left), [abridge(c) for c in node.comparators]
    elif isinstance(node, ast.BoolOp):
        node.values = [abridge(v) for v in node.values]
    elif isinstance(node, ast.Call):
        node.func = abridge(node.func)
        node.args = [abridge(a) for a in node.args]
        node.keywords = [ast.keyword(arg=k.arg, value=abridge(k.value)) for k in node.keywords]
    return _short(node, 90)


def _number_variants(value: int | float) -> list[int | float]:
    if value == 0:
        return [type(value)(1)]
    if value == 1:
        return [type(value)(0), type(value)(2)]
    half = value // 2 if isinstance(value, int) else value / 2
    variants = [value + 1, -value, half]
    return [v for i, v in enumerate(variants) if v != value and v not in variants[:i]]


def _int_constant(node: ast.AST) -> int | None:
    """The int of ``3`` or ``-3`` (a unary minus on a constant), else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_constant(node.operand)
        return None if inner is None else -inner
    return None


class _Collector:
    """Walks a module and lists ``(kind, node, new_node, function)`` for every mutant."""

    def __init__(self):
        self.found: list[tuple[str, ast.AST, ast.AST, str]] = []

    def add(self, kind: str, node: ast.AST, new: ast.AST, function: str) -> None:
        self.found.append((kind, node, new, function))

    def visit(self, node: ast.AST, scope: tuple[str, ...]) -> None:
        function = ".".join(scope) if scope else "<module>"
        if isinstance(node, (ast.JoinedStr, ast.Raise, ast.Assert)):
            return  # error messages and checks' texts are not the arithmetic under test
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = (*scope, node.name)
            for default in [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]:
                self.visit(default, inner)
            for decorator in node.decorator_list:
                self.visit(decorator, scope)
            for statement in node.body:
                self.visit(statement, inner)
            return
        if isinstance(node, ast.ClassDef):
            for child in [*node.bases, *node.keywords, *node.decorator_list]:
                self.visit(child, scope)
            for statement in node.body:
                self.visit(statement, (*scope, node.name))
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self.visit(node.value, scope)
            return
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # docstring or bare string
        self.mutants_at(node, function)
        for child in ast.iter_child_nodes(node):
            self.visit(child, scope)

    def mutants_at(self, node: ast.AST, function: str) -> None:
        if isinstance(node, ast.BinOp):
            for op in _BINOP_SWAPS.get(type(node.op), ()):
                new = copy.deepcopy(node)
                new.op = op()
                self.add("binop", node, new, function)
        elif isinstance(node, ast.AugAssign):
            for op in _BINOP_SWAPS.get(type(node.op), ()):
                new = copy.deepcopy(node)
                new.op = op()
                self.add("augassign", node, new, function)
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _COMPARE_SWAPS:
                    new = copy.deepcopy(node)
                    new.ops[i] = _COMPARE_SWAPS[type(op)]()
                    self.add("compare", node, new, function)
        elif isinstance(node, ast.BoolOp):
            new = copy.deepcopy(node)
            new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            self.add("boolop", node, new, function)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                self.add("bool", node, ast.Constant(not node.value), function)
            elif type(node.value) in (int, float):
                for value in _number_variants(node.value):
                    self.add("number", node, ast.Constant(value), function)
        elif isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                self.add("unary_minus", node, copy.deepcopy(node.operand), function)
            elif isinstance(node.op, ast.Not):
                self.add("not", node, copy.deepcopy(node.operand), function)
        elif isinstance(node, ast.Call):
            self.call_mutants(node, function)

    def call_mutants(self, node: ast.Call, function: str) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "detach" and not node.args and not node.keywords:
            self.add("detach", node, copy.deepcopy(func.value), function)
        positional = node.args[:2]
        if (len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in positional)
                and ast.dump(positional[0]) != ast.dump(positional[1])):
            new = copy.deepcopy(node)
            new.args[0], new.args[1] = new.args[1], new.args[0]
            self.add("swap_args", node, new, function)
        for k, keyword in enumerate(node.keywords):
            dim = _int_constant(keyword.value) if keyword.arg in _DIM_KEYWORDS else None
            if dim is not None:
                new = copy.deepcopy(node)
                new.keywords[k].value = ast.Constant(dim + 1 if dim >= 0 else dim - 1)
                self.add("dim", node, new, function)


def _offsets(source: str) -> list[int]:
    """Character offset of the start of every line (index 0 = line 1)."""
    starts, total = [], 0
    for line in source.splitlines(keepends=True):
        starts.append(total)
        total += len(line)
    starts.append(total)
    return starts


def _char_col(source_lines: list[str], line: int, byte_col: int) -> int:
    """ast columns are UTF-8 byte offsets; convert to a character column."""
    return len(source_lines[line - 1].encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def enumerate_mutants(source: str, functions: Sequence[str] | None = None,
                      kinds: Sequence[str] | None = None) -> list[Mutant]:
    """Every mutant of ``source``, in source order, each parsing and differing from the original.

    Args:
        source: the module's text.
        functions: keep only mutants inside these functions (a name such as ``update_ema_`` or a qualified name such
            as ``EMATeacher.update``; nested functions count for every enclosing name). None = all.
        kinds: keep only these kinds (:data:`KINDS`). None = all.
    """
    tree = ast.parse(source)
    collector = _Collector()
    for statement in tree.body:
        collector.visit(statement, ())
    lines = source.splitlines(keepends=True)
    wanted = set(functions) if functions else None
    mutants, seen, original = [], set(), ast.dump(tree)
    for kind, node, new, function in collector.found:
        if kinds and kind not in kinds:
            continue
        if wanted is not None:
            parts = function.split(".")
            names = {".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}
            if not names & wanted:
                continue
        is_statement = isinstance(node, ast.stmt)
        text = ast.unparse(new)
        replacement = text if is_statement else f"({text})"
        mutant = Mutant(kind=kind, line=node.lineno, col=_char_col(lines, node.lineno, node.col_offset),
                        end_line=node.end_lineno, end_col=_char_col(lines, node.end_lineno, node.end_col_offset),
                        function=function, original=_display(node), mutated=_display(new), replacement=replacement)
        try:
            mutated_tree = ast.parse(apply_mutant(source, mutant))
        except SyntaxError:
            continue
        key = ast.dump(mutated_tree)
        if key == original or key in seen:
            continue  # no change, or the same program as an earlier mutant (e.g. dim=1 -> 2 and the constant 1 -> 2)
        seen.add(key)
        mutants.append(mutant)
    mutants.sort(key=lambda m: (m.line, m.col, m.end_line, m.end_col, KINDS.index(m.kind), m.replacement))
    return mutants


def apply_mutant(source: str, mutant: Mutant) -> str:
    """``source`` with the mutant's segment replaced; everything else (comments, other lines) byte-identical."""
    starts = _offsets(source)
    begin = starts[mutant.line - 1] + mutant.col
    end = starts[mutant.end_line - 1] + mutant.end_col
    return source[:begin] + mutant.replacement + source[end:]


def sample_mutants(mutants: list[Mutant], max_mutants: int | None, seed: int) -> list[Mutant]:
    """A deterministic sample (same seed and mutants = same sample), kept in source order."""
    if max_mutants is None or len(mutants) <= max_mutants:
        return list(mutants)
    chosen = set(random.Random(seed).sample(range(len(mutants)), max_mutants))
    return [m for i, m in enumerate(mutants) if i in chosen]


# ------------------------------------------------------------------------------------------------------ the runner
@dataclass(frozen=True)
class Target:
    """A module inside a package: ``/repo/pkg/sub/mod.py`` -> root ``/repo``, package ``pkg``, name ``pkg.sub.mod``."""

    path: Path
    root: Path
    package: str
    name: str

    @classmethod
    def from_path(cls, path: str | Path) -> Target:
        path = Path(path).resolve()
        if not path.is_file():
            raise UserError(f"{path}, no such file. Give the path of a Python module, e.g. nnunet_mmssl/losses/smml.py")
        if path.suffix != ".py":
            raise UserError(f"{path}, not a .py file. Give the path of a Python module.")
        parts = [] if path.name == "__init__.py" else [path.stem]
        folder = path.parent
        while (folder / "__init__.py").is_file():
            parts.insert(0, folder.name)
            folder = folder.parent
        if not parts or (path.name != "__init__.py" and len(parts) == 1):
            raise UserError(f"{path}, not inside a package (no __init__.py next to it). Mutate modules of a package.")
        return cls(path=path, root=folder, package=parts[0], name=".".join(parts))


class _Runs:
    """The temporary package copy and the forked test runs; cleaned up on exit, on a signal and on errors."""

    def __init__(self, target: Target, tests: Sequence[str], pytest_extra: Sequence[str]):
        self.target = target
        self.tests = list(tests)
        self.pytest_extra = list(pytest_extra)
        self.workdir = Path(tempfile.mkdtemp(prefix="mutation_"))
        self.copy_root = self.workdir / "src"
        self.copy_root.mkdir()
        shutil.copytree(target.root / target.package, self.copy_root / target.package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        self.copy_module = self.copy_root / target.path.relative_to(target.root)
        self.original_text = self.copy_module.read_text(encoding="utf-8")
        self.cwd = self.workdir / "cwd"
        self.cwd.mkdir()
        self.child: int | None = None
        self.closed = False

    # -- lifetime
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.kill_child()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kill_child(self) -> None:
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.child, 0)
            self.child = None

    # -- one run
    def pytest_args(self) -> list[str]:
        return ["-x", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                *self.pytest_extra, *self.tests]

    def run(self, source: str | None, timeout: float, record_modules: bool = False) -> dict:
        """Write ``source`` (None = the original) over the copy's module, run the tests in a forked child.

        Returns ``{"returncode", "seconds", "timed_out", "module_file", "log", ...}``.
        """
        self.copy_module.write_text(self.original_text if source is None else source, encoding="utf-8")
        log_path, result_path = self.workdir / "run.log", self.workdir / "run.json"
        for p in (log_path, result_path):
            p.unlink(missing_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 99
            try:
                code = self._child(log_path, result_path, record_modules)
            except BaseException:  # noqa: B036 - the child must exit through os._exit whatever happens
                with contextlib.suppress(Exception), open(log_path, "a") as log:
                    log.write(traceback.format_exc())
            finally:
                os._exit(code)
        self.child = pid
        timed_out, status = False, 0
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.child = None
                break
            if time.monotonic() - start > timeout:
                timed_out = True
                self.kill_child()
                break
            time.sleep(0.02)
        seconds = time.monotonic() - start
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
        log = log_path.read_text(errors="replace") if log_path.is_file() else ""
        returncode = None if timed_out else os.waitstatus_to_exitcode(status)
        self.copy_module.write_text(self.original_text, encoding="utf-8")
        return {**result, "returncode": returncode, "seconds": seconds, "timed_out": timed_out, "log": log}

    def _child(self, log_path: Path, result_path: Path, record_modules: bool) -> int:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # own process group: a timeout kills the tests' own children too
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # not a caller's capture object
        gc.freeze()  # the parent's objects are never garbage here: do not walk (and copy) them at every collection
        sys.dont_write_bytecode = True  # nothing written next to the tests, no stale bytecode of a mutant
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        copy_root, package = str(self.copy_root), self.target.package
        os.environ["PYTHONPATH"] = os.pathsep.join([copy_root, *filter(None, [os.environ.get("PYTHONPATH")])])
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
        original_root = self.target.root.resolve()
        sys.path[:] = [copy_root, *(p for p in sys.path if Path(p or ".").resolve() != original_root)]
        importlib.invalidate_caches()
        os.chdir(self.cwd)
        before = set(sys.modules)
        with contextlib.suppress(Exception):  # the package itself from the copy: its submodules follow its __path__,
            importlib.import_module(package)  # whatever a test later puts on sys.path (a failure shows in pytest)
        import pytest

        code = int(pytest.main(self.pytest_args()))
        sys.stdout.flush()
        sys.stderr.flush()
        module = sys.modules.get(self.target.name)
        result = {"module_file": getattr(module, "__file__", None)}
        if record_modules:
            result["modules"] = [n for n in sys.modules if n not in before]
            result["environ"] = dict(os.environ)
        result_path.write_text(json.dumps(result))
        return code


def _killer(log: str, cwd: Path) -> str:
    """The first failing test of a run's log (run in ``cwd``), relative to this process's working directory."""
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", log, flags=re.MULTILINE)
    if match is None:
        match = re.search(r"^E\s+(\S.*)$", log, flags=re.MULTILINE)
        return match.group(1)[:120] if match else ""
    path, _, name = match.group(1).partition("::")
    path = os.path.relpath(os.path.normpath(cwd / path))
    return f"{path}::{name}" if name else path


def _preload(runs: _Runs, recorded: dict) -> list[str]:
    """Import in this process what the tests imported from outside the package and the tests (in the same order),
    with the environment variables the tests' conftest added; returns the modules that failed to import."""
    for key, value in recorded.get("environ", {}).items():
        if key not in os.environ and key not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE"):
            os.environ[key] = value
    skip_roots = [str(runs.target.root.resolve()), str(runs.workdir.resolve()), str(runs.workdir)]
    failed = []
    for name in recorded.get("modules", []):
        if name in sys.modules or name == "conftest" or name.split(".")[0] == runs.target.package:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            continue
        origin = getattr(spec, "origin", None) or ""
        if spec is None or any(origin.startswith(root) for root in skip_roots):
            continue
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that cannot be preloaded is imported by the child instead
            failed.append(name)
    leaked = [n for n in sys.modules if n.split(".")[0] == runs.target.package]
    for name in leaked:
        del sys.modules[name]
    gc.collect()
    gc.freeze()  # the preloaded objects: no garbage collection in the children (it would copy every page on write)
    return failed


def mutate_module(target: Target, tests: Sequence[str], pytest_extra: Sequence[str] = (),
                  max_mutants: int | None = None, seed: int = 0, functions: Sequence[str] | None = None,
                  kinds: Sequence[str] | None = None, timeout: float | None = None, preload: bool = True,
                  progress: Callable[[str], None] | None = None) -> ModuleReport:
    """Run the (sampled) mutants of one module against ``tests``; see the module docstring.

    Raises:
        UserError: if the tests fail on the unmodified module, do not import it, or let the canary live.
    """
    say = progress or (lambda _text: None)
    source = target.path.read_text(encoding="utf-8")
    digest = hashlib.sha256(target.path.read_bytes()).hexdigest()
    all_mutants = enumerate_mutants(source, functions, kinds)
    chosen = sample_mutants(all_mutants, max_mutants, seed)
    report = ModuleReport(module=str(target.name), total_mutants=len(all_mutants))
    runs = _Runs(target, tests, pytest_extra)
    _ACTIVE.append(runs)
    try:
        first = runs.run(None, timeout=timeout or 1800, record_modules=preload)
        _check_baseline(target, first, runs)
        if preload:
            _preload(runs, first)
            first = runs.run(None, timeout=timeout or 1800)
            _check_baseline(target, first, runs)
        budget = timeout or max(20.0, 4.0 * first["seconds"] + 5.0)
        say(f"{target.name}: baseline passes in {first['seconds']:.1f} s; {len(chosen)} of {len(all_mutants)} "
            f"mutants, timeout {budget:.0f} s each")
        canary = runs.run(source + "\nraise RuntimeError('mutation canary')\n", timeout=budget)
        if canary["returncode"] == 0 and not canary["timed_out"]:
            raise UserError(f"{target.path}, the tests pass although the module raises on import (the canary "
                            f"survived). Choose tests that import this module.")
        for i, mutant in enumerate(chosen, 1):
            outcome = runs.run(apply_mutant(source, mutant), timeout=budget)
            if outcome["timed_out"]:
                status = "timeout"
            else:
                _check_copy(target, outcome, runs)
                status = "survived" if outcome["returncode"] == 0 else "killed"
            result = MutantResult(mutant=mutant, status=status, seconds=round(outcome["seconds"], 2),
                                  returncode=outcome["returncode"],
                                  killer="" if status == "survived" else _killer(outcome["log"], runs.cwd))
            report.results.append(result)
            say(f"  [{i}/{len(chosen)}] {status:8s} line {mutant.line} {mutant.kind}: {mutant.label}")
    finally:
        runs.close()
        _ACTIVE.remove(runs)
    if hashlib.sha256(target.path.read_bytes()).hexdigest() != digest:
        say(f"warning: {target.path} changed during the run (not by this script: it writes only to its copy)")
    return report


def _check_copy(target: Target, outcome: dict, runs: _Runs) -> None:
    module_file = outcome.get("module_file")
    if module_file is not None and not Path(module_file).resolve().is_relative_to(runs.copy_root.resolve()):
        raise UserError(f"{module_file}, the tests imported {target.name} from there, not from the mutated copy. "
                        f"Do not put the source tree on sys.path inside the tests.")


def _check_baseline(target: Target, outcome: dict, runs: _Runs) -> None:
    if outcome["timed_out"] or outcome["returncode"] != 0:
        failing = _killer(outcome["log"], runs.cwd) or f"exit code {outcome['returncode']}"
        raise UserError(f"{target.path}, the tests fail on the unmodified module ({failing}). Choose passing tests.")
    if outcome.get("module_file") is None:
        raise UserError(f"{target.path}, the tests never import {target.name}. Choose tests that cover this module.")
    _check_copy(target, outcome, runs)


_ACTIVE: list[_Runs] = []


def _cleanup() -> None:
    for runs in list(_ACTIVE):
        runs.close()


def _on_signal(signum, _frame) -> None:
    _cleanup()
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------------------ the report
def format_table(reports: Sequence[ModuleReport]) -> str:
    rows = [("module", "mutants", "killed", "survived", "share")]
    for r in reports:
        run = len(r.results)
        share = f"{100.0 * r.killed / run:.0f}%" if run else "-"
        rows.append((r.module, f"{run}/{r.total_mutants}", str(r.killed), str(len(r.survived)), share))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_survivors(reports: Sequence[ModuleReport]) -> str:
    lines = []
    for r in reports:
        for s in r.survived:
            m = s.mutant
            lines.append(f"{r.module}:{m.line}:{m.col} [{m.function}] {m.kind}: {m.label}")
    return "\n".join(lines) if lines else "no survivors"


def write_json(path: Path, reports: Sequence[ModuleReport], settings: dict) -> None:
    data = {"settings": settings, "modules": [
        {"module": r.module, "total_mutants": r.total_mutants, "run": len(r.results), "killed": r.killed,
         "survived": len(r.survived), "results": [{**asdict(x), "mutant": asdict(x.mutant)} for x in r.results]}
        for r in reports]}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    if partial.stat().st_size == 0:
        raise UserError(f"{partial}, nothing was written (disk full?). Free space and rerun.")
    os.replace(partial, path)


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+",
                        help="module files to mutate (inside a package); MODULE=TEST,TEST gives it its own tests")
    parser.add_argument("--tests", action="append", default=[],
                        help="test file or node id to run per mutant (repeatable), for modules without their own")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("-m", dest="marker", default="not slow", help="pytest -m expression (default: 'not slow')")
    parser.add_argument("--max-mutants", type=int, help="sample at most N mutants per module")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--functions", help="comma-separated function names: mutate only inside these")
    parser.add_argument("--kinds", help=f"comma-separated mutant kinds out of {','.join(KINDS)}")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 4 x baseline + 5, at least 20)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--list", action="store_true", help="only list the (sampled) mutants; run nothing")
    parser.add_argument("--no-preload", action="store_true", help="do not pre-import the tests' third-party modules")
    return parser


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _module_tests(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``[(module, tests)]`` from ``MODULE=TEST,TEST`` arguments, else ``--tests``."""
    pairs = []
    for item in args.modules:
        module, _, own = item.partition("=")
        pairs.append((module, _split(own) or list(args.tests)))
    return pairs


def _absolute_test(test: str) -> str:
    path, sep, node = test.partition("::")
    return str(Path(path).resolve()) + sep + node


def _validate(args: argparse.Namespace) -> None:
    if args.max_mutants is not None and args.max_mutants < 1:
        raise UserError(f"--max-mutants {args.max_mutants}, must be >= 1. Give a positive number.")
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}, must be > 0. Give seconds per mutant.")
    unknown = sorted(set(_split(args.kinds) or []) - set(KINDS))
    if unknown:
        raise UserError(f"--kinds {','.join(unknown)}, unknown kind. Use some of {','.join(KINDS)}.")
    for module, tests in _module_tests(args):
        if not tests:
            raise UserError(f"{module}, no tests to run. Give --tests TEST or {module}=TEST,TEST.")
        for test in tests:
            if not Path(test.split("::")[0]).exists():
                raise UserError(f"{test.split('::')[0]}, no such test file. Give an existing test file or node id.")
    if args.json is not None and not args.json.resolve().parent.is_dir():
        raise UserError(f"{args.json}, its folder does not exist. Create it or choose another --json path.")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    atexit.register(_cleanup)
    handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _validate(args)
        plan = [(Target.from_path(m), [_absolute_test(t) for t in tests]) for m, tests in _module_tests(args)]
        functions, kinds = _split(args.functions), _split(args.kinds)
        if args.list:
            for target, _tests in plan:
                source = target.path.read_text(encoding="utf-8")
                mutants = enumerate_mutants(source, functions, kinds)
                chosen = sample_mutants(mutants, args.max_mutants, args.seed)
                print(f"{target.name}: {len(chosen)} of {len(mutants)} mutants")
                for m in chosen:
                    print(f"  line {m.line}:{m.col} [{m.function}] {m.kind}: {m.label}")
            return 0
        extra = ["-m", args.marker] if args.marker else []
        extra += ["-k", args.keyword] if args.keyword else []
        settings = {"modules": args.modules, "tests": args.tests, "marker": args.marker, "keyword": args.keyword,
                    "max_mutants": args.max_mutants, "seed": args.seed, "functions": functions, "kinds": kinds}
        reports, errors = [], []
        for target, tests in plan:
            try:
                reports.append(mutate_module(target, tests, extra, args.max_mutants, args.seed, functions, kinds,
                                             args.timeout, preload=not args.no_preload,
                                             progress=lambda text: print(text, flush=True)))
            except UserError as error:  # one module's tests are unusable: say so, go on with the others
                print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
                errors.append(str(error))
            if args.json is not None:  # after every module: a long run that is stopped keeps what it measured
                write_json(args.json, reports, {**settings, "errors": errors})
        print()
        print(format_table(reports))
        print()
        print("survivors:")
        print(format_survivors(reports))
        return 2 if errors else 0
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    finally:
        _cleanup()
        for s, h in handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
