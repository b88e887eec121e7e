"""distill.syn_chunk: the synthetic side's forward and statistics chunk by chunk under activation checkpointing
give the unchunked class sums and pixel gradients, while autograd holds a fraction of the activations."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from csdm_dist import formation
from csdm_dist import spectral as S
from csdm_dist.dist import close_distributed, init_distributed
from csdm_dist.models import build_network

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import build_distiller, compose  # noqa: E402

C, M = 10, 32


def saved_bytes():
    """A context counting the bytes autograd saves for the backward (what stays alive until it runs)."""
    held = [0]

    def pack(t: torch.Tensor):
        held[0] += t.numel() * t.element_size()
        return t

    return held, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


@pytest.mark.parametrize("op,teacher", [("crop", False), ("rotate", False), (None, False), ("crop", True)])
def test_chunked_synthetic_statistics_equal_the_unchunked(tmp_path, op, teacher):
    """teacher: also the teacher cross-entropy sum of labels.teacher_ce, computed in the same chunks."""
    cfg = compose(["dataset=cifar10_lt", "ipc=4", "synthetic.factor=2", "extractor.width=16", "extractor.depth=2",
                   f"method.kernel.num_freqs={M}", "precision=fp32", "device=cpu"])
    rt = init_distributed("cpu")
    try:
        d = build_distiller(cfg, rt, tmp_path)
        if teacher:  # a frozen network as the teacher of the cross-entropy term
            d.teacher = build_network("convnet", 3, C, 32, 8, 2).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        d.extractor.prepare(g)
        freqs = S.sample_frequencies("gaussian", M, d.extractor.feature_dim, 1.0, g)
        decoded = formation.decode(d.engine().float(), 2).detach()  # 10 classes x 4 x 2^2 = 160 images
        w = torch.randn(C, 2 * M, generator=g)
        out = {}
        for chunk in (None, 48):  # 48: three full chunks and a partial one
            d.cfg.distill.syn_chunk = chunk
            x = decoded.clone().requires_grad_(True)
            held, hooks = saved_bytes()
            with hooks:
                sums, counts, ce = d.syn_statistics(x, freqs, op, step=3)
            ((sums * w).sum() + ce).backward()
            out[chunk] = sums.detach(), counts, x.grad, held[0], float(ce.detach())
    finally:
        close_distributed()
    (s0, n0, g0, b0, ce0), (s1, n1, g1, b1, ce1) = out[None], out[48]
    assert (ce0 > 0) == teacher and ce1 == pytest.approx(ce0, rel=1e-5)
    assert torch.equal(n0, n1) and n0.sum() == len(decoded)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    assert g0.abs().sum() > 0
    print(f"saved for the backward: {b0 / 1e6:.2f} MB unchunked, {b1 / 1e6:.2f} MB in chunks of 48")
    assert b1 < b0 / 3, (b0, b1)  # one chunk's activations at a time, not all 160 images'


def test_memory_estimate_holds_one_chunk_of_synthetic_activations():
    from csdm_dist.memory import activation_bytes, estimate_memory

    over = ["dataset=imagenet_lt", "ipc=10", "synthetic.factor=2", "device=cpu"]
    rows = {}
    for chunk in ("null", "1000"):
        cfg = compose(over + [f"distill.syn_chunk={chunk}"])
        rows[chunk] = dict((name, b) for name, b, _ in estimate_memory(cfg, 2, 115846).rows)
    kept, n = activation_bytes(cfg)[0], 1000 * 10 // 2 * 4  # this rank's decoded images: half of 40,000
    assert rows["null"]["activations, synthetic"] == n * kept
    assert rows["1000"]["activations, synthetic"] == 1000 * kept + n * 3 * 64 * 64 * 4
    # without chunks the synthetic side also keeps every image's projection [n, M] for the backward
    assert rows["null"]["statistics, synthetic side"] > rows["1000"]["statistics, synthetic side"]
    moved = ("activations, synthetic", "statistics, synthetic side")
    assert {k: v for k, v in rows["null"].items() if k not in moved} == \
        {k: v for k, v in rows["1000"].items() if k not in moved}


def test_memory_estimate_counts_the_teacher_of_the_cross_entropy_term():
    """labels.teacher_ce > 0: the teacher's activations for the rows of the synthetic pass, per image as many bytes
    as autograd keeps alive through a batch of 6 real images (measured here, independently of the estimate)."""
    from csdm_dist.memory import estimate_memory, teacher_kept_bytes

    over = ["dataset=cifar10_lt", "ipc=10", "synthetic.factor=2", "device=cpu", "labels.kind=soft",
            "teacher.arch=convnet", "teacher.width=16", "teacher.depth=2"]
    plain = dict((n, b) for n, b, _ in estimate_memory(compose(over), 2, 10000).rows)
    rows = {}
    for chunk in ("null", "64"):
        cfg = compose(over + ["labels.teacher_ce=1", f"distill.syn_chunk={chunk}"])
        rows[chunk] = dict((n, b) for n, b, _ in estimate_memory(cfg, 2, 10000).rows)
    per = teacher_kept_bytes(cfg)
    assert rows["null"]["activations, teacher (labels.teacher_ce)"] == 10 * 10 // 2 * 4 * per  # 200 decoded rows
    assert rows["64"]["activations, teacher (labels.teacher_ce)"] == 64 * per
    assert "activations, teacher (labels.teacher_ce)" not in plain
    assert {k: v for k, v in rows["null"].items() if "teacher" not in k} == plain

    net = build_network("convnet", 3, C, 32, 16, 2, "batchnorm").eval().requires_grad_(False)
    own = {p.untyped_storage().data_ptr() for p in [*net.parameters(), *net.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in own:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.randn(6, 3, 32, 32, requires_grad=True))
    assert per * 6 == sum(storages.values()) > 6 * 16 * 32 * 32 * 4  # at least the first block's output map


def test_a_refusal_names_the_setting_of_its_largest_item():
    from csdm_dist.config import ConfigError
    from csdm_dist.memory import check_fits, estimate_memory

    est = estimate_memory(compose(["dataset=imagenet_lt", "ipc=50", "device=cpu"]), 1, 115846)
    with pytest.raises(ConfigError, match=r"largest item is activations, synthetic .* Set distill\.syn_chunk .*"
                                          r"force_memory=true"):
        check_fits(est, 1, 2**30)


def test_the_total_counts_held_items_and_the_largest_phase_only():
    from csdm_dist.memory import estimate_memory

    est = estimate_memory(compose(["dataset=imagenet_lt", "ipc=10", "distill.syn_chunk=1024", "device=cpu"]), 2,
                          115846)
    per = est.phase_bytes()
    assert set(per) == {"real forward", "real statistics", "synthetic pass"}
    held = sum(b for name, b, _ in est.rows if name not in dict(est.phases))
    assert est.total == held + max(per.values()) < sum(b for _, b, _ in est.rows)
    table = est.table()
    assert f"the largest, {max(per, key=per.get)}, counts" in table and "[real forward] real batch (fp32)" in table
