"""The extractor's precision (config `precision`): what `auto` resolves to, the refusal of bf16 where it is not
native, and a bf16 forward whose features, statistics and image gradients stay fp32 and close to fp32's."""
from __future__ import annotations

import pytest
import torch

from csdm_dist import spectral as S
from csdm_dist.config import ConfigError, ExtractorConfig, to_config
from csdm_dist.extractors import Extractor, bf16_support, resolve_precision
from runs import compose_cfg

CPU = torch.device("cpu")


def _cpu_probes(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize("avx512_bf16, amx, auto", [(True, False, "bf16"), (False, True, "bf16"),
                                                     (False, False, "fp32")])
def test_auto_is_bf16_exactly_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, auto):
    _cpu_probes(monkeypatch, avx512_bf16, amx)
    assert resolve_precision("auto", CPU) == auto
    assert resolve_precision("fp32", CPU) == "fp32"
    assert bf16_support(CPU)[0] == (auto == "bf16")


def test_bf16_without_native_support_is_refused_with_the_reason(monkeypatch):
    _cpu_probes(monkeypatch, False, False)
    with pytest.raises(ConfigError, match=r"`precision`.*neither AVX512-BF16 nor AMX.*precision=fp32"):
        resolve_precision("bf16", CPU)
    with pytest.raises(ConfigError, match=r"`precision`"):
        Extractor(ExtractorConfig(), 1, 10, 28, CPU, normalize=True, precision="bf16")


def test_unknown_precision_is_refused_at_start_up():
    with pytest.raises(ConfigError, match=r"`precision`: 'fp16' is not one of auto, fp32, bf16"):
        to_config(compose_cfg(["precision=fp16"]))


@pytest.mark.skipif(not bf16_support(CPU)[0], reason="this CPU has no native bf16")
def test_bf16_forward_gives_fp32_features_statistics_and_gradients_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    nets = {p: Extractor(ExtractorConfig(), 1, 10, 28, CPU, normalize=True, precision=p) for p in ("fp32", "bf16")}
    for ex in nets.values():
        ex.prepare(torch.Generator().manual_seed(1))  # the same random weights in both
    x = torch.randn(64, 1, 28, 28, generator=g)
    labels = torch.arange(64) % 10
    t = S.sample_frequencies("gaussian", 256, nets["fp32"].feature_dim, 1.0, g)
    out = {}
    for p, ex in nets.items():
        xi = x.clone().requires_grad_(True)
        z = ex.embed(xi)
        stats = S.class_statistics(z, labels, 10, t)
        stats[0].sum().backward()
        out[p] = (z, stats[0], xi.grad)
    for (a, b), tol in zip(zip(out["fp32"], out["bf16"]), (0.02, 0.02, 0.15)):
        assert b.dtype == torch.float32
        assert not torch.equal(a, b)  # bf16 really ran
        # bf16 keeps ~3 significant digits per op; the pixel gradient goes back through every layer in bf16
        assert (a - b).norm() <= tol * a.norm()
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 1 - tol
