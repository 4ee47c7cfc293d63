"""DBDC variants as tiny subclasses (paper's ablations), its supervised twin and the pooled plain U-Net.

All train on the same split and plans as :class:`~nnunet_mmssl.trainers.dbdc.DBDCTrainer`:

* Table I: ``DBDCTrainer_noMLPB_noMAW`` (MLMB + dual consistency only), ``DBDCTrainer_noMAW``.
* Table III (loss components, each row adds one): ``DBDCTrainer_lossNone`` (supervised + L_pseg, no unlabelled
  data), ``DBDCTrainer_lossIpc``, ``DBDCTrainer_lossIpcFpc``, ``DBDCTrainer_lossIpcFpcMc``,
  ``DBDCTrainer_lossIpcFpcMcPc``; the full set is DBDCTrainer.
* Table IV (where the norms are per modality): ``DBDCTrainer_mlmbNone``, ``DBDCTrainer_mlmbEncoder``,
  ``DBDCTrainer_mlmbEncoderBottleneck``; everywhere is DBDCTrainer.
* ``DBDCSupervisedTrainer``: the same network and losses on the labelled cases only (no unlabelled stream).
* ``PooledUNetTrainer``: nnU-Net's trainer and U-Net of the plans (plain, or ResEnc's residual-encoder U-Net) on all
  modalities pooled (the paper's "UNet" rows), its network wrapped in a modality guard so that prediction needs
  ``--modality`` as DBDC's does.

Every variant builds its network on the plans' U-Net, like DBDCTrainer (``DBDCUNet`` or ``DBDCResEncUNet``).
"""

import copy

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_pickle
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_mmssl.architectures.dbdc import GUARDED_NETWORKS, architecture_on_base
from nnunet_mmssl.planners.modality_normalization import MODALITY_PROPERTY
from nnunet_mmssl.safe_load import check_configuration_manager
from nnunet_mmssl.trainers.checkpoint_io import SafeLoadingMixin
from nnunet_mmssl.trainers.dbdc import DBDCTrainer, plan_modalities, write_summary_per_modality


class DBDCTrainer_noMLPB_noMAW(DBDCTrainer):
    """Paper Table I "Ours w/o MLPB & MAW": norm banks and dual consistency, no prototypes, equal weights."""

    use_prototypes = False
    use_maw = False


class DBDCTrainer_noMAW(DBDCTrainer):
    """Paper Table I "Ours w/o MAW": equal modality weights."""

    use_maw = False


class DBDCTrainer_lossNone(DBDCTrainer):
    """Paper Table III row 1: no L_ipc, L_fpc, L_mc, L_pc, L_pd (supervised loss + L_pseg)."""

    use_unlabeled = False
    consistency_terms = ()
    mpcl_terms = ("pseg",)


class DBDCTrainer_lossIpc(DBDCTrainer):
    """Paper Table III row 2: + image-perturbation consistency."""

    consistency_terms = ("ipc",)
    mpcl_terms = ("pseg",)


class DBDCTrainer_lossIpcFpc(DBDCTrainer):
    """Paper Table III row 3: + feature-perturbation consistency."""

    mpcl_terms = ("pseg",)


class DBDCTrainer_lossIpcFpcMc(DBDCTrainer):
    """Paper Table III row 4: + modality contrast L_mc."""

    mpcl_terms = ("pseg", "mc")


class DBDCTrainer_lossIpcFpcMcPc(DBDCTrainer):
    """Paper Table III row 5: + prototype contrast L_pc (the full DBDCTrainer adds L_pd)."""

    mpcl_terms = ("pseg", "mc", "pc")


class DBDCTrainer_mlmbNone(DBDCTrainer):
    """Paper Table IV row 1: one shared norm everywhere (no modality bank)."""

    norm_bank_scope = "none"


class DBDCTrainer_mlmbEncoder(DBDCTrainer):
    """Paper Table IV row 2: norm banks in the encoder only."""

    norm_bank_scope = "encoder"


class DBDCTrainer_mlmbEncoderBottleneck(DBDCTrainer):
    """Paper Table IV row 3: norm banks in the encoder and the bottleneck."""

    norm_bank_scope = "encoder+bottleneck"


class DBDCSupervisedTrainer(DBDCTrainer):
    """Supervised-only twin: same network, MPCL and MAW, labelled cases only."""

    use_unlabeled = False


class PooledUNetTrainer(SafeLoadingMixin, nnUNetTrainer):
    """nnU-Net's nnUNetTrainer on all modalities pooled (each case normalised by its modality at preprocessing).

    Its network is nnU-Net's U-Net of the plans inside :class:`~nnunet_mmssl.architectures.dbdc.ModalityGuardedUNet`
    (:class:`~nnunet_mmssl.architectures.dbdc.ModalityGuardedResEncUNet` on ResEnc plans; the same weights and
    forward; the guard only refuses to predict without a modality, which nnUNetv2_predict cannot give). The final
    validation also writes ``summary_per_modality.json``.
    """

    network_class_name = "nnunet_mmssl.architectures.dbdc.ModalityGuardedUNet"
    #: the guarded network for each base U-Net of the plans (PlainConvUNet, ResEnc's ResidualEncoderUNet)
    network_class_names: dict = GUARDED_NETWORKS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's exact signature)
        self.modalities = plan_modalities(plans, dataset_json)
        plans = copy.deepcopy(plans)
        architecture = PlansManager(plans).get_configuration(configuration).configuration["architecture"]
        plans["configurations"][configuration]["architecture"] = architecture_on_base(
            architecture, self.network_class_names, {"modalities": list(self.modalities)}, type(self).__name__)
        super().__init__(plans, configuration, fold, dataset_json, device)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        check_configuration_manager(configuration_manager)
        return get_network_from_plans(
            configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
            allow_init=True, deep_supervision=enable_deep_supervision)

    def initialize(self):
        super().initialize()
        module = self.network.module if self.is_ddp else self.network
        module = getattr(module, "_orig_mod", module)
        module.guard_enabled = False  # training data are normalised per case already

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            folder = self.preprocessed_dataset_folder

            def modality_of(case: str) -> str:
                if len(self.modalities) == 1:
                    return self.modalities[0]
                return load_pickle(join(folder, case + ".pkl"))[MODALITY_PROPERTY]

            write_summary_per_modality(join(self.output_folder, "validation"), self.modalities, modality_of,
                                       self.dataset_json["file_ending"], self.print_to_log_file)
