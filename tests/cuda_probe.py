"""Child process of ``tests/test_cuda.py``: real train steps of every trainer on one device, as facts in JSON.

    python tests/cuda_probe.py WORKDIR OUTPUT.json [cuda|cpu]

In its own process because nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` when it is
first imported. Builds a small two-modality phantom (3 labelled + 3 unlabelled cases, 3d_fullres planned with our
planner, unlabelled cases preprocessed), then for nnUNetTrainer and each of our trainers: constructs it as
``nnUNetv2_train`` does, ``on_train_start``, two warm-up steps, and one measured step on a fresh batch, during which
host-device synchronisations are counted (``torch.cuda.set_sync_debug_mode('warn')`` warns once per synchronising
call). Records the step's returned losses, whether every parameter is finite afterwards, whether nnU-Net's AMP is
active (GradScaler and float16 logits under autocast), the peak allocated memory of the step, and one inference
forward of one patch. Runs on ``cpu`` too (no syncs, no AMP), which is how the script itself is checked without a
GPU.
"""

import json
import math
import os
import sys
import warnings

TRAINERS = ("nnUNetTrainer", "PlainSupervisedTrainer", "MeanTeacherTrainer", "MemCifSupervisedTrainer",
            "MemCifSSLTrainer", "MMFMCMLTrainer")
DATASET_ID = 978
DATASET_NAME = "CudaProbe"


def _environment(workdir: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for key, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[key] = os.path.join(workdir, folder)
        os.makedirs(os.environ[key], exist_ok=True)
    os.environ.update(nnUNet_compile="false", nnUNet_n_proc_DA="0")
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    ext = os.path.join(root, "nnunet_mmssl", "nnunet_ext")
    paths = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if ext not in paths:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(paths + [ext])


def _build_dataset(workdir: str) -> str:
    from nnunet_mmssl.dataset_conversion import PHANTOM_LABEL_GLOB, PHANTOM_MODALITY_GLOBS, convert_dataset
    from nnunet_mmssl.dataset_conversion.phantom import make_phantom_cases
    from nnunet_mmssl.planners.plan_and_preprocess import plan_and_preprocess

    sources = make_phantom_cases(os.path.join(workdir, "phantom"), num_labeled=4, num_unlabeled=3,
                                 shape=(16, 48, 48), spacing=(2.0, 1.0, 1.0), seed=1)
    convert_dataset([os.path.join(sources, "labeled"), os.path.join(sources, "unlabeled")], PHANTOM_MODALITY_GLOBS,
                    PHANTOM_LABEL_GLOB, os.environ["nnUNet_raw"], DATASET_ID, DATASET_NAME, num_labeled=3,
                    num_test=1, seed=0, labels={"background": 0, "lesion": 1}, overwrite=True)
    plan_and_preprocess(DATASET_ID, ["3d_fullres"], num_processes=2, progress=lambda message: None)
    return f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"


def _counted_syncs(step, device) -> tuple[object, int]:
    """Run ``step()``; return its result and the number of synchronising CUDA calls it made (0 on CPU)."""
    import torch

    if device.type != "cuda":
        return step(), 0
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message).lower() for w in caught)


def probe_trainer(name: str, dataset: str, device) -> dict:
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    folder = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    trainer_class = recursive_find_trainer_class_by_name(name)
    plans = load_json(os.path.join(folder, "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args adds
    trainer = trainer_class(plans=plans, configuration="3d_fullres", fold="all",
                            dataset_json=load_json(os.path.join(folder, "dataset.json")), device=device)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    result = {"amp_grad_scaler": trainer.grad_scaler is not None}
    try:
        for _ in range(2):
            trainer.train_step(next(trainer.dataloader_train))
        batch = next(trainer.dataloader_train)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        outputs, syncs = _counted_syncs(lambda: trainer.train_step(batch), device)
        result["step_syncs"] = syncs
        result["losses"] = {key: float(np.asarray(value)) for key, value in outputs.items()}
        result["losses_finite"] = all(math.isfinite(v) for v in result["losses"].values())
        network = trainer.network.module if hasattr(trainer.network, "module") else trainer.network
        result["parameters_finite"] = all(bool(torch.isfinite(p).all()) for p in network.parameters())
        if device.type == "cuda":
            result["step_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        patch = [int(s) for s in trainer.configuration_manager.patch_size]
        x = torch.randn(1, trainer.num_input_channels, *patch, device=device)
        trainer.on_validation_epoch_start()  # eval mode; our networks return the fused logits only
        trainer.set_deep_supervision_enabled(False)  # as the predictor builds the network
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = network(x)
        result["inference_shape"] = list(logits.shape)
        result["inference_dtype"] = str(logits.dtype).replace("torch.", "")
        result["inference_finite"] = bool(torch.isfinite(logits).all())
    finally:
        for loader in ("dataloader_train", "dataloader_val", "dataloader_unlabeled"):
            if hasattr(getattr(trainer, loader, None), "_finish"):
                getattr(trainer, loader)._finish()
    return result


def main(argv: list[str]) -> int:
    workdir, output = argv[0], argv[1]
    device_name = argv[2] if len(argv) > 2 else "cuda"
    _environment(workdir)
    import torch

    device = torch.device(device_name)
    dataset = _build_dataset(workdir)
    results = {"device": device_name, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "trainers": {}}
    for name in TRAINERS:
        try:
            results["trainers"][name] = probe_trainer(name, dataset, device)
        except Exception as error:  # noqa: BLE001 - recorded per trainer, asserted by the test
            results["trainers"][name] = {"error": f"{type(error).__name__}: {error}"}
        print(name, json.dumps(results["trainers"][name]), flush=True)
    with open(output, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
