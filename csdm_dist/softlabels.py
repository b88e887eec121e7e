"""The maths of the soft-label track (issue #11, DESIGN.md section 7), as pure functions.

pi_c = n_c / sum n is the real class frequency of the long-tailed training set.
- Training a debiased teacher (Menon et al. 2021, logit adjustment): cross-entropy on logits + tau * log pi_c
  (`adjusted_logits`); balanced softmax is the tau = 1 form; plain cross-entropy is tau = 0 (`training_tau`).
  The teacher predicts with its plain logits, which so lean toward the tail by tau * log pi_c.
- Labelling (ADSA's prior adjustment): the stored soft labels are the teacher's logits - tau' * log pi_c
  (`prior_shifted`), before any softmax.
- Training a student on them (standard knowledge distillation): T^2 KL(p || softmax(z / T)) with
  p = softmax(logits / T) (`soft_targets`, `kd_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FP32_BYTES = 4


def log_prior(counts) -> Tensor:
    """log pi_c = log(n_c / sum n) as float32 [C]; every class needs n_c >= 1."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if n.ndim != 1 or (n <= 0).any():
        raise ValueError(f"class counts must be a 1-d list of positive numbers, got {n.tolist()}")
    return (n / n.sum()).log().float()


def adjusted_logits(logits: Tensor, counts, tau: float) -> Tensor:
    """logits + tau * log pi_c (the logit-adjusted loss's input), broadcast over the batch [B, C]."""
    return logits + tau * log_prior(counts).to(logits.device, logits.dtype)


def prior_shifted(logits: Tensor, counts, tau: float) -> Tensor:
    """logits - tau * log pi_c: the prior adjustment of the stored soft labels (tau = labels.prior_adjust)."""
    return adjusted_logits(logits, counts, -tau)


def training_tau(loss: str, tau: float) -> float:
    """The tau of the teacher's loss (teacher.loss): logit_adjusted -> tau, balanced_softmax -> 1, ce -> 0."""
    taus = {"logit_adjusted": float(tau), "balanced_softmax": 1.0, "ce": 0.0}
    if loss not in taus:
        raise ValueError(f"unknown teacher loss {loss!r}; use one of {tuple(taus)}")
    return taus[loss]


def teacher_loss(logits: Tensor, labels: Tensor, counts, loss: str, tau: float, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the class labels on the adjusted logits of teacher.loss (see training_tau)."""
    return F.cross_entropy(adjusted_logits(logits, counts, training_tau(loss, tau)), labels, reduction=reduction)


def soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """softmax(logits / T): the probabilities a student matches."""
    return torch.softmax(logits.float() / temperature, dim=1)


def kd_loss(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """T^2 KL(target || softmax(student / T)), the mean over the batch (0 when the two agree)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, target_probs.float(), reduction="batchmean") * temperature ** 2


def soft_label_bytes(num_classes: int, ipc: int, factor: int = 1, bytes_per_value: int = FP32_BYTES) -> int:
    """Bytes of a set's soft labels: one fp32 logit per class for each of the ipc * f^2 decoded images per class
    (ImageNet-LT, IPC 50, factor 1: 1000 x 50 x 1000 x 4 B = 200,000,000 B)."""
    return num_classes * ipc * factor * factor * num_classes * bytes_per_value
