"""Knowledge distillation for fine-tuning a pruned network: the dense network as teacher.

The loss is (1 - weight) x cross entropy + weight x T^2 x KL(teacher_T || student_T),
softmaxes at temperature T (Hinton et al., 2015); T^2 keeps the soft term's
gradients on the scale of the hard one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TEMPERATURE = 4.0
DEFAULT_WEIGHT = 0.9


def check_distillation(temperature: float, weight: float) -> None:
    """Refuse a temperature <= 0 or a weight outside [0, 1]."""
    if not temperature > 0:
        raise ValueError(f"--distill_temperature must be > 0, got {temperature}")
    if not 0 <= weight <= 1:
        raise ValueError(f"--distill_weight must be in [0, 1], got {weight}")


@dataclass
class Distillation:
    """A frozen teacher, the temperature and the soft term's weight; ``loss`` replaces the criterion."""

    teacher: nn.Module
    temperature: float = DEFAULT_TEMPERATURE
    weight: float = DEFAULT_WEIGHT

    def __post_init__(self) -> None:
        check_distillation(self.temperature, self.weight)
        self.teacher.eval()  # its parameters are left as they are: the loss reads it under no_grad

    def loss(self, logits: Tensor, targets: Tensor, images: Tensor,
             criterion: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """(1 - w) x criterion(logits, targets) + w x T^2 x KL between the teacher's and the student's softmax_T."""
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True)
        return (1.0 - self.weight) * criterion(logits, targets) + self.weight * t * t * soft
