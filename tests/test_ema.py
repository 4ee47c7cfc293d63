import pytest
import torch
from torch import nn

from nnunet_mmssl.semisup import EMATeacher, ema_decay, gaussian_noise, make_teacher, update_ema_


def tiny(value: float = 1.0) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def test_decay_warm_up_by_hand():
    assert ema_decay(0.99) == 0.99
    assert ema_decay(0.99, 0) == 0.0
    assert ema_decay(0.99, 1) == 0.5
    assert ema_decay(0.99, 9) == pytest.approx(0.9)
    assert ema_decay(0.99, 99) == pytest.approx(0.99)
    assert ema_decay(0.99, 10_000) == 0.99
    with pytest.raises(ValueError, match="in \\[0, 1\\], got 1.5"):
        ema_decay(1.5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        ema_decay(0.9, -1)


def test_update_arithmetic_by_hand():
    student, teacher = tiny(3.0), tiny(1.0)
    assert update_ema_(teacher, student, alpha=0.75) == 0.75
    assert all(torch.all(p == 1.5) for p in teacher.parameters())  # 0.75 * 1 + 0.25 * 3
    assert update_ema_(teacher, student, alpha=0.75, step=1) == 0.5
    assert all(torch.all(p == 2.25) for p in teacher.parameters())  # 0.5 * 1.5 + 0.5 * 3
    update_ema_(teacher, student, alpha=0.99, step=0)
    assert all(torch.all(p == 3.0) for p in teacher.parameters())  # warm-up step 0 copies


def test_buffers_are_copied_not_averaged():
    student, teacher = tiny(3.0), tiny(1.0)
    student[1].running_mean.fill_(4.0)
    student[1].num_batches_tracked.fill_(7)
    update_ema_(teacher, student, alpha=0.9)
    assert torch.all(teacher[1].running_mean == 4.0) and teacher[1].num_batches_tracked.item() == 7


def test_mismatched_models_are_refused():
    with pytest.raises(ValueError, match="parameters differ"):
        update_ema_(nn.Sequential(nn.Conv2d(1, 2, 1)), tiny(), alpha=0.9)


def test_make_teacher_is_a_frozen_independent_copy():
    student = tiny(2.0).train()
    teacher = make_teacher(student)
    assert teacher.training  # mode kept; not forced to eval
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        student[0].weight.fill_(5.0)
    assert torch.all(teacher[0].weight == 2.0)


def test_teacher_receives_no_gradient_from_a_consistency_loss():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True))
    teacher = EMATeacher(student, alpha=0.99)
    x = torch.randn(2, 1, 6, 6)
    target = teacher(x)
    assert not target.requires_grad
    loss = torch.mean((torch.softmax(student(gaussian_noise(x, 0.1)), 1) - torch.softmax(target, 1)) ** 2)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.module.parameters())


def test_ema_teacher_object_steps_and_state_round_trip():
    student = tiny(3.0)
    teacher = EMATeacher(tiny(1.0), alpha=0.99)
    assert teacher.update(student) == 0.5 and teacher.step == 1  # Tarvainen: step counted before the update
    assert all(torch.all(p == 2.0) for p in teacher.module.parameters())
    state = teacher.state_dict()
    assert set(state) == {"teacher", "ema_step"} and state["ema_step"] == 1
    restored = EMATeacher(tiny(0.0), alpha=0.99)
    restored.load_state_dict(state)
    assert restored.step == 1
    for a, b in zip(restored.module.state_dict().values(), teacher.module.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(KeyError, match="lacks \\['ema_step'\\]"):
        restored.load_state_dict({"teacher": state["teacher"]})
    no_warmup = EMATeacher(tiny(1.0), alpha=0.75, warmup=False)
    assert no_warmup.update(student) == 0.75


def test_gaussian_noise():
    x = torch.zeros(4, 2, 32, 32)
    assert gaussian_noise(x, 0.0) is x
    noisy = gaussian_noise(x, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.all(x == 0) and noisy.shape == x.shape and noisy.dtype == x.dtype
    assert noisy.std().item() == pytest.approx(0.1, rel=0.05) and abs(noisy.mean().item()) < 0.01
    again = gaussian_noise(x, 0.1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, again)
    assert gaussian_noise(x, 1.0, clip=0.2).abs().max().item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="std must be >= 0"):
        gaussian_noise(x, -0.1)


def test_teacher_state_is_plain_and_loads_with_weights_only(tmp_path):
    teacher = EMATeacher(tiny(1.0), alpha=0.99)
    teacher.update(tiny(3.0))
    path = tmp_path / "state.pth"
    torch.save(teacher.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert type(state["ema_step"]) is int and state["ema_step"] == 1
    restored = EMATeacher(tiny(0.0), alpha=0.99)
    restored.load_state_dict(state)
    assert restored.step == 1
    for a, b in zip(restored.module.state_dict().values(), teacher.module.state_dict().values()):
        assert torch.equal(a, b)
