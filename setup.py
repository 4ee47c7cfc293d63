"""Install script for nnunet_mmssl.

Besides the package, the install puts one ``nnunet_mmssl_ext_trainer.pth`` file into site-packages. Python runs
its single line at start-up: it appends the folder ``nnunet_mmssl/nnunet_ext`` (which holds one module importing
our trainers) to the ``nnUNet_extTrainer`` environment variable, the official route by which nnU-Net >= 2.8 finds
trainers outside its own package. Set ``NNUNET_MMSSL_NO_EXT_TRAINER=1`` to switch this off; uninstalling removes
the file. See README.md, "How nnU-Net finds our trainers".
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "nnunet_mmssl_ext_trainer.pth"
# One line, run by Python's site module at every start-up. It does nothing when the package cannot be found (an
# editable install whose source folder was deleted, say) instead of printing a traceback at every start.
PTH_LINE = ("import importlib.util as _u; _u.find_spec('nnunet_mmssl') is not None and "
            "__import__('nnunet_mmssl._ext_trainer_hook')._ext_trainer_hook.register()\n")


class BuildPyWithPth(build_py):
    """Regular (wheel) install: place the .pth file at the root of site-packages."""

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithPth(editable_wheel):
    """Editable install (``pip install -e .``): add the same .pth file to the editable wheel."""

    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


class _StrategyWithPth:
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode())

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


setup(
    name="nnunet_mmssl",
    version="0.1.0",
    description="Semi-supervised multi-modal segmentation trainers for nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read() if os.path.isfile("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nnunet_mmssl", "nnunet_mmssl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.1",
        "batchgenerators>=0.25",
        "batchgeneratorsv2>=0.3",
        "dynamic-network-architectures>=0.4",
        "SimpleITK>=2.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=7", "ruff>=0.5"]},
    entry_points={
        "console_scripts": [
            "nnUNetv2_mmssl_convert=nnunet_mmssl.cli.convert:main",
            "nnUNetv2_mmssl_plan_and_preprocess=nnunet_mmssl.cli.plan_and_preprocess:main",
            "nnUNetv2_mmssl_predict=nnunet_mmssl.cli.predict:main",
            "nnUNetv2_mmssl_evaluate=nnunet_mmssl.cli.evaluate:main",
            "nnUNetv2_mmssl_evaluate_missing=nnunet_mmssl.cli.evaluate_missing:main",
            "nnUNetv2_mmssl_demo=nnunet_mmssl.cli.demo:main",
            "nnUNetv2_mmssl_pseudolabel=nnunet_mmssl.cli.pseudolabel:main",
            "nnUNetv2_mmssl_study=nnunet_mmssl.cli.study:main",
            "nnUNetv2_mmssl_check_model=nnunet_mmssl.cli.check_model:main",
            "nnUNetv2_mmssl_selftrain=nnunet_mmssl.cli.selftrain:main",
        ]
    },
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
