"""Fine-tuning losses.

* Distillation (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015): KL(teacher_T ||
  student_T) of the softened outputs at temperature T, times T^2 so its gradients keep their scale as T changes.
  The temperature may vary over the training (:class:`carve.pipeline.training.schedule.Temperature`, SFP).
* Cross-entropy with the labels, when the data has them.
* A feature loss on matched intermediate tensors (FitNets-style hints, Romero et al., ICLR 2015): the mean squared
  difference of a tensor present with the same shape in both graphs, relative to the teacher tensor's mean square.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = float(temperature)
    s = F.log_softmax(student.reshape(len(student), -1) / t, dim=1)
    p = F.log_softmax(teacher.reshape(len(teacher), -1) / t, dim=1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


def feature(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference relative to the teacher's mean square (scale-free across layers)."""
    return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
