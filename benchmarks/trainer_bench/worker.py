"""One child process of the benchmark (hidden ``--worker`` flag): one (configuration, trainer) row, or the
interleaved compute measurement of all trainers of one configuration."""

from __future__ import annotations

import argparse
import os
import statistics
import traceback

from trainer_bench.measure import (
    _current_rss_mib,
    _finish_augmenters,
    _inference_autocast,
    _network_for_inference,
    _sync,
    format_errors,
    interleave,
    measure_prediction,
    measure_training,
    unwrap_unlabeled,
)
from trainer_bench.rows import build_trainer


def worker_setup(args: argparse.Namespace):
    """What every worker process does first: torch threads, device and cuDNN as ``nnUNetv2_train``, the dataset.

    Returns:
        (device, dataset name, preprocessed dataset folder, dataset.json).
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # as nnUNetv2_train
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    dataset_name = maybe_convert_to_dataset_name(args.dataset)
    folder = os.path.join(nnUNet_preprocessed.require(), dataset_name)
    return device, dataset_name, folder, load_json(os.path.join(folder, "dataset.json"))


def run_interleaved_worker(args: argparse.Namespace) -> dict:
    """Interleaved compute measurement of the comma-separated ``--worker-trainer`` list in this one process.

    Every trainer is built and started, draws one labelled batch and (if it has a stream) one unlabelled batch, and
    its augmenters are shut down; its unlabelled stream becomes an endless repeat of that batch. After ``--warmup``
    steps and one FLOP-counted step each, ``--interleaved-rounds`` rounds of ``--interleaved-steps`` timed
    ``train_step`` calls per trainer follow, the order rotated each round; then the same for one inference forward
    of one patch. So every trainer repeats the same work as in its own row minus data loading, sampled in every
    round; :func:`paired_time_ratio` compares trainers within each round (the fastest repetition and the median
    over the run are kept too). Run with ``nnUNet_n_proc_DA=0`` (no worker processes compete).
    """
    import functools
    import itertools

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_mmssl.trainers.cpu_allocator import keep_freed_memory_in_process

    names = [n for n in args.worker_trainer.split(",") if n]
    result: dict = {"configuration": args.worker_configuration, "trainers": {}, "errors": {},
                    "repeats": args.interleaved_steps}
    # one process for all trainers: the allocator setting our trainers make on CPU would otherwise reach the trainers
    # built before them in some rounds and not in others; set it for all, so that eff.ilv compares compute alone
    result["keep_freed_memory"] = keep_freed_memory_in_process() if args.device == "cpu" else False
    device, _, folder, dataset_json = worker_setup(args)
    ready = {}
    for name in names:
        try:
            trainer, _ = build_trainer(args, name, device, folder, dataset_json)
            trainer.on_train_start()
            trainer.on_train_epoch_start()
            batch = next(trainer.dataloader_train)
            stream = getattr(trainer, "dataloader_unlabeled", None)
            if isinstance(stream, (list, tuple)):  # one loader per modality (DBDC)
                unlabelled = [None if s is None else next(s) for s in stream]
            else:
                unlabelled = None if stream is None else next(stream)
            _finish_augmenters(trainer)
            if isinstance(unlabelled, list):
                trainer.dataloader_unlabeled = [None if u is None else itertools.repeat(u) for u in unlabelled]
            elif unlabelled is not None:
                trainer.dataloader_unlabeled = itertools.repeat(unlabelled)
            for _ in range(args.warmup):
                trainer.train_step(batch)
            with FlopCounterMode(display=False) as counter:
                trainer.train_step(batch)
            _sync(device)
            ready[name] = (trainer, batch)
            result["trainers"][name] = {"flops_per_iter": int(counter.get_total_flops())}
        except Exception as error:  # noqa: BLE001 - reported per trainer
            result["errors"][name] = format_errors(error)
            traceback.print_exc()
    order = [n for n in names if n in ready]
    steps = interleave({name: functools.partial(ready[name][0].train_step, ready[name][1]) for name in order},
                       args.interleaved_rounds, args.interleaved_steps, device, result["errors"])
    for name in order:
        result["trainers"][name]["step_seconds"] = steps[name]
    # inference: the network as nnUNetv2_predict runs it (eval, no deep supervision, mean of the heads) on one patch
    patches = {}
    for name in order:
        if name in result["errors"]:
            continue
        trainer, _ = ready[name]
        try:
            network = _network_for_inference(trainer)
            patch = torch.randn((1, trainer.num_input_channels, *trainer.configuration_manager.patch_size),
                                device=device)
            with torch.no_grad(), _inference_autocast(device):
                network(patch)
                with FlopCounterMode(display=False) as counter:
                    network(patch)
            result["trainers"][name]["inference_flops_per_patch"] = int(counter.get_total_flops())
            patches[name] = (network, patch)
        except Exception as error:  # noqa: BLE001 - reported per trainer
            result["errors"][name] = f"inference: {format_errors(error)}"
            traceback.print_exc()
    with torch.no_grad(), _inference_autocast(device):
        forwards = interleave({name: functools.partial(network, patch) for name, (network, patch) in patches.items()},
                              args.interleaved_rounds, args.interleaved_steps, device, result["errors"])
    for name, seconds in forwards.items():
        result["trainers"][name]["inference_seconds"] = seconds
    for name in order:
        entry = result["trainers"][name]
        if entry.get("step_seconds"):
            entry["s_per_iter_min"] = min(entry["step_seconds"])
            entry["s_per_iter_median"] = statistics.median(entry["step_seconds"])
        if entry.get("inference_seconds"):
            entry["inference_s_min"] = min(entry["inference_seconds"])
            entry["inference_s_median"] = statistics.median(entry["inference_seconds"])
    return result


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one (configuration, trainer) in this process; return the result dict (``error`` on failure)."""
    result: dict = {"trainer": args.worker_trainer, "configuration": args.worker_configuration}
    errors: list[str] = []
    trainer = None
    try:
        import torch

        device, dataset_name, folder, dataset_json = worker_setup(args)
        result["env"] = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                         "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                         "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
                         "nnUNet_compile": os.environ.get("nnUNet_compile")}
        fold = "all" if args.fold == "all" else int(args.fold)
        result["rss_after_imports_mib"] = _current_rss_mib()  # the process's baseline, before any trainer exists
        trainer, result["plans"] = build_trainer(args, args.worker_trainer, device, folder, dataset_json)
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        try:
            measure_training(trainer, args, result)
        except Exception as error:  # noqa: BLE001 - reported in the row
            errors.append(f"training: {format_errors(error)}")
            traceback.print_exc()
        finally:
            trainer.dataloader_train = unwrap_unlabeled(trainer.dataloader_train)
            if getattr(trainer, "dataloader_unlabeled", None) is not None:
                trainer.dataloader_unlabeled = unwrap_unlabeled(trainer.dataloader_unlabeled)
            try:
                trainer.on_train_end()  # writes checkpoint_final.pth and shuts the augmenters down
            except Exception as error:  # noqa: BLE001
                errors.append(f"on_train_end: {format_errors(error)}")
                traceback.print_exc()
                _finish_augmenters(trainer)
        checkpoint = os.path.join(trainer.output_folder, "checkpoint_final.pth")
        trainer.save_checkpoint(checkpoint)
        model_folder = trainer.output_folder_base
        del trainer.network, trainer.optimizer
        trainer = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.predict_cases > 0:
            try:
                measure_prediction(model_folder, fold, args, device, dataset_name, dataset_json,
                                   args.worker_output, result)
            except Exception as error:  # noqa: BLE001
                errors.append(f"prediction: {format_errors(error)}")
                traceback.print_exc()
    except Exception as error:  # noqa: BLE001
        errors.append(format_errors(error))
        traceback.print_exc()
        if trainer is not None:
            _finish_augmenters(trainer)
    if errors:
        result["error"] = "; ".join(errors)
    return result
