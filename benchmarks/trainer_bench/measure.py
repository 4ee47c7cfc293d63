"""What a worker measures of one trainer: timed steps with data-wait proxies, FLOPs, peak memory, the gradient share
of the unsupervised term, prediction, and the interleaved timing of several calls."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Iterator

from trainer_bench.cases import case_file_lists, cases_by_modality
from trainer_bench.report import prototype_share
from trainer_bench.rows import rotated


class WaitTimer:
    """Iterator proxy that accumulates the time spent in ``next(inner)`` (waiting for a batch).

    Attribute access falls through to the wrapped iterator. nnU-Net shuts its augmenters down with an ``isinstance``
    check, so put the original back (:attr:`inner`) before ``on_train_end``.
    """

    def __init__(self, inner: Iterator, clock=time.perf_counter):
        self.inner = inner
        self.clock = clock
        self.seconds = 0.0
        self.calls = 0

    def __iter__(self):
        return self

    def __next__(self):
        start = self.clock()
        try:
            return next(self.inner)
        finally:
            self.seconds += self.clock() - start
            self.calls += 1

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __getattr__(self, name):
        if name == "inner":  # not yet set (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def effective_batch_size(trainer) -> tuple[int, int]:
    """(labelled, unlabelled) patches per training step; unlabelled is 0 without an unlabelled stream.

    A trainer with one loader per modality (DBDC: ``dataloader_train.loaders``, ``dataloader_unlabeled`` a list with
    None where a modality has no unlabelled case) draws a batch from each loader per step.
    """
    batch = int(trainer.batch_size)
    loaders = getattr(getattr(trainer, "dataloader_train", None), "loaders", None)
    labelled = batch * (len(loaders) if isinstance(loaders, (list, tuple)) else 1)
    unlabelled = 0
    stream = getattr(trainer, "dataloader_unlabeled", None)
    if getattr(trainer, "use_unlabeled", False) and stream is not None:
        per_batch = int(getattr(trainer, "unlabeled_batch_size", None) or batch)
        streams = sum(s is not None for s in stream) if isinstance(stream, (list, tuple)) else 1
        unlabelled = per_batch * streams
    return labelled, unlabelled


def wrap_unlabeled(stream):
    """``stream`` behind :class:`WaitTimer` proxies: one for an iterator, one per loader for a list of loaders (None
    kept). Returns (the wrapped stream, the timers)."""
    if isinstance(stream, (list, tuple)):
        wrapped = [None if s is None else WaitTimer(s) for s in stream]
        return wrapped, [w for w in wrapped if w is not None]
    timer = WaitTimer(stream)
    return timer, [timer]


def unwrap_unlabeled(stream):
    """The original stream of :func:`wrap_unlabeled`'s result (anything else unchanged)."""
    if isinstance(stream, list):
        return [s.inner if isinstance(s, WaitTimer) else s for s in stream]
    return stream.inner if isinstance(stream, WaitTimer) else stream


def format_errors(error: BaseException, limit: int = 300) -> str:
    """One line: ``Type: message`` (shortened)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


def _ru_maxrss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _vm_hwm_mib() -> float | None:
    """Peak RSS of this process's own address space (``VmHWM`` of /proc/self/status, Linux), or None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib() -> tuple[float, str]:
    """(peak RSS in MiB, how it was read). Linux keeps ``ru_maxrss`` across ``execve``, so a worker started by a big
    parent reports at least the parent's RSS at fork time; ``VmHWM`` belongs to the worker's own address space and
    is preferred where it exists."""
    hwm = _vm_hwm_mib()
    if hwm is not None:
        return hwm, "peak RSS (VmHWM)"
    return _ru_maxrss_mib(), "peak RSS (ru_maxrss)"


def _bare_network(trainer):
    from torch._dynamo import OptimizedModule

    module = trainer.network.module if getattr(trainer, "is_ddp", False) else trainer.network
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def _network_for_inference(trainer):
    """The trainer's bare network as ``nnUNetv2_predict`` runs it: eval mode and no deep supervision, through the
    trainer's own hooks (ours also switch their networks to the fused output alone)."""
    trainer.on_validation_epoch_start()
    trainer.set_deep_supervision_enabled(False)
    network = _bare_network(trainer)
    if hasattr(network, "set_inference_modality"):  # unregistered models predict one modality at a time
        network.set_inference_modality(0)
    return network


