"""Networks: the ConvNet of the dataset-distillation literature, a small-image ResNet-18, and VGG-11 and AlexNet
sized for 28 to 64 px inputs as the dataset-distillation field uses them (cross-architecture evaluation).

All expose `embed(x)` (the penultimate features) and `forward(x)` (class logits), and are re-initialised in
place from a torch.Generator by `reinit_`, so a fresh random extractor costs no allocation and is reproducible.

Sizes (s = image side, `norm` = instancenorm | batchnorm | none after every convolution):
- VGG-11: conv3x3 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M (M = 2x2 max-pool, skipped once the map
  is 1 px; below 32 px the first convolution pads the image to 32 px, so that no convolution sees a 1x1 map, which
  instance norm would reduce to a constant: 28 and 32 px end at 1x1, 64 px at 2x2); the classifier is one linear
  layer on the flattened final map (512 x m^2 features, m the final side: 1 at 28-32 px, 2 at 64 px).
  9.2M parameters at 32 px, 10 classes.
- AlexNet (the small-kernel variant of the DC/DM code): conv5x5 128, M, conv5x5 192, M, conv3x3 256, 192, 192,
  M, then one linear layer on the flattened 192 x (s // 8)^2 map (3x3 at 28 px, 4x4 at 32 px, 8x8 at 64 px).
  1.9M parameters at 32 px, 10 classes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ARCHS  # the architectures build_network knows


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


class VGG11(nn.Module):
    """VGG-11 for 28-64 px images: 8 conv3x3-norm-relu layers, 5 max-pools (only while the map is > 1 px)."""

    LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm"):
        super().__init__()
        layers: list[nn.Module] = []
        # below 32 px the first convolution pads the image up to 32 (as the DC code does for 28 px): else the last
        # two convolutions run on 1 x 1 maps, which an instance norm sets to its bias alone, the same for every image
        pad = 1 + (max(0, 32 - image_size) + 1) // 2
        ch, size = channels, image_size + 2 * pad - 2
        for v in self.LAYERS:
            if v == "M":
                if size > 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            layers += [nn.Conv2d(ch, v, 3, padding=pad), _norm(norm, v), nn.ReLU(inplace=True)]
            ch, pad = v, 1
        self.features = nn.Sequential(*layers)
        self.feature_dim = ch * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class AlexNet(nn.Module):
    """AlexNet with small kernels (5x5, 5x5, 3x3 x 3; 3 max-pools) for 28-64 px images, as in the DC/DM code."""

    def __init__(self, channels: int, num_classes: int, image_size: int, norm: str = "instancenorm"):
        super().__init__()
        if image_size // 8 < 1:
            raise ValueError(f"AlexNet needs images of at least 8 px, got {image_size}")

        def block(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, padding=k // 2), _norm(norm, cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(channels, 128, 5), nn.MaxPool2d(2), *block(128, 192, 5), nn.MaxPool2d(2),
                                      *block(192, 256, 3), *block(256, 192, 3), *block(192, 192, 3), nn.MaxPool2d(2))
        self.feature_dim = 192 * (image_size // 8) ** 2
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))




def build_network(arch: str, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
                  norm: str = "instancenorm") -> nn.Module:
    """One of ARCHS; width and depth apply to the ConvNet only."""
    if arch == "convnet":
        return ConvNet(channels, num_classes, image_size, width, depth, norm)
    if arch == "resnet18":
        return ResNet18(channels, num_classes, norm)
    if arch == "vgg11":
        return VGG11(channels, num_classes, image_size, norm)
    if arch == "alexnet":
        return AlexNet(channels, num_classes, image_size, norm)
    raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")


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
