"""Per-class difficulty of Fashion-MNIST for a ConvNet: the measured class order for a hard-tail long-tailed set.

    .venv/bin/python benchmarks/class_difficulty.py --device cuda
    .venv/bin/python benchmarks/class_difficulty.py --device cpu --epochs 5 --repeats 3

Trains a fresh ConvNet (csdm_dist.models.build_network: depth 3, width 128, instance norm at 28 px) on the whole
balanced raw Fashion-MNIST training set (60,000 images, read with csdm_dist.data.sources.load_source; the
normalisation of configs/dataset/fashion_mnist_lt.yaml) for --epochs epochs: SGD lr 0.01, momentum 0.9, weight
decay 5e-4, lr x0.1 at half the epochs (the `dm` evaluation protocol's optimiser), no augmentation. Then it tests
on the official balanced test set (10,000 images) and prints the per-class accuracy and the raw classes sorted
from easiest (highest accuracy) to hardest; with --repeats R, R networks (seeds seed .. seed+R-1) are averaged.
The order is what `dataset.class_order` of configs/dataset/fashion_mnist_lt_hardtail.yaml should hold (easiest at
the head). Results: benchmarks/results/class_difficulty_fmnist.json (--out).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT, compose, machine_info, write_report

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "class_difficulty_fmnist.json"
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # the dm protocol's SGD (csdm_dist/evaluate.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    p.add_argument("--epochs", type=int, default=5, help="training epochs per network")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="auto: cuda when available")
    p.add_argument("--repeats", type=int, default=1, help="networks trained (seeds seed .. seed+repeats-1), averaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=128, help="ConvNet channels")
    p.add_argument("--depth", type=int, default=3, help="ConvNet blocks")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file for the results")
    args = p.parse_args(argv)
    for key in ("epochs", "repeats", "batch_size", "width", "depth"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def pick_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("class_difficulty.py --device cuda: CUDA is not available here (torch.cuda.is_available() "
                         "is False); use --device cpu or --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_splits(raw_root: str):
    """(data config, train images uint8 [N, C, H, W], train labels, test images, test labels, class names)."""
    import torch

    from csdm_dist.data.sources import load_source

    data = compose(["dataset=fashion_mnist_lt", f"dataset.raw_root={raw_root}"]).dataset
    train, test = load_source(data, "train"), load_source(data, "test")

    def tensors(split):
        return torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(split.labels)

    return (data, *tensors(train), *tensors(test), train.class_names)


def train_network(x, y, data, args, seed: int, device):
    """A fresh ConvNet trained on all of (x, y) for args.epochs epochs."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from csdm_dist.models import build_network, reinit_

    g = torch.Generator().manual_seed(seed)
    net = build_network("convnet", data.channels, data.num_classes, data.image_size, args.width, args.depth,
                        "instancenorm")
    net = reinit_(net, g).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, args.epochs // 2)], 0.1)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    x, y = x.to(device), y.to(device)
    bar = tqdm(total=args.epochs * -(-len(y) // args.batch_size), desc=f"network seed {seed}", unit="batch",
               dynamic_ncols=True)
    for epoch in range(args.epochs):
        bar.set_postfix(epoch=f"{epoch + 1}/{args.epochs}")
        perm = torch.randperm(len(y), generator=g).to(device)
        for i in range(0, len(y), args.batch_size):
            bar.update()
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(net((x[idx].float() / 255 - mean) / std), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    bar.close()
    return net.eval(), mean, std


def per_class_accuracy(net, mean, std, x, y, num_classes: int, device, batch: int = 1000) -> list[float]:
    """Test accuracy of every class, in %."""
    import torch

    correct = torch.zeros(num_classes, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(y), batch):
            pred = net((x[i:i + batch].to(device).float() / 255 - mean) / std).argmax(1).cpu()
            correct += torch.bincount(y[i:i + batch][pred == y[i:i + batch]], minlength=num_classes)
    total = torch.bincount(y, minlength=num_classes).clamp_min(1)
    return (100.0 * correct / total).tolist()


def easiest_first(accuracy: list[float]) -> list[int]:
    """Class indices by accuracy, highest first (ties: the lower index first)."""
    return sorted(range(len(accuracy)), key=lambda c: (-accuracy[c], c))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    data, train_x, train_y, test_x, test_y, names = load_splits(args.raw_root)
    t0 = time.perf_counter()
    runs = []
    for r in range(args.repeats):
        net, mean, std = train_network(train_x, train_y, data, args, args.seed + r, device)
        runs.append(per_class_accuracy(net, mean, std, test_x, test_y, data.num_classes, device))
        print(f"network {r + 1}/{args.repeats} (seed {args.seed + r}): {sum(runs[-1]) / len(runs[-1]):.2f} % "
              f"mean per-class test accuracy")
    accuracy = [sum(run[c] for run in runs) / len(runs) for c in range(data.num_classes)]
    order = easiest_first(accuracy)
    print(f"\nper-class test accuracy ({args.epochs} epochs, {args.repeats} network(s), {len(train_y)} training "
          f"images, {device.type}):")
    for c in order:
        print(f"  raw class {c}  {names[c]:<12} {accuracy[c]:6.2f} %")
    print(f"class order, easiest -> hardest: {order}  ({', '.join(names[c] for c in order)})")
    print(f"for configs/dataset/fashion_mnist_lt_hardtail.yaml:  class_order: {order}")
    report = {"dataset": "fashion_mnist", "raw_root": args.raw_root, "train_images": len(train_y),
              "test_images": len(test_y), "device": device.type,
              "setting": {"arch": "convnet", "width": args.width, "depth": args.depth, "norm": "instancenorm",
                          "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "sgd", "lr": LR,
                          "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "lr_decay": "x0.1 at half",
                          "augment": False, "repeats": args.repeats,
                          "seeds": list(range(args.seed, args.seed + args.repeats))},
              "class_names": names, "per_class_accuracy": accuracy, "per_class_accuracy_per_network": runs,
              "mean_accuracy": sum(accuracy) / len(accuracy), "order_easiest_to_hardest": order,
              "order_names": [names[c] for c in order], "wall_s": time.perf_counter() - t0,
              "machine": machine_info()}
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