def _finish_augmenters(trainer) -> None:
    for name in ("dataloader_train", "dataloader_val", "dataloader_unlabeled"):
        loader = getattr(trainer, name, None)
        for one in loader if isinstance(loader, (list, tuple)) else [loader]:
            if isinstance(one, WaitTimer):
                one = one.inner
            if hasattr(one, "_finish"):
                try:
                    one._finish()
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass


def _sync(device) -> None:
    """Wait for the GPU (timings of CUDA work); nothing on CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def measure_training(trainer, args, result: dict) -> None:
    """Timed steps with waiting proxies, one FLOP-counted step, peak memory and the memory estimate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cuda = trainer.device.type == "cuda"
    labelled, unlabelled = effective_batch_size(trainer)
    result.update(batch_labeled=labelled, batch_unlabeled=unlabelled,
                  patch_size=[int(p) for p in trainer.configuration_manager.patch_size])
    network = _bare_network(trainer)
    feature_map = int(network.compute_conv_feature_map_size(trainer.configuration_manager.patch_size))
    result.update(feature_map_size=feature_map, memory_estimate=feature_map * (labelled + unlabelled))
    # the step's estimate over what its plans budget (1 for nnU-Net's trainer on nnU-Net's plans, by definition)
    result["budget_ratio"] = trainer.memory_check()["ratio"] if hasattr(trainer, "memory_check") else 1.0

    train_proxy = WaitTimer(trainer.dataloader_train)
    trainer.dataloader_train = train_proxy
    unlabelled_proxies = []
    if getattr(trainer, "dataloader_unlabeled", None) is not None:
        trainer.dataloader_unlabeled, unlabelled_proxies = wrap_unlabeled(trainer.dataloader_unlabeled)
    proxies = [train_proxy, *unlabelled_proxies]

    for _ in range(args.warmup):
        trainer.train_step(next(trainer.dataloader_train))
    _sync(trainer.device)
    result["rss_before_steps_mib"] = _current_rss_mib()
    for proxy in proxies:
        proxy.reset()
    has_prototypes = getattr(trainer, "prototype_bank", None) is not None and hasattr(trainer, "_prototype_seconds")
    if has_prototypes:
        trainer._prototype_seconds = 0.0
    step_seconds = []
    for _ in range(args.iterations):
        _sync(trainer.device)
        start = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        _sync(trainer.device)
        step_seconds.append(time.perf_counter() - start)
    total = sum(step_seconds)
    wait_labelled = train_proxy.seconds
    wait_unlabelled = sum(p.seconds for p in unlabelled_proxies)
    result.update(s_per_iter=total / len(step_seconds), s_per_iter_min=min(step_seconds),
                  s_per_iter_median=sorted(step_seconds)[len(step_seconds) // 2], step_seconds=step_seconds,
                  data_wait_s=wait_labelled + wait_unlabelled, data_wait_labeled_s=wait_labelled,
                  data_wait_unlabeled_s=wait_unlabelled, data_wait_fraction=(wait_labelled + wait_unlabelled) / total)
    if has_prototypes:  # read before the FLOP-counted and gradient-share steps add to it
        result["prototype_s"] = float(trainer._prototype_seconds)
        result["prototype_share"] = prototype_share(result["prototype_s"], total)

    # one more real step (its batch from the loaders, its optimizer step) inside the FLOP counter
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(next(trainer.dataloader_train))
    _sync(trainer.device)
    result["flops_per_iter"] = int(counter.get_total_flops())
    result["unsup_grad_share"] = measure_gradient_share(trainer, args.share_steps)

    if cuda:
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2 ** 20
        result["peak_mem_reserved_mib"] = torch.cuda.max_memory_reserved(trainer.device) / 2 ** 20
        result["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_mem_mib"], result["peak_mem_kind"] = peak_rss_mib()
        result["ru_maxrss_mib"] = _ru_maxrss_mib()
    baseline = result.get("rss_after_imports_mib") if not cuda else 0.0
    if result.get("peak_mem_mib") is not None and baseline is not None:
        result["train_mem_mib"] = result["peak_mem_mib"] - baseline


def measure_gradient_share(trainer, steps: int) -> float | None:
    """Median gradient share of the unsupervised term over ``steps`` real steps, at the trainer's full weight.

    ``|grad(w L_unsup)|`` is linear in ``w``, so a share measured while the weight ramps up is scaled to
    ``unsupervised_weight`` (the weight after the ramp). None for trainers without an unlabelled stream.
    """
    import numpy as np

    if steps <= 0 or not getattr(trainer, "use_unlabeled", False) or not hasattr(trainer, "gradient_share_every"):
        return None
    every, trainer.gradient_share_every = trainer.gradient_share_every, 1
    shares = []
    try:
        for _ in range(steps):
            weight = trainer.current_unsupervised_weight()
            share = float(trainer.train_step(next(trainer.dataloader_train))["grad_share"])
            if weight > 0 and np.isfinite(share):
                shares.append(share * trainer.unsupervised_weight / weight)
    finally:
        trainer.gradient_share_every = every
    return float(np.median(shares)) if shares else None


def measure_prediction(model_folder: str, fold, args, device, dataset_name: str, dataset_json: dict,
                       output_folder: str, result: dict) -> None:
    """Time nnUNetPredictor.predict_from_files on the first ``--predict-cases`` cases (imagesTs, then imagesTr)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_raw

    raw = os.path.join(nnUNet_raw.require(), dataset_name)
    ending = dataset_json["file_ending"]
    cases: list[tuple[str, list[str]]] = []
    for sub in ("imagesTs", "imagesTr"):
        folder = os.path.join(raw, sub)
        if os.path.isdir(folder) and len(cases) < args.predict_cases:
            files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
            cases += case_file_lists(files, ending, args.predict_cases - len(cases))
    if not cases:
        raise FileNotFoundError(f"no images to predict in {raw}/imagesTs or imagesTr")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.mirror,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(fold,),
                                                   checkpoint_name="checkpoint_final.pth")
    network_seconds = []
    predict_logits = predictor.predict_logits_from_preprocessed_data

    def timed_predict_logits(data):  # the network part of each case (weights loading + sliding window)
        start = time.perf_counter()
        logits = predict_logits(data)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        network_seconds.append(time.perf_counter() - start)
        return logits

    predictor.predict_logits_from_preprocessed_data = timed_predict_logits
    os.makedirs(output_folder, exist_ok=True)
    with open(os.path.join(raw, "dataset.json")) as handle:  # the raw one records every case's modality
        groups = cases_by_modality(cases, (json.load(handle).get("mmssl") or {}).get("case_modality"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for modality, group in groups:
        if modality is not None:  # an unregistered model: each case normalised and predicted as its modality
            from nnunet_mmssl.cli.predict import select_modality

            select_modality(predictor, modality, model_folder)
        predictor.predict_from_files([files for _, files in group], [os.path.join(output_folder, c) for c, _ in group],
                                     save_probabilities=False, overwrite=True, num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["predict_peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    seconds = time.perf_counter() - start
    result.update(predict_cases=len(cases), predict_s=seconds, predict_s_per_case=seconds / len(cases),
                  predict_network_s_per_case=sum(network_seconds) / len(network_seconds) if network_seconds else None)


def interleave(calls: dict, rounds: int, repeats: int, device, errors: dict) -> dict[str, list[float]]:
    """Time ``calls[name]()`` ``repeats`` times per name and round, the order rotated each round.

    A call that raises is recorded in ``errors`` (name -> message) and left out of later rounds.

    Returns:
        name -> the seconds of each timed call.
    """
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds):
        for name in rotated(list(calls), round_index):
            if name in errors:
                continue
            try:
                for _ in range(repeats):
                    _sync(device)
                    start = time.perf_counter()
                    calls[name]()
                    _sync(device)
                    seconds[name].append(time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001 - reported per name, the others go on
                errors[name] = format_errors(error)
                traceback.print_exc()
    return seconds


def _inference_autocast(device):
    """Autocast as nnU-Net's predictor uses it: on CUDA only."""
    import contextlib

    import torch

    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext()
