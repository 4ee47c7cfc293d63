"""The benchmark's parent process: one child per (configuration, trainer) and round, the interleaved child, then the
merged rows, the tables and the JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from trainer_bench.cases import benchmark_environment, prepare_phantom
from trainer_bench.report import add_ratios, format_header, format_table, machine_info, merge_interleaved, merge_rounds
from trainer_bench.rows import DEFAULT_PLANS, rotated

#: the entry point the children run (with ``--worker``) and the report's command names
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark_trainers.py")


RESULT_MARKER = "BENCHMARK_RESULT "


def parse_worker_output(text: str) -> dict | None:
    """The JSON of the last ``BENCHMARK_RESULT`` line of a worker's output, or None."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER):])
            except json.JSONDecodeError:
                return None
    return None


def worker_argv(args: argparse.Namespace, dataset: str, configuration: str, trainer: str,
                output_folder: str, predict_cases: int | None = None, interleaved: bool = False) -> list[str]:
    """Command line of the child process measuring one (configuration, trainer); with ``interleaved``, of the child
    running the interleaved compute measurement of the comma-separated trainers ``trainer``."""
    predict_cases = args.predict_cases if predict_cases is None else predict_cases
    argv = [sys.executable, SCRIPT, "--worker", "-d", str(dataset), "-p", args.plans,
            "-f", str(args.fold), "--iterations", str(args.iterations), "--warmup", str(args.warmup),
            "-device", args.device, "--predict-cases", str(predict_cases), "--n-proc-da", str(args.n_proc_da),
            "--interleaved-rounds", str(args.interleaved_rounds), "--interleaved-steps", str(args.interleaved_steps),
            "--share-steps", str(args.share_steps),
            "--worker-configuration", configuration, "--worker-trainer", trainer, "--worker-output", output_folder]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.mirror:
        argv.append("--mirror")
    if args.mmssl_plans:
        argv += ["--mmssl-plans", args.mmssl_plans]
    if interleaved:
        argv.append("--worker-interleaved")
    return argv


