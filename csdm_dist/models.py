"""Networks: the ConvNet of the dataset-distillation literature and a small-image ResNet-18.

Both expose `embed(x)` (the penultimate features) and `forward(x)` (class logits), and are re-initialised in
place from a torch.Generator by `reinit_`, so a fresh random extractor costs no allocation and is reproducible.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use instancenorm, batchnorm or none")


class ConvNet(nn.Module):
    """depth x [conv3x3(width) - norm - relu - avgpool2]; features = flattened last feature map."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm"):
        super().__init__()
        layers: list[nn.Module] = []
        ch, size = channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(ch, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            ch, size = width, size // 2
        if size < 1:
            raise ValueError(f"ConvNet depth {depth} is too deep for {image_size}px images")
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (3x3 stem, no max-pool); features = global average pool, 512 dims."""

    def __init__(self, channels: int, num_classes: int, norm: str = "instancenorm"):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), _norm(norm, 64), nn.ReLU(inplace=True))
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_Block(cin, cout, stride, norm), _Block(cout, cout, 1, norm)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def build_network(arch: str, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
                  norm: str = "instancenorm") -> nn.Module:
    if arch == "convnet":
        return ConvNet(channels, num_classes, image_size, width, depth, norm)
    if arch == "resnet18":
        return ResNet18(channels, num_classes, norm)
    raise ValueError(f"unknown arch {arch!r}; use convnet or resnet18")


@torch.no_grad()
def reinit_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every parameter in place as PyTorch's default init does, but from `generator` (on the CPU)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias rule both give 1/sqrt(fan_in)
            m.weight.copy_(torch.empty(m.weight.shape).uniform_(-bound, bound, generator=generator))
            if m.bias is not None:
                m.bias.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=generator))
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) and m.affine:
            m.weight.fill_(1.0)
            m.bias.fill_(0.0)
    return model
