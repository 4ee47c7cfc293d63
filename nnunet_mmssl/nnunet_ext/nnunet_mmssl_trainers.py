"""Imported by nnU-Net as a top-level module when it searches ``nnUNet_extTrainer``: absolute imports only."""

from nnunet_mmssl.trainers import (  # noqa: F401
    MemCifSSLTrainer,
    MemCifSSLTrainer_demo,
    MemCifSSLTrainer_noCIF,
    MemCifSSLTrainer_noMEM,
    MemCifSSLTrainer_plain,
    MemCifSSLTrainer_printedConsistency,
    MemCifSupervisedTrainer,
    MemCifSupervisedTrainer_demo,
)
from nnunet_mmssl.trainers.dbdc import DBDCTrainer  # noqa: F401
from nnunet_mmssl.trainers.dbdc_variants import (  # noqa: F401
    DBDCSupervisedTrainer,
    DBDCTrainer_lossIpc,
    DBDCTrainer_lossIpcFpc,
    DBDCTrainer_lossIpcFpcMc,
    DBDCTrainer_lossIpcFpcMcPc,
    DBDCTrainer_lossNone,
    DBDCTrainer_mlmbEncoder,
    DBDCTrainer_mlmbEncoderBottleneck,
    DBDCTrainer_mlmbNone,
    DBDCTrainer_noMAW,
    DBDCTrainer_noMLPB_noMAW,
    PooledUNetTrainer,
)
from nnunet_mmssl.trainers.mean_teacher import MeanTeacherTrainer, PlainSupervisedTrainer  # noqa: F401
from nnunet_mmssl.trainers.mmf_mcml import (  # noqa: F401
    MMFMCMLSupervisedTrainer,
    MMFMCMLTrainer,
    MMFMCMLTrainer_baseline,
    MMFMCMLTrainer_MMF,
    MMFMCMLTrainer_MMF_MAE,
    MMFMCMLTrainer_MMF_MCML,
)
from nnunet_mmssl.trainers.smml import (  # noqa: F401
    ModalityDropoutTrainer,
    SMMLSSLTrainer,
    SMMLTrainer,
    SMMLTrainer_dual,
    SMMLTrainer_dualFRC,
    SMMLTrainer_dualPBC,
    SMMLTrainer_dualPBCFRC,
    SMMLTrainer_single,
    SMMLTrainer_singleSRN,
)
