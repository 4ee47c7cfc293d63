"""The trainer benchmark behind ``benchmarks/benchmark_trainers.py`` (its command line and output are that script's).

Modules, each importing only those above it:

- :mod:`trainer_bench.rows`: which rows are measured (trainers, configurations, the baseline row, the phantom a
  trainer needs) and how a row's trainer is built on its plans (``-p`` / ``--mmssl-plans``).
- :mod:`trainer_bench.report`: ratios to the baseline, rounds merged into one row, the table and its header.
- :mod:`trainer_bench.cases`: data and plans: the environment of the processes, the registered and unregistered
  phantoms (convert + plan + preprocess, reused while their recipe is unchanged), the case files predicted.
- :mod:`trainer_bench.measure`: what is measured of one trainer (timed steps, data wait, FLOPs, peak memory, gradient
  share, prediction, interleaved timings).
- :mod:`trainer_bench.worker`: one child process (``--worker``): one row, or the interleaved measurement.
- :mod:`trainer_bench.parent`: the parent: the children, the merged rows, the tables, the JSON.
- :mod:`trainer_bench.cli`: the arguments and ``main``.

The package is imported as ``trainer_bench`` with ``benchmarks/`` on ``sys.path`` (the entry point puts it there).
"""
