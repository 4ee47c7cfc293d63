"""Child process of ``tests/test_cuda.py``: real train steps of every trainer on one device, as facts in JSON.

    python tests/cuda_probe.py WORKDIR OUTPUT.json [cuda|cpu]

In its own process because nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` when it is
first imported. Builds, with the benchmark script's own helpers, a small two-modality phantom (3 labelled + 3
unlabelled cases, 3d_fullres planned with our planner, unlabelled cases preprocessed), then for nnUNetTrainer and
each of our trainers: constructs it as ``nnUNetv2_train`` does (the benchmark's ``build_trainer``),
``on_train_start``, two warm-up steps, and one measured step on a fresh batch, during which host-device
synchronisations are counted (``torch.cuda.set_sync_debug_mode('warn')`` warns once per synchronising
call). Records the step's returned losses, whether every parameter is finite afterwards, whether nnU-Net's AMP is
active (GradScaler and float16 logits under autocast), the peak allocated memory of the step, and one inference
forward of one patch. Runs on ``cpu`` too (no syncs, no AMP), which is how the script itself is checked without a
GPU.
"""

import importlib.util
import json
import math
import os
import sys
import warnings

TRAINERS = ("nnUNetTrainer", "PlainSupervisedTrainer", "MeanTeacherTrainer", "MemCifSupervisedTrainer",
            "MemCifSSLTrainer", "MMFMCMLTrainer", "SMMLTrainer", "SMMLSSLTrainer", "ModalityDropoutTrainer")
# DBDC needs the unregistered phantom (benchmarks/benchmark_trainers.py --phantom-kind unregistered): not probed here
BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                         "benchmark_trainers.py")


def _benchmark_module():
    """The benchmark script as a module: its phantom, environment and trainer construction are reused here."""
    spec = importlib.util.spec_from_file_location("benchmark_trainers", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arguments(bench, workdir: str, device_name: str):
    return bench.parse_args(["-c", "3d_fullres", "-device", device_name, "--phantom-shape", "16", "48", "48",
                             "--phantom-spacing", "2", "1", "1", "--phantom-cases", "3", "3", "--predict-cases", "1",
                             "--n-proc-da", "0", "-np", "2", "--workdir", workdir])


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


def probe_trainer(bench, args, name: str, device, folder: str, dataset_json: dict) -> dict:
    import numpy as np
    import torch

    trainer, _ = bench.build_trainer(args, name, device, folder, dataset_json)
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
        network = bench._bare_network(trainer)
        result["parameters_finite"] = all(bool(torch.isfinite(p).all()) for p in network.parameters())
        if device.type == "cuda":
            result["step_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        patch = [int(s) for s in trainer.configuration_manager.patch_size]
        x = torch.randn(1, trainer.num_input_channels, *patch, device=device)
        with torch.no_grad(), bench._inference_autocast(device):
            logits = bench._network_for_inference(trainer)(x)
        result["inference_shape"] = list(logits.shape)
        result["inference_dtype"] = str(logits.dtype).replace("torch.", "")
        result["inference_finite"] = bool(torch.isfinite(logits).all())
    finally:
        bench._finish_augmenters(trainer)
    return result


def main(argv: list[str]) -> int:
    workdir, output = argv[0], argv[1]
    device_name = argv[2] if len(argv) > 2 else "cuda"
    bench = _benchmark_module()
    args = _arguments(bench, workdir, device_name)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    os.environ.update(bench.benchmark_environment(args, workdir))  # before nnU-Net is imported: it reads its paths
    import torch

    args.dataset = bench.prepare_phantom(args, workdir)
    args.worker_configuration = "3d_fullres"
    device, _, folder, dataset_json = bench.worker_setup(args)
    results = {"device": device_name, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "trainers": {}}
    for name in TRAINERS:
        try:
            results["trainers"][name] = probe_trainer(bench, args, name, device, folder, dataset_json)
        except Exception as error:  # noqa: BLE001 - recorded per trainer, asserted by the test
            results["trainers"][name] = {"error": f"{type(error).__name__}: {error}"}
        print(name, json.dumps(results["trainers"][name]), flush=True)
    with open(output, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