def exit_on_sigterm() -> None:
    """Let SIGTERM (kill, timeout) end this process through SystemExit, so that :func:`_run_child` stops the
    running worker's session too instead of leaving it running (it is in a session of its own).

    Processes forked from this one (nnU-Net's multiprocessing pools during the phantom's preprocessing) get the
    default SIGTERM back: a pool worker that turned SIGTERM into SystemExit while blocked on the pool's queue lock
    could stay alive when ``Pool.terminate`` signalled it, and the pool's join then waited forever (seen once in CI).
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


def _run_child(argv: list[str], env: dict, log_file: str, timeout: float) -> tuple[dict | None, str | None]:
    """Run one child process in its own session; return (parsed result or None, error text or None)."""
    # own session, so that on a timeout the worker and its augmentation / prediction processes end together
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    def kill_group() -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()

    try:
        stdout, stderr = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        kill_group()
        stdout, stderr = process.communicate()
        code = None
    except BaseException:  # Ctrl-C or a kill of the benchmark: its worker's session would outlive it
        kill_group()
        process.wait()
        raise
    with open(log_file, "w") as handle:
        handle.write(f"$ {shlex.join(argv)}\n\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    result = parse_worker_output(stdout)
    if result is not None:
        return result, None
    last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
    reason = f"timed out after {timeout:.0f} s" if code is None else f"exit code {code}"
    return None, f"worker {reason}: {last[0]}"


def run_interleaved(args: argparse.Namespace, env: dict, dataset: str, configuration: str,
                    workdir: str) -> dict:
    """The interleaved compute measurement of every trainer of one configuration in one child process.

    The child gets ``nnUNet_n_proc_DA=0`` (its batches are fixed, no worker process may compete) and its own
    ``nnUNet_results`` (``<workdir>/interleaved_results``), so the model folders of the rows stay untouched.
    """
    log_file = os.path.join(workdir, "logs", f"{configuration}__interleaved.log")
    child_env = dict(env, nnUNet_n_proc_DA="0", nnUNet_results=os.path.join(workdir, "interleaved_results"))
    argv = worker_argv(args, dataset, configuration, ",".join(args.trainers), os.path.join(workdir, "unused"),
                       predict_cases=0, interleaved=True)
    timeout = args.worker_timeout * max(1, len(args.trainers))
    result, error = _run_child(argv, child_env, log_file, timeout)
    if result is None:
        return {"trainers": {}, "errors": {name: error for name in args.trainers}, "log": log_file}
    result["log"] = log_file
    return result


def run_one(args: argparse.Namespace, env: dict, dataset: str, configuration: str, trainer: str,
            workdir: str, round_index: int = 0) -> dict:
    """Run the worker for one (configuration, trainer) in a child process; return its result. Prediction is timed
    in the first round only."""
    suffix = "" if round_index == 0 else f"__round{round_index + 1}"
    log_file = os.path.join(workdir, "logs", f"{configuration}__{trainer}{suffix}.log")
    output = os.path.join(workdir, "predictions", configuration, trainer)
    argv = worker_argv(args, dataset, configuration, trainer, output,
                       predict_cases=None if round_index == 0 else 0)
    start = time.perf_counter()
    result, error = _run_child(argv, env, log_file, args.worker_timeout)
    if result is None:
        result = {"trainer": trainer, "configuration": configuration, "error": error}
    result["wall_s"] = time.perf_counter() - start
    if result.get("error"):
        result["log"] = log_file
    return result


def run_parent(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    command = shlex.join(["python", os.path.relpath(SCRIPT), *argv])
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    temporary = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="mmssl_benchmark_"))
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    env = benchmark_environment(args, workdir)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                           "nnUNet_n_proc_DA", "nnUNet_compile")})
    if args.phantom:
        dataset = prepare_phantom(args, workdir)
    else:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        dataset = maybe_convert_to_dataset_name(args.dataset)
    measured: dict[str, dict[str, list[dict]]] = {}  # configuration -> trainer -> its rows, one per round
    interleaved_runs: dict[str, dict] = {}
    worker_env = None
    interrupted = None
    try:
        for configuration in args.configurations:
            measured[configuration] = {trainer: [] for trainer in args.trainers}
            for round_index in range(args.rounds):
                for trainer in rotated(args.trainers, round_index):
                    tag = f"[{configuration}]" + (f" round {round_index + 1}/{args.rounds}" if args.rounds > 1 else "")
                    print(f"{tag} {trainer}: measuring ...", flush=True)
                    row = run_one(args, env, dataset, configuration, trainer, workdir, round_index)
                    worker_env = worker_env or row.get("env")
                    summary = f"{row['s_per_iter']:.3f} s/iter" if row.get("s_per_iter") is not None else "no timing"
                    error = f"; error: {row['error']} (log {row['log']})" if row.get("error") else ""
                    print(f"{tag} {trainer}: {summary} ({row['wall_s']:.0f} s){error}", flush=True)
                    measured[configuration][trainer].append(row)
            if args.interleaved_rounds > 0:
                print(f"[{configuration}] interleaved compute measurement of all trainers ...", flush=True)
                interleaved = run_interleaved(args, env, dataset, configuration, workdir)
                interleaved_runs[configuration] = interleaved
                for name, error in interleaved.get("errors", {}).items():
                    print(f"[{configuration}] interleaved {name}: error: {error} (log {interleaved['log']})",
                          flush=True)
    except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C, kill, timeout: report what was measured
        interrupted = "SIGINT" if isinstance(stop, KeyboardInterrupt) else f"exit {stop.code}"
        print(f"\ninterrupted ({interrupted}): the tables below hold the rows measured so far", flush=True)
    # the rows of every configuration measured so far, whole or (stopped) in part
    results: dict[str, list[dict]] = {}
    baselines: dict[str, str | None] = {}
    for configuration, by_trainer in measured.items():
        rows = [merge_rounds(by_trainer[t]) for t in args.trainers if by_trainer[t]]
        if not rows:
            continue
        if configuration in interleaved_runs:
            merge_interleaved(rows, interleaved_runs[configuration])
        baselines[configuration] = add_ratios(rows)
        results[configuration] = rows
    info = machine_info(args, worker_env)
    report = [format_header(info, command, date, dataset)]
    for configuration, rows in results.items():
        rounds = f" x {args.rounds} rounds" if args.rounds > 1 else ""
        interleaved = (f"; eff.ilv: {args.interleaved_rounds} x {args.interleaved_steps} interleaved steps on fixed "
                       f"batches" if args.interleaved_rounds > 0 else "")
        plans = "" if args.plans == DEFAULT_PLANS else f" on {args.plans}"
        title = (f"configuration {configuration}{plans} ({args.iterations} timed iterations{rounds} after "
                 f"{args.warmup} warm-up{interleaved}; prediction of {args.predict_cases} case(s), mirroring "
                 f"{'on' if args.mirror else 'off'})")
        report += ["", title, format_table(rows, baselines[configuration])]
        plans_used = sorted({row.get("plans") for row in rows if row.get("plans")})
        if len(plans_used) > 1:
            report.append("plans: " + "; ".join(f"{row['trainer']} {row['plans']}" for row in rows if row.get("plans")))
    print("\n" + "\n".join(report), flush=True)
    failed = any(row.get("error") for rows in results.values() for row in rows)
    summary = {"date": date, "command": command, "machine": info, "dataset": dataset, "workdir": workdir,
               "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
               "baselines": baselines, "results": results, "interrupted": interrupted}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
        print(f"\nresults written to {args.json}")
    if temporary and not args.keep_workdir and not failed and not interrupted:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"workdir (model folders, predictions, logs): {workdir}")
    return summary
