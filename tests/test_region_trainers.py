"""Every trainer of ours trains on an nnU-Net region dataset (sigmoid outputs, BraTS-style nested regions).

Each trainer is built by nnU-Net's own code on the fixture plans with a region ``dataset.json`` and takes steps on a
fixed batch whose targets are region masks (what nnU-Net's ConvertSegmentationToRegionsTransform produces): the
objective must be finite and fall, and the output heads must be one per region.
"""

import copy
import math
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import trainer_harness  # noqa: E402
from plans_fixtures import DATASET_JSON  # noqa: E402

REGION_JSON = {**DATASET_JSON, "labels": {"background": 0, "whole": [1, 2], "core": [2]}, "regions_class_order": [1, 2]}
TRAINERS = ["MemCifSSLTrainer", "MMFMCMLTrainer", "MeanTeacherTrainer", "PlainSupervisedTrainer", "DBDCTrainer",
            "SMMLTrainer", "SMMLSSLTrainer", "ModalityDropoutTrainer"]


@pytest.fixture(scope="module", autouse=True)
def folders():
    trainer_harness.set_folders(tempfile.mkdtemp(prefix="region-trainers-"))


def _region_batches(trainer, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(patch)]
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 3, (trainer.batch_size, 1, *patch), generator=generator)
        regions = torch.cat([(labels >= 1), (labels == 2)], 1).float()  # whole = {1, 2}, core = {2}
        target = [torch.nn.functional.interpolate(regions, scale_factor=s, mode="nearest-exact") if s[0] != 1
                  else regions for s in scales]
        data = torch.randn((trainer.batch_size, trainer.num_input_channels, *patch), generator=generator)
        unlabeled = torch.randn((trainer.unlabeled_batch_size_per_rank(), trainer.num_input_channels, *patch),
                                generator=generator)
        batches.append(({"data": data, "target": target}, {"data": unlabeled}))
    return batches


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_learns_on_regions(name):
    import nnunet_mmssl.trainers as trainers

    torch.manual_seed(0)
    cls = getattr(trainers, name)
    trainer = cls(trainer_harness.plans(), "2d", 0, copy.deepcopy(REGION_JSON), torch.device("cpu"))
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.initialize()
    assert trainer.label_manager.has_regions and trainer.label_manager.num_segmentation_heads == 2
    batches = _region_batches(trainer, 1, seed=0) * 4
    if name == "DBDCTrainer":  # one (labelled, unlabelled) batch per modality: K = 1 here (a registered dataset)
        trainer.on_train_epoch_start()
        outputs = []
        for index, (labelled, unlabelled) in enumerate(batches):
            trainer.dataloader_unlabeled = [iter([unlabelled])]
            torch.manual_seed(index)
            outputs.append(trainer.train_step({"modality_batches": [labelled]}))
    else:
        outputs = trainer_harness.run_steps(trainer, batches, seed=0)
    objectives = [float(o["objective"]) for o in outputs]
    assert all(math.isfinite(v) for v in objectives), objectives
    assert objectives[-1] < objectives[0], objectives
    network = trainer.network_module.eval()
    if hasattr(network, "return_heads"):
        network.return_heads = False  # as at validation and prediction
    with torch.no_grad():
        out = network(batches[0][0]["data"][:1])
    while isinstance(out, (list, tuple)):
        out = out[0]
    assert out.shape[1] == 2  # one sigmoid output per region
