import os
import subprocess
import sys

from nnunet_mmssl._ext_trainer_hook import DISABLE_VARIABLE, EXT_TRAINER_FOLDER, register


def test_register_appends_once_and_keeps_user_folders():
    env = {"nnUNet_extTrainer": "/my/trainers"}
    assert register(env)
    assert env["nnUNet_extTrainer"].split(os.pathsep) == ["/my/trainers", EXT_TRAINER_FOLDER]
    register(env)
    assert env["nnUNet_extTrainer"].split(os.pathsep).count(EXT_TRAINER_FOLDER) == 1


def test_register_can_be_switched_off():
    env = {DISABLE_VARIABLE: "1"}
    assert not register(env)
    assert "nnUNet_extTrainer" not in env


def test_installed_pth_sets_variable_in_new_interpreter():
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", DISABLE_VARIABLE)}
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == EXT_TRAINER_FOLDER, "is the package installed with pip (the .pth hook)?"
    env[DISABLE_VARIABLE] = "1"
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "None"


def test_nnunet_finds_our_trainer_by_name():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_mmssl.trainers import MemCifSSLTrainer, MemCifSupervisedTrainer

    os.environ["nnUNet_extTrainer"] = EXT_TRAINER_FOLDER
    assert recursive_find_trainer_class_by_name("MemCifSSLTrainer") is MemCifSSLTrainer
    assert recursive_find_trainer_class_by_name("MemCifSupervisedTrainer") is MemCifSupervisedTrainer
