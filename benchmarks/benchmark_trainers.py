"""Time nnU-Net's own ``nnUNetTrainer`` and each of our trainers on the same dataset and plans; print a table.

    python benchmarks/benchmark_trainers.py [-d DATASET_ID] [-c 2d 3d_fullres] [-tr nnUNetTrainer MemCifSSLTrainer ...]
        [--iterations 20] [--warmup 3] [-device cpu|cuda] [--predict-cases 2] [--phantom] [--workdir DIR]
        [--json OUT.json]

Without ``-d`` (or with ``--phantom``) the script builds its own small two-modality phantom dataset in ``--workdir``
(default: a temporary folder) -- convert + nnU-Net planning/preprocessing of the requested configurations, labelled
and unlabelled cases -- and points nnU-Net's ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` at it.
With ``-d`` it reads your ``nnUNet_raw`` / ``nnUNet_preprocessed``; model folders always go to
``<workdir>/nnUNet_results`` so that no trained model of yours is overwritten.

Each (configuration, trainer) is measured in its own child process (this script with the hidden ``--worker`` flag,
printing one ``BENCHMARK_RESULT {json}`` line) so that peak memory is that trainer's alone. What is measured and how
is described in ``benchmarks/README.md``.

The code is the package ``benchmarks/trainer_bench/`` (one module per concern, see its ``__init__``); this file is
its entry point and re-exports every name it had before the split, for ``benchmarks/device/gpu_check.py`` and the
tests that load it by path.
"""

import os
import sys

_BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
if _BENCHMARKS not in sys.path:  # loaded by path (tests, gpu_check.py) rather than run as a script
    sys.path.insert(0, _BENCHMARKS)

from trainer_bench import cases, cli, measure, parent, report, rows, worker  # noqa: E402
from trainer_bench.cases import (  # noqa: E402
    PHANTOM_ID,
    PHANTOM_MARKER,
    PHANTOM_NAME,
    UNREGISTERED_PHANTOM_ID,
    UNREGISTERED_PHANTOM_MARKER,
    UNREGISTERED_PHANTOM_NAME,
    _reuse_phantom,
    benchmark_environment,
    case_file_lists,
    cases_by_modality,
    plan_in_child,
    prepare_phantom,
    prepare_unregistered_phantom,
    unregistered_geometry,
)
from trainer_bench.cli import (  # noqa: E402
    build_parser,
    default_n_proc_da,
    main,
    parse_args,
)
from trainer_bench.measure import (  # noqa: E402
    WaitTimer,
    _bare_network,
    _current_rss_mib,
    _finish_augmenters,
    _inference_autocast,
    _network_for_inference,
    _ru_maxrss_mib,
    _sync,
    _vm_hwm_mib,
    effective_batch_size,
    format_errors,
    interleave,
    measure_gradient_share,
    measure_prediction,
    measure_training,
    peak_rss_mib,
    unwrap_unlabeled,
    wrap_unlabeled,
)
from trainer_bench.parent import (  # noqa: E402
    RESULT_MARKER,
    _run_child,
    exit_on_sigterm,
    parse_worker_output,
    run_interleaved,
    run_one,
    run_parent,
    worker_argv,
)
from trainer_bench.report import (  # noqa: E402
    COLUMNS,
    _cell,
    _compute_seconds,
    _cpu_model,
    add_ratios,
    efficiency,
    format_header,
    format_table,
    machine_info,
    merge_interleaved,
    merge_rounds,
    paired_time_ratio,
    prototype_share,
    ratio,
)
from trainer_bench.rows import (  # noqa: E402
    BASELINE_TRAINER,
    DEFAULT_CONFIGURATIONS,
    DEFAULT_TRAINERS,
    PHANTOM_KINDS,
    UNREGISTERED_TRAINER_PREFIXES,
    build_trainer,
    choose_baseline,
    resolve_phantom_kind,
    rotated,
)
from trainer_bench.worker import (  # noqa: E402
    run_interleaved_worker,
    run_worker,
    worker_setup,
)

__all__ = [
    "cases",
    "cli",
    "measure",
    "parent",
    "report",
    "rows",
    "worker",
    "BASELINE_TRAINER",
    "build_trainer",
    "choose_baseline",
    "DEFAULT_CONFIGURATIONS",
    "DEFAULT_TRAINERS",
    "PHANTOM_KINDS",
    "resolve_phantom_kind",
    "rotated",
    "UNREGISTERED_TRAINER_PREFIXES",
    "add_ratios",
    "_cell",
    "COLUMNS",
    "_compute_seconds",
    "_cpu_model",
    "efficiency",
    "format_header",
    "format_table",
    "machine_info",
    "merge_interleaved",
    "merge_rounds",
    "paired_time_ratio",
    "prototype_share",
    "ratio",
    "benchmark_environment",
    "case_file_lists",
    "cases_by_modality",
    "PHANTOM_ID",
    "PHANTOM_MARKER",
    "PHANTOM_NAME",
    "plan_in_child",
    "prepare_phantom",
    "prepare_unregistered_phantom",
    "_reuse_phantom",
    "unregistered_geometry",
    "UNREGISTERED_PHANTOM_ID",
    "UNREGISTERED_PHANTOM_MARKER",
    "UNREGISTERED_PHANTOM_NAME",
    "_bare_network",
    "_current_rss_mib",
    "effective_batch_size",
    "_finish_augmenters",
    "format_errors",
    "_inference_autocast",
    "interleave",
    "measure_gradient_share",
    "measure_prediction",
    "measure_training",
    "_network_for_inference",
    "peak_rss_mib",
    "_ru_maxrss_mib",
    "_sync",
    "unwrap_unlabeled",
    "_vm_hwm_mib",
    "WaitTimer",
    "wrap_unlabeled",
    "run_interleaved_worker",
    "run_worker",
    "worker_setup",
    "exit_on_sigterm",
    "parse_worker_output",
    "RESULT_MARKER",
    "_run_child",
    "run_interleaved",
    "run_one",
    "run_parent",
    "worker_argv",
    "build_parser",
    "default_n_proc_da",
    "main",
    "parse_args",
]


if __name__ == "__main__":
    sys.exit(main())
