"""The soft-label track's maths and checks (issue #11) against hand computations: logit adjustment, prior
adjustment, the KD loss, the soft-label size, the balanced batch-norm pass, the evaluation architectures, and the
start-up refusals (teacher provenance, eval.labels, eval.arch, tau < 0).

Run: .venv/bin/python -m pytest tests/unit/test_teacher.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csdm_dist.config import ARCHS, ConfigError, EvalConfig, to_config
from csdm_dist.errors import UserError
from csdm_dist.models import build_network, reinit_
from csdm_dist.runinfo import config_hash
from csdm_dist.softlabels import (adjusted_logits, kd_loss, log_prior, prior_shifted, soft_label_bytes, soft_targets,
                                  teacher_loss, training_tau)
from csdm_dist.teacher import (TEACHER_KIND, balanced_indices, check_teacher, default_teacher_path, read_teacher,
                               recalibrate_bn, trained_network)
from runs import compose_cfg

COUNTS = [6, 3, 1]
LOGITS = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])


def test_log_prior_and_logit_adjustment_by_hand():
    pi = [0.6, 0.3, 0.1]
    torch.testing.assert_close(log_prior(COUNTS), torch.tensor([math.log(p) for p in pi]))
    want = torch.tensor([[1 + 2 * math.log(0.6), 2 + 2 * math.log(0.3), 3 + 2 * math.log(0.1)],
                         [0.5 + 2 * math.log(0.6), -1 + 2 * math.log(0.3), 0 + 2 * math.log(0.1)]])
    torch.testing.assert_close(adjusted_logits(LOGITS, COUNTS, 2.0), want)
    torch.testing.assert_close(adjusted_logits(LOGITS, COUNTS, 0.0), LOGITS)
    with pytest.raises(ValueError, match="positive"):
        log_prior([3, 0, 1])


def test_teacher_losses_by_hand():
    y = torch.tensor([2, 0])
    z = [[1 + math.log(0.6), 2 + math.log(0.3), 3 + math.log(0.1)],
         [0.5 + math.log(0.6), -1 + math.log(0.3), 0 + math.log(0.1)]]  # tau = 1
    ce = [-(z[0][2] - math.log(sum(math.exp(v) for v in z[0]))), -(z[1][0] - math.log(sum(math.exp(v) for v in z[1])))]
    hand = torch.tensor(sum(ce) / 2)
    torch.testing.assert_close(teacher_loss(LOGITS, y, COUNTS, "logit_adjusted", 1.0), hand)
    torch.testing.assert_close(teacher_loss(LOGITS, y, COUNTS, "balanced_softmax", 7.0), hand)  # tau = 1 always
    torch.testing.assert_close(teacher_loss(LOGITS, y, COUNTS, "ce", 7.0), F.cross_entropy(LOGITS, y))
    assert [training_tau(k, 0.5) for k in ("logit_adjusted", "balanced_softmax", "ce")] == [0.5, 1.0, 0.0]


def test_prior_adjustment_by_hand():
    want = torch.tensor([[1 - 0.5 * math.log(0.6), 2 - 0.5 * math.log(0.3), 3 - 0.5 * math.log(0.1)],
                         [0.5 - 0.5 * math.log(0.6), -1 - 0.5 * math.log(0.3), -0.5 * math.log(0.1)]])
    torch.testing.assert_close(prior_shifted(LOGITS, COUNTS, 0.5), want)
    torch.testing.assert_close(prior_shifted(LOGITS, COUNTS, 0.0), LOGITS)
    p = soft_targets(prior_shifted(LOGITS, COUNTS, 1.0), 1.0)  # the shift moves mass to the tail (class 2)
    assert (p[:, 2] > soft_targets(LOGITS, 1.0)[:, 2]).all()


def test_kd_loss_zero_on_agreement_and_cross_entropy_on_one_hot():
    s = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for t in (1.0, 4.0):
        assert kd_loss(s, soft_targets(s, t), t).abs().item() < 1e-6
    y = torch.tensor([0, 3, 1, 1, 2])
    onehot = soft_targets(F.one_hot(y, 4).float() * 1e3, 1.0)
    torch.testing.assert_close(kd_loss(s, onehot, 1.0), F.cross_entropy(s, y))
    # T^2 KL by hand at T = 2
    p, q = soft_targets(s * 0.3, 2.0), torch.softmax(s / 2.0, 1)
    hand = 4.0 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(kd_loss(s, p, 2.0), hand)


def test_soft_label_size():
    assert soft_label_bytes(1000, 50) == 1000 * 50 * 1000 * 4 == 200_000_000  # ImageNet-LT, IPC 50, fp32 logits
    assert soft_label_bytes(10, 10, factor=2) == 10 * 10 * 4 * 10 * 4


def test_balanced_indices_sample_every_class_equally():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 1)
    idx = balanced_indices(labels, 3, 6, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[idx], minlength=3).tolist() == [6, 6, 6]
    assert len(set(idx[labels[idx] == 0].tolist())) == 6  # enough images: without replacement
    assert set(idx[labels[idx] == 2].tolist()) == {14}  # one image: drawn with replacement


def test_recalibrated_batch_norm_is_the_average_of_the_balanced_batches():
    class Norm:
        def __call__(self, x):
            return x.float()

    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    reinit_(net, torch.Generator().manual_seed(0))
    images = torch.randn(12, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    order = torch.arange(12)
    net[1].running_mean.fill_(5.0)
    n = recalibrate_bn(net, images, order, Norm(), 4, 0, 1, torch.device("cpu"))
    with torch.no_grad():
        means = torch.stack([net[0](images[i:i + 4]).mean((0, 2, 3)) for i in (0, 4, 8)])
    assert n == 3 and net[1].momentum == 0.1 and int(net[1].num_batches_tracked) == 3
    torch.testing.assert_close(net[1].running_mean, means.mean(0))
    assert recalibrate_bn(nn.Sequential(nn.Conv2d(1, 2, 1)), images, order, Norm(), 4, 0, 1,
                          torch.device("cpu")) == 0  # no batch norm: nothing to do


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_every_architecture_forwards(arch, channels, size):
    net = reinit_(build_network(arch, channels, 7, size, width=16, depth=2), torch.Generator().manual_seed(0))
    out = net(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    assert net.embed(torch.randn(2, channels, size, size)).shape == (2, net.feature_dim)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [28, 32])
def test_every_architecture_with_instance_norm_tells_images_apart(arch, size):
    """No layer reduces the features to a constant: an instance norm on a 1x1 map outputs its bias alone (VGG-11 at
    28 px did, and every evaluation network trained on it scored 10 %)."""
    net = reinit_(build_network(arch, 1, 7, size, width=16, depth=2, norm="instancenorm"),
                  torch.Generator().manual_seed(0)).eval()
    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        spread = net.embed(x).std(0).mean()  # over the images, per feature: about 0.3 where nothing collapses
    assert spread > 1e-2


def test_unknown_eval_arch_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"eval\.arch.*'vgg16'.*convnet.*resnet18.*vgg11.*alexnet"):
        EvalConfig(arch="vgg16")
    with pytest.raises(ConfigError, match=r"eval\.arch"):
        to_config(compose_cfg(["eval.arch=lenet"]))


@pytest.mark.parametrize("override,key", [("teacher.tau=-0.5", "teacher.tau"),
                                          ("labels.prior_adjust=-1", "labels.prior_adjust"),
                                          ("labels.temperature=0", "labels.temperature"),
                                          ("teacher.loss=focal", "teacher.loss"),
                                          ("teacher.tile_factors=[]", "teacher.tile_factors"),
                                          ("teacher.tile_factors=[2,0]", "teacher.tile_factors"),
                                          ("labels.kind=fuzzy", "labels.kind"),
                                          ("eval.labels=soft", "eval.labels"),  # labels.kind=hard stores none
                                          ("eval.relabel=online", "eval.relabel"),  # a hard track
                                          ("eval.hard_weight=0.5", "eval.hard_weight"),  # a hard track
                                          ("eval.hard_weight=1.5", "eval.hard_weight")])
def test_bad_soft_label_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_config(compose_cfg([override]))


def test_evaluate_cli_checks_the_track_when_it_is_given():
    with pytest.raises(ConfigError, match=r"eval\.hard_weight"):
        EvalConfig(labels="hard", hard_weight=0.5)
    with pytest.raises(ConfigError, match=r"eval\.relabel"):
        EvalConfig(labels="hard", relabel="online")
    assert EvalConfig(hard_weight=0.5, relabel="online").labels is None  # the set's own track, resolved later


def test_soft_track_settings_that_fit():
    cfg = to_config(compose_cfg(["labels.kind=soft"]))
    assert cfg.eval.labels == "soft"  # eval.labels=null follows labels.kind
    cfg = to_config(compose_cfg(["eval.labels=soft", "eval.relabel=online"]))  # online needs no stored labels
    assert cfg.labels.kind == "hard" and cfg.eval.labels == "soft"


def test_hard_runs_keep_their_hash_and_soft_runs_hash_the_teacher():
    base = config_hash(to_config(compose_cfg([])))
    assert config_hash(to_config(compose_cfg(["teacher.epochs=3", "labels.temperature=2"]))) == base
    soft = config_hash(to_config(compose_cfg(["labels.kind=soft"])))
    assert soft != base != config_hash(to_config(compose_cfg(["labels.kind=soft", "teacher.arch=resnet18"])))
    assert soft != config_hash(to_config(compose_cfg(["labels.kind=soft", "teacher.arch=resnet18"])))


def test_default_teacher_path_names_its_settings():
    cfg = to_config(compose_cfg(["teacher.loss=balanced_softmax", "teacher.arch=vgg11", "seed=3"]))
    path = default_teacher_path(cfg)
    assert path.parent.name == "teachers" and path.name == "vgg11-batchnorm-bs-e30-s3.pt"
    assert default_teacher_path(to_config(compose_cfg([]))).name == "convnet-w128-d3-batchnorm-la1-e30-s0.pt"
    tiles = to_config(compose_cfg(["teacher.tile_factors=[1,2]"]))
    assert default_teacher_path(tiles).name == "convnet-w128-d3-batchnorm-la1-e30-f12-s0.pt"
    assert default_teacher_path(to_config(compose_cfg(["teacher.tile_factors=[3,1,2,1]"]))).name == \
        "convnet-w128-d3-batchnorm-la1-e30-f123-s0.pt"


def _provenance(**changes):
    p = {"dataset": "fake", "data_config_hash": "abc", "ids_hash": "def", "counts": [3, 1], "channels": 1,
         "image_size": 28, "mean": [0.5], "std": [0.25], "arch": "convnet", "width": 16, "depth": 2,
         "norm": "batchnorm", "loss": "logit_adjusted", "tau": 1.0, "tile_factors": [1, 2]}
    p.update(changes)
    return p


def test_teacher_of_another_build_or_network_is_refused_naming_the_key():
    check_teacher("t.pt", _provenance(), _provenance())
    with pytest.raises(ConfigError, match=r"`labels\.teacher`.*another dataset build.*data_config_hash.*"
                                          r"python -m csdm_dist\.teacher"):
        check_teacher("t.pt", _provenance(data_config_hash="xyz"), _provenance())
    with pytest.raises(ConfigError, match=r"`labels\.teacher`.*counts"):
        check_teacher("t.pt", _provenance(counts=[3, 2]), _provenance())
    with pytest.raises(ConfigError, match=r"`teacher\.arch`.*arch='resnet18'.*arch='convnet'"):
        check_teacher("t.pt", _provenance(arch="resnet18", width=None, depth=None), _provenance())
    with pytest.raises(ConfigError, match=r"`teacher\.loss`, `teacher\.tau`"):
        check_teacher("t.pt", _provenance(loss="ce", tau=0.0), _provenance())
    old = {k: v for k, v in _provenance().items() if k != "tile_factors"}  # a teacher from before tile_factors
    check_teacher("t.pt", old, _provenance(tile_factors=[1]))  # it learnt sharp images alone
    with pytest.raises(ConfigError, match=r"`teacher\.tile_factors`.*tile_factors=\[1\].*tile_factors=\[1, 2\]"):
        check_teacher("t.pt", old, _provenance())


def test_a_teacher_file_gives_back_its_network_and_other_files_are_refused(tmp_path):
    net = reinit_(build_network("convnet", 1, 2, 28, 16, 2, "batchnorm"), torch.Generator().manual_seed(3)).eval()
    path = tmp_path / "t.pt"
    torch.save({"kind": TEACHER_KIND, "provenance": _provenance(), "state_dict": net.state_dict()}, path)
    back = trained_network(read_teacher(path)[0], channels=1, num_classes=2, image_size=28)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)  # built as the provenance records, weights loaded
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    torch.save({"members": []}, tmp_path / "pool.pt")
    with pytest.raises(UserError, match=r"pool\.pt is not a teacher file.*labels\.teacher"):
        read_teacher(tmp_path / "pool.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"junk\.pt is not a readable teacher file \(UnpicklingError\): .*"
                                          r"python -m csdm_dist\.teacher`; train it again"):
        read_teacher(tmp_path / "junk.pt")


def test_evaluation_record_names_the_track_and_its_class_weight():
    from csdm_dist.config import EvalConfig
    from csdm_dist.evaluate import eval_record_name

    assert eval_record_name(EvalConfig(labels="hard", repeats=3)) == "eval-dm-300ep-x3.json"
    assert eval_record_name(EvalConfig(labels="soft", arch="vgg11")) == "eval-dm-300ep-x2-vgg11-soft.json"
    assert eval_record_name(EvalConfig(labels="soft", relabel="online", hard_weight=0.5, epochs=30)) == \
        "eval-dm-30ep-x2-soft-online-hw0.5.json"
    # a val evaluation never overwrites the test record of the same protocol, network and track
    assert eval_record_name(EvalConfig(labels="soft", arch="vgg11", split="val")) == \
        "eval-dm-300ep-x2-val-vgg11-soft.json"
    # nor a quick one-network check the 3-network record, nor a changed training recipe the default one
    names = {eval_record_name(EvalConfig(labels="hard", **kw)) for kw in
             ({}, {"repeats": 1}, {"repeats": 3}, {"batch_size": 64}, {"augment": False}, {"test_points": 5})}
    assert len(names) == 6 and "eval-dm-300ep-x2-bs64.json" in names and "eval-dm-300ep-x2-noaug.json" in names
    # weights that six significant digits would name alike get every digit; the short names stay as they were
    close = [eval_record_name(EvalConfig(labels="soft", hard_weight=w)) for w in (0.1234561, 0.1234564, 1.0)]
    assert close == ["eval-dm-300ep-x2-soft-hw0.1234561.json", "eval-dm-300ep-x2-soft-hw0.1234564.json",
                     "eval-dm-300ep-x2-soft-hw1.json"]
