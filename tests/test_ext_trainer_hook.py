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


def test_nnunet_finds_every_exported_trainer():
    """``nnUNetv2_train -tr NAME`` works for every trainer the package exports (the ext module re-exports them)."""
    from nnunetv2.utilities.find_objects import recursive_find_python_class

    import nnunet_mmssl.trainers as trainers

    names = [n for n in trainers.__all__ if n not in ("MMSSLTrainerBase", "SSLTrainerBase")]
    assert {"MemCifSSLTrainer", "MMFMCMLTrainer", "DBDCTrainer", "SMMLTrainer", "MeanTeacherTrainer"} <= set(names)
    for name in names:  # nnU-Net's search of the nnUNet_extTrainer folder, as its trainer lookup does it
        found = recursive_find_python_class(EXT_TRAINER_FOLDER, name, None, base_folder=EXT_TRAINER_FOLDER,
                                            cleanup_imports_from_base_folder=True)
        assert found is getattr(trainers, name), name


def test_installed_pth_line_is_silent_when_the_package_is_gone(tmp_path):
    """An editable install whose source folder was deleted must not print a traceback at every Python start."""
    import sysconfig

    pth = os.path.join(sysconfig.get_paths()["purelib"], "nnunet_mmssl_ext_trainer.pth")
    assert os.path.isfile(pth), "is the package installed with pip (the .pth hook)?"
    with open(pth) as f:
        line = f.read()
    assert line.startswith("import ") and line.count("\n") == 1  # site.py executes exactly such lines
    code = f"import os; exec({line!r}); print(os.environ.get('nnUNet_extTrainer'))"
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", DISABLE_VARIABLE, "PYTHONPATH")}
    # -S: no site-packages on sys.path, and cwd is an empty folder, so nnunet_mmssl cannot be found
    done = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.strip() == "None"
