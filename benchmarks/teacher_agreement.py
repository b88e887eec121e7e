"""How a teacher sees a distilled set: does its argmax name each decoded image's class?

    .venv/bin/python benchmarks/teacher_agreement.py RUN/distilled.pt [--teacher T.pt] [--shifts 0 0.25 0.5 1]
        [--out report.json]

Soft labels are the teacher's view of the synthetic images; where the teacher names another class than the one an
image was distilled for, its soft labels teach the evaluation network that other class. This reports, for every
decoded image of a set (multi-formation sets decoded as the evaluation decodes them):

- `raw`: agreement of the teacher's argmax with the class on the images as the evaluation trains on them (normalised
  floats, unclamped), the mean teacher probability of the class, per class, and the confusion (rows: the class,
  columns: the teacher's argmax);
- `clamped`: the same on the images clamped to the valid pixel range and rounded to uint8 (as an export to PNG
  stores them), and `clipped_fraction`, the share of pixel values outside that range;
- `shifted`: agreement when the teacher's logits are moved toward the head, logits + a log pi_c, for each a of
  --shifts (a logit-adjusted teacher's plain logits lean toward the tail).

The teacher is the set's own (`teacher` in distilled.pt, checked by sha256) unless --teacher names one.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from csdm_dist import files
from csdm_dist.distilled import clipped_fraction, decoded_set, normalise, to_uint8
from csdm_dist.softlabels import log_prior
from csdm_dist.teacher import Teacher, read_teacher, trained_network


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("distilled", type=Path, help="a distilled.pt")
    p.add_argument("--teacher", type=Path, help="a teacher file (default: the one that labelled the set)")
    p.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                   help="head-ward prior shifts a: agreement of argmax(logits + a log pi_c)")
    p.add_argument("--out", type=Path, help="also write the report here (JSON)")
    return p.parse_args(argv)


def agreement(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Agreement (%) of argmax(logits) with labels, overall and per class, the mean probability of the class and
    the confusion [class][argmax] as counts."""
    prob = logits.softmax(1)
    pred = prob.argmax(1)
    hit = (pred == labels).float()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    return {"agree": 100 * hit.mean().item(),
            "p_class": prob[torch.arange(len(labels)), labels].mean().item(),
            "per_class": [100 * hit[labels == c].mean().item() if (labels == c).any() else None
                          for c in range(num_classes)],
            "confusion": confusion.tolist()}


def shifted_agreement(logits: torch.Tensor, labels: torch.Tensor, counts: list[int], shifts: list[float]) -> dict:
    """{a: agreement (%) of argmax(logits + a log pi_c) with labels} for each shift a."""
    logpi = log_prior(counts).to(logits)
    return {f"{a:g}": 100 * ((logits + a * logpi).argmax(1) == labels).float().mean().item() for a in shifts}


def main(argv=None) -> dict:
    args = parse_args(argv)
    s = decoded_set(args.distilled)
    labelled_by = s.teacher  # {"path", "sha256"} of the teacher that made its soft labels, if it has them
    path = args.teacher or (Path(labelled_by["path"]) if labelled_by else None)
    if path is None:
        raise SystemExit(f"{args.distilled} has no soft labels, so no teacher of its own: pass --teacher <file>")
    blob, sha = read_teacher(path)
    if args.teacher is None and sha != labelled_by["sha256"]:
        raise SystemExit(f"{path} is not the teacher that labelled {args.distilled} (sha256 differs): it was "
                         "trained again since; pass --teacher to use it anyway")
    d = s.config["dataset"]
    net = trained_network(blob, d["channels"], d["num_classes"], d["image_size"])
    teacher = Teacher(net, blob["provenance"]["counts"], path, sha)
    c = len(s.real_counts)
    clamped = normalise(to_uint8(s.images, s.mean, s.std), s.mean, s.std)
    raw_z, clamped_z = teacher.logits(s.images), teacher.logits(clamped)
    report = {"distilled": str(args.distilled), "teacher": str(path), "images": len(s.labels), "factor": s.factor,
              "class_counts": s.real_counts, "clipped_fraction": clipped_fraction(s.images, s.mean, s.std),
              "raw": agreement(raw_z, s.labels, c), "clamped": agreement(clamped_z, s.labels, c),
              "shifted": shifted_agreement(raw_z, s.labels, s.real_counts, args.shifts)}
    print(f"{len(s.labels)} decoded images; teacher {path}")
    print(f"pixel values outside the valid range: {100 * report['clipped_fraction']:.1f} %")
    for name in ("raw", "clamped"):
        a = report[name]
        per = ", ".join("-" if v is None else f"{v:.0f}" for v in a["per_class"])
        print(f"{name:8s} agreement {a['agree']:.2f} %, mean p(class) {a['p_class']:.3f}; per class: {per}")
    print("prior shift a -> agreement: " + ", ".join(f"{a}: {v:.2f}" for a, v in report["shifted"].items()))
    if args.out:
        files.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
