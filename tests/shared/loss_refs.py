"""Helpers shared by the loss tests: float64 random tensors, a numpy Huber reference, gradient routing."""

import numpy as np
import torch


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def huber(x):
    """Smooth L1 with beta 1, written in numpy (independent of torch's implementation)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.abs(x) < 1.0, 0.5 * x**2, np.abs(x) - 0.5)


def assert_grad_reaches_student_only(loss_fn, student, teacher):
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    loss_fn(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
