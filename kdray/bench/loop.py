"""The yardstick of ``kdray bench step``: knowledge distillation as a plain PyTorch loop, no kdray code.

It does the same math as kdray's ``kd`` method in its engine — random crop with zero padding and
horizontal flip on the uint8 batch, normalisation, ``(1 − α)·CE + α·T²·KL`` with the teacher under
``no_grad``, SGD with a cosine schedule, mixed precision and channels_last on GPU, one host sync per
epoch — written the way a researcher writes it by hand, so the ratio of the two is kdray's overhead.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from kdray.data import Split


def crop_and_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image cropped at a random offset of its zero-padded self, and mirrored with probability 1/2."""
    count, channels, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (count, 1, 1, 1), device=device)
    left = torch.randint(0, 2 * padding + 1, (count, 1, 1, 1), device=device)
    rows = top + torch.arange(height, device=device).view(1, 1, height, 1)
    columns = left + torch.arange(width, device=device).view(1, 1, 1, width)
    batch = torch.arange(count, device=device).view(count, 1, 1, 1)
    crops = padded[batch, torch.arange(channels, device=device).view(1, channels, 1, 1), rows, columns]
    flipped = torch.rand(count, device=device) < 0.5
    return torch.where(flipped.view(count, 1, 1, 1), crops.flip(3), crops)


def hand_written_kd_epoch(
    student: nn.Module,
    teacher: nn.Module,
    train: Split,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    device: torch.device,
    temperature: float = 4.0,
    alpha: float = 0.9,
    padding: int = 4,
    lr: float = 0.05,
    epochs: int = 2,
) -> float:
    """Train ``student`` from ``teacher`` for ``epochs`` epochs; images/s of the last one."""
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    student.to(device, memory_format=layout).train()
    teacher.to(device, memory_format=layout).eval()
    images, labels = train.images.to(device), train.labels.to(device)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    steps = len(images) // batch_size
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    total_steps = epochs * steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    rate = 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(images), device=device)
        running = torch.zeros((), device=device)
        for step in range(steps):
            index = order[step * batch_size : (step + 1) * batch_size]
            x = (crop_and_flip(images[index], padding).float() / 255 - mean_t) / std_t
            x = x.contiguous(memory_format=layout)
            y = labels[index]
            with bf16:
                logits = student(x)
                with torch.no_grad():
                    soft = F.softmax(teacher(x).float() / temperature, dim=1)
                log_probs = F.log_softmax(logits.float() / temperature, dim=1)
                kl = F.kl_div(log_probs, soft, reduction="batchmean") * temperature**2
                loss = (1 - alpha) * F.cross_entropy(logits, y) + alpha * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.detach()
        running.item()
        rate = steps * batch_size / (time.perf_counter() - started)
    return rate
