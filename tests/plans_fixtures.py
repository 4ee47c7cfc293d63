"""Minimal nnU-Net plans and dataset.json for trainer tests that need no data."""

ARCH_2D = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv2d",
                    "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "n_conv_per_stage": [1, 1, 1],
                    "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
PLANS = {
    "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1, 1, 1],
    "original_median_shape_after_transp": [8, 16, 16], "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
    "configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
               "patch_size": [16, 16], "spacing": [1.0, 1.0], "architecture": ARCH_2D},
        "2d_child": {"inherits_from": "2d", "batch_size": 4},
    },
    "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {},
    "mmssl": {"modality_groups": [[1], [0]]},
}
DATASET_JSON = {"channel_names": {"0": "A", "1": "B"}, "labels": {"background": 0, "lesion": 1},
                "numTraining": 2, "file_ending": ".nii.gz"}

#: nnU-Net's default resampling entries of a configuration (what the preprocessor and predictor read)
RESAMPLING = {"resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                     "force_separate_z": None}}
