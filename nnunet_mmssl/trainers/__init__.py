"""Our nnU-Net trainers. ``from nnunet_mmssl.trainers import MemCifSSLTrainer`` is the public import."""

from nnunet_mmssl.trainers.base import MMSSLTrainerBase, SSLTrainerBase
from nnunet_mmssl.trainers.dbdc import DBDCTrainer
from nnunet_mmssl.trainers.dbdc_variants import (
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
from nnunet_mmssl.trainers.mean_teacher import MeanTeacherTrainer, PlainSupervisedTrainer
from nnunet_mmssl.trainers.memcif import (
    MemCifSSLTrainer,
    MemCifSSLTrainer_noCIF,
    MemCifSSLTrainer_noMEM,
    MemCifSSLTrainer_plain,
    MemCifSSLTrainer_printedConsistency,
    MemCifSupervisedTrainer,
)
from nnunet_mmssl.trainers.mmf_mcml import (
    MMFMCMLSupervisedTrainer,
    MMFMCMLTrainer,
    MMFMCMLTrainer_baseline,
    MMFMCMLTrainer_MMF,
    MMFMCMLTrainer_MMF_MAE,
    MMFMCMLTrainer_MMF_MCML,
)
from nnunet_mmssl.trainers.share_variants import (
    MeanTeacherTrainer_share0p05,
    MeanTeacherTrainer_share0p1,
    MeanTeacherTrainer_share0p2,
    MemCifSSLTrainer_share0p05,
    MemCifSSLTrainer_share0p1,
    MemCifSSLTrainer_share0p2,
)
from nnunet_mmssl.trainers.smml import (
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
from nnunet_mmssl.trainers.variants import MemCifSSLTrainer_demo, MemCifSupervisedTrainer_demo

__all__ = ["MMSSLTrainerBase", "SSLTrainerBase", "MemCifSSLTrainer", "MemCifSSLTrainer_printedConsistency",
           "MemCifSSLTrainer_noCIF", "MemCifSSLTrainer_noMEM",
           "MemCifSSLTrainer_plain", "MemCifSupervisedTrainer", "MemCifSSLTrainer_demo", "MemCifSupervisedTrainer_demo"]
__all__ += ["MMFMCMLTrainer", "MMFMCMLTrainer_baseline", "MMFMCMLTrainer_MMF", "MMFMCMLTrainer_MMF_MAE",
            "MMFMCMLTrainer_MMF_MCML", "MMFMCMLSupervisedTrainer", "MeanTeacherTrainer", "PlainSupervisedTrainer"]
__all__ += ["DBDCTrainer", "DBDCSupervisedTrainer", "DBDCTrainer_lossIpc", "DBDCTrainer_lossIpcFpc",
            "DBDCTrainer_lossIpcFpcMc", "DBDCTrainer_lossIpcFpcMcPc", "DBDCTrainer_lossNone", "DBDCTrainer_mlmbEncoder",
            "DBDCTrainer_mlmbEncoderBottleneck", "DBDCTrainer_mlmbNone", "DBDCTrainer_noMAW",
            "DBDCTrainer_noMLPB_noMAW",
            "PooledUNetTrainer"]
__all__ += ["ModalityDropoutTrainer", "SMMLSSLTrainer", "SMMLTrainer", "SMMLTrainer_dual", "SMMLTrainer_dualFRC",
            "SMMLTrainer_dualPBC", "SMMLTrainer_dualPBCFRC", "SMMLTrainer_single", "SMMLTrainer_singleSRN"]
__all__ += ["MeanTeacherTrainer_share0p05", "MeanTeacherTrainer_share0p1", "MeanTeacherTrainer_share0p2",
            "MemCifSSLTrainer_share0p05", "MemCifSSLTrainer_share0p1", "MemCifSSLTrainer_share0p2"]
