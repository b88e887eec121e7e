"""The soft-label track end to end on the tiny fake Fashion-MNIST-LT (issue #11): a teacher trained for one epoch,
a labels.kind=soft distillation storing the teacher's logits of its decoded images, their evaluation (stored soft
labels, online relabelling, other architectures, the evaluate CLI), KD that behaves like hard labels on one-hot
soft labels, and the start-up refusals (teacher of another build or architecture, no soft labels, no teacher).

Run: .venv/bin/python -m pytest tests/integration/test_soft_labels.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from csdm_dist import formation
from csdm_dist.config import ConfigError, EvalConfig, ExtractorConfig, to_config
from csdm_dist.data.shards import dataset_dir, load_manifest, read_split
from csdm_dist.dist import close_distributed, init_distributed
from csdm_dist.distiller import Normalizer
from csdm_dist.distilled import decoded_set
from csdm_dist.errors import UserError
from csdm_dist.evaluate import evaluate_file, train_and_test
from csdm_dist.files import file_sha256
from csdm_dist.softlabels import log_prior, soft_label_bytes, soft_targets
from csdm_dist.teacher import load_teacher, results_path, train_teacher
from runs import TINY, compose_cfg, distil

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ["teacher.width=16", "teacher.depth=2", "teacher.epochs=1", "teacher.batch_size=32"]


@pytest.fixture(scope="module")
def teacher_file(data_overrides, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    cfg = to_config(compose_cfg(data_overrides + TEACHER + [f"labels.teacher={path}", "device=cpu"], name="teacher"))
    rt = init_distributed("cpu")
    try:
        train_teacher(cfg, rt)
    finally:
        close_distributed()
    return path


@pytest.fixture(scope="module")
def soft_run(data_overrides, teacher_file, tmp_path_factory):
    """A labels.kind=soft distillation at synthetic.factor=2 with a prior shift, evaluated on the soft track."""
    out = tmp_path_factory.mktemp("soft") / "run"
    cfg, res = distil(data_overrides + TINY + TEACHER + [
        "labels.kind=soft", f"labels.teacher={teacher_file}", "labels.prior_adjust=0.5", "synthetic.factor=2",
        "distill.iterations=2", "eval.protocol=ncfm", f"out_dir={out}"])
    return cfg, res, out


def test_teacher_file_and_its_results(teacher_file):
    blob = torch.load(teacher_file, weights_only=True)
    prov = blob["provenance"]
    assert prov["arch"] == "convnet" and prov["loss"] == "logit_adjusted" and prov["tau"] == 1.0
    assert prov["counts"] == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3] and prov["ids_hash"] and prov["data_config_hash"]
    record = json.loads(results_path(teacher_file).read_text())
    assert record["sha256"] == file_sha256(teacher_file)
    acc = record["accuracy"]
    assert record["split"] == "test" and 0 <= acc["mean"] <= 100 and len(acc["per_class"]) == 10
    assert {"many", "medium", "few"} <= acc.keys()
    # 118 images // 10 classes = 11 per class; 110 in batches of 32
    assert record["bn_pass"]["per_class"] == 11 and record["bn_pass"]["batches"] == 4
    bn = blob["state_dict"]["features.1.running_mean"]
    assert torch.isfinite(bn).all() and int(blob["state_dict"]["features.1.num_batches_tracked"]) == 4


def test_soft_distillation_stores_the_teachers_logits_of_the_decoded_images(soft_run, teacher_file, capsys):
    cfg, res, out = soft_run
    blob = torch.load(out / "distilled.pt", weights_only=False)
    soft = blob["soft_labels"]
    assert soft.dtype == torch.float32 and soft.shape == (2 * 10 * 4, 10) and blob["temperature"] == 4.0
    teacher = load_teacher(cfg, load_manifest(dataset_dir(cfg.dataset)), torch.device("cpu"))
    decoded = formation.decode(blob["images"], 2)
    torch.testing.assert_close(soft, teacher.logits(decoded, 0.5))  # in decoded order, after the prior shift
    plain = teacher.logits(decoded)
    torch.testing.assert_close(soft, plain - 0.5 * log_prior(blob["class_counts"]))
    saved = json.loads((out / "results.json").read_text())
    assert saved["labels"] == "soft" and saved["accuracy"]["labels"] == "soft"
    assert saved["baseline_random"]["labels"] == "soft"  # the baseline is labelled by the same teacher
    assert saved["soft_labels"]["bytes"] == soft_label_bytes(10, 2, 2) == soft.numel() * 4
    assert saved["soft_labels"]["teacher"] == str(teacher_file)
    assert res["accuracy"]["train_images"] == 80


def test_teacher_agreement_reports_how_the_teacher_sees_the_decoded_images(soft_run, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import teacher_agreement as ta

    # the pure parts against a hand computation: 3 images of classes 0, 1, 1; the teacher says 0, 0, 1
    z = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    a = ta.agreement(z, torch.tensor([0, 1, 1]), 2)
    assert a["agree"] == pytest.approx(200 / 3) and a["per_class"] == [100.0, 50.0]
    assert a["confusion"] == [[1, 0], [1, 1]]
    p = z.softmax(1)
    assert a["p_class"] == pytest.approx(float(p[0, 0] + p[1, 1] + p[2, 1]) / 3)
    # counts 1 : 9, shift a = 1 adds log 0.1 and log 0.9: image 1 (margin 1.0 < log 9) goes to class 1
    assert ta.shifted_agreement(z, torch.tensor([0, 1, 1]), [1, 9], [0.0, 1.0]) == pytest.approx(
        {"0": 200 / 3, "1": 200 / 3})
    assert ta.shifted_agreement(z[1:], torch.tensor([1, 1]), [1, 9], [0.0, 1.0]) == pytest.approx(
        {"0": 50.0, "1": 100.0})

    # on a soft set: the set's own teacher, whose plain logits are the stored ones plus the prior shift undone
    _, _, out = soft_run
    report = ta.main([str(out / "distilled.pt"), "--shifts", "0", "0.5", "--out", str(tmp_path / "r.json")])
    blob = torch.load(out / "distilled.pt", weights_only=False)
    plain = blob["soft_labels"] + 0.5 * log_prior(blob["class_counts"])
    labels = torch.arange(10).repeat_interleave(2 * 4)  # ipc 2 x 4 tiles per class, in decoded order
    want = ta.agreement(plain, labels, 10)
    assert report["images"] == 80 and report["raw"]["confusion"] == want["confusion"]
    assert report["raw"]["agree"] == pytest.approx(want["agree"]) and report["raw"]["per_class"] == want["per_class"]
    assert report["shifted"]["0"] == pytest.approx(report["raw"]["agree"])
    assert 0 <= report["clipped_fraction"] <= 1 and json.loads((tmp_path / "r.json").read_text())["images"] == 80


def test_soft_set_evaluates_on_every_track_and_architecture(soft_run):
    _, _, out = soft_run
    path = out / "distilled.pt"
    acc = evaluate_file(path, {"labels": "soft", "protocol": "dm", "epochs": 1, "repeats": 1, "arch": "vgg11"}, "cpu")
    assert acc["labels"] == "soft" and acc["arch"] == "vgg11" and len(acc["per_class"]) == 10
    assert (out / "eval-dm-1ep-x1-vgg11-soft.json").is_file()
    online = evaluate_file(path, {"relabel": "online", "epochs": 1, "repeats": 1}, "cpu")  # teacher from the config
    assert online["relabel"] == "online" and online["labels"] == "soft"
    hard = evaluate_file(path, {"labels": "hard", "epochs": 1, "repeats": 1}, "cpu")
    assert hard["labels"] == "hard" and hard["arch"] == "convnet" and (out / "eval-ncfm-1ep-x1.json").is_file()


def test_evaluation_reads_soft_labels_as_load_distilled_does(soft_run, tmp_path):
    """One reader (distilled.decoded_set, as load_distilled): the stored logits, the same labels stored as
    probabilities, and one row per decoded image or per stored image (its f^2 tiles share it) all train the same
    networks."""
    _, _, out = soft_run
    blob = torch.load(out / "distilled.pt", weights_only=False)
    z, t, f = blob["soft_labels"], blob["temperature"], blob["factor"]
    per_stored = z.reshape(-1, f * f, z.shape[1])[:, 0]  # every tile of a stored image gets its first tile's label
    ev = {"labels": "soft", "protocol": "dm", "epochs": 1, "repeats": 1}
    accs = {}
    for name, labels in (("logits_decoded", per_stored.repeat_interleave(f * f, 0)), ("logits_stored", per_stored),
                         ("probs_stored", torch.softmax(per_stored / t, 1))):
        (tmp_path / name).mkdir()
        torch.save({**blob, "soft_labels": labels}, tmp_path / name / "distilled.pt")
        accs[name] = evaluate_file(tmp_path / name / "distilled.pt", ev, "cpu")["per_class"]
    assert accs["logits_stored"] == accs["logits_decoded"]
    one = tmp_path / "probs_stored" / "distilled.pt"  # the record names the bytes it decoded, read once
    assert decoded_set(one).sha256 == file_sha256(one) != file_sha256(out / "distilled.pt")
    assert accs["probs_stored"] == pytest.approx(accs["logits_decoded"], abs=1e-4)
    torch.save({**blob, "soft_labels": z[:-1]}, tmp_path / "distilled.pt")  # one row short
    with pytest.raises(UserError, match=r"soft_labels has shape .* must be \[N, 10\] with N the \d+ stored or the"):
        evaluate_file(tmp_path / "distilled.pt", ev, "cpu")
    torch.save({**blob, "temperature": None}, tmp_path / "distilled.pt")
    with pytest.raises(UserError, match=r"are logits .* no temperature > 0 .* save `temperature` with them"):
        evaluate_file(tmp_path / "distilled.pt", ev, "cpu")
    torch.save({**blob, "soft_labels": torch.softmax(z / t, 1), "temperature": None}, tmp_path / "distilled.pt")
    with pytest.raises(UserError, match=r"without a temperature > 0"):  # the KD loss is taken at T
        evaluate_file(tmp_path / "distilled.pt", ev, "cpu")
    torch.save({**blob, "class_counts": blob["class_counts"][:-1]}, tmp_path / "distilled.pt")
    with pytest.raises(UserError, match=r"class_counts .* not one count per class of its 10 classes"):
        evaluate_file(tmp_path / "distilled.pt", ev, "cpu")
    assert not list(tmp_path.glob("eval-*.json"))  # refused before evaluating anything


def test_evaluate_cli_on_soft_labels_and_a_set_without_them(soft_run, data_overrides, tmp_path):
    _, _, out = soft_run
    ok = subprocess.run([sys.executable, "-m", "csdm_dist.evaluate", f"distilled={out / 'distilled.pt'}",
                         "eval.labels=soft", "eval.arch=alexnet", "eval.epochs=1", "eval.repeats=1", "device=cpu"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "labels: soft, alexnet" in ok.stdout and (out / "eval-ncfm-1ep-x1-alexnet-soft.json").is_file()
    distil(data_overrides + TINY + ["distill.iterations=1", "evaluate=false", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"`eval\.labels`.*has none.*eval\.labels=hard.*labels\.kind=soft"):
        evaluate_file(tmp_path / "distilled.pt", {"labels": "soft"}, "cpu")  # what the CLI prints, exit code 2
    assert not list(tmp_path.glob("eval-*.json"))  # refused before evaluating anything


@pytest.mark.parametrize("protocol", ["dm", "ncfm"])
def test_one_hot_soft_labels_train_like_hard_labels(data_overrides, protocol):
    cfg = to_config(compose_cfg(data_overrides + TINY))
    ddir = dataset_dir(cfg.dataset)
    train, test = read_split(ddir, "train"), read_split(ddir, "test")
    norm = Normalizer.build(cfg.dataset.mean, cfg.dataset.std, torch.device("cpu"))
    images, labels = norm(train.images[:40]), train.labels[:40]
    net = ExtractorConfig(width=16, depth=2)
    common = (test.images, test.labels, norm, 10)
    args = (net, 28, 0, 0, torch.device("cpu"), "t")
    ev = dict(protocol=protocol, epochs=2, repeats=1, batch_size=16)
    hard = train_and_test(images, labels, *common, EvalConfig(labels="hard", **ev), *args)
    soft = train_and_test(images, labels, *common, EvalConfig(labels="soft", **ev), *args,
                          soft_probs=F.one_hot(labels, 10).float(), temperature=1.0)
    torch.testing.assert_close(soft[0], hard[0])
    torch.testing.assert_close(soft[1], hard[1])
    noise = soft_targets(torch.randn(40, 10, generator=torch.Generator().manual_seed(1)) * 5, 4.0)  # far from the class
    hw = dict(labels="soft", **ev)
    only_class = train_and_test(images, labels, *common, EvalConfig(hard_weight=1.0, **hw), *args, soft_probs=noise,
                                temperature=4.0)  # the class term alone: the soft labels do not count
    torch.testing.assert_close(only_class[0], hard[0])
    half = train_and_test(images, labels, *common, EvalConfig(hard_weight=0.5, **hw), *args, soft_probs=noise,
                          temperature=4.0)
    kd = train_and_test(images, labels, *common, EvalConfig(**hw), *args, soft_probs=noise, temperature=4.0)
    assert not torch.equal(half[0], kd[0]) or not torch.equal(half[0], hard[0])  # the mix is neither end


def test_teacher_of_another_architecture_or_build_is_refused_before_the_run(data_overrides, teacher_file, tmp_path):
    over = data_overrides + TINY + TEACHER + ["labels.kind=soft", "distill.iterations=1"]
    with pytest.raises(ConfigError, match=r"`teacher\.arch`.*arch='convnet'.*arch='resnet18'"):
        distil(over + [f"labels.teacher={teacher_file}", "teacher.arch=resnet18", f"out_dir={tmp_path / 'arch'}"])
    blob = torch.load(teacher_file, weights_only=True)
    blob["provenance"]["data_config_hash"] = "0" * 64  # a teacher of another build of the data
    other = tmp_path / "other.pt"
    torch.save(blob, other)
    with pytest.raises(ConfigError, match=r"`labels\.teacher`.*another dataset build.*python -m csdm_dist\.teacher"):
        distil(over + [f"labels.teacher={other}", f"out_dir={tmp_path / 'data'}"])
    with pytest.raises(FileNotFoundError, match=r"python -m csdm_dist\.teacher"):
        distil(over + [f"labels.teacher={tmp_path / 'none.pt'}", f"out_dir={tmp_path / 'none'}"])
    assert not any((tmp_path / d).exists() for d in ("arch", "data", "none"))  # refused before writing anything


def test_teacher_cross_entropy_term_makes_images_the_teacher_labels_as_their_class(data_overrides, teacher_file,
                                                                                   tmp_path):
    """labels.teacher_ce > 0 adds the teacher's mean cross-entropy on the decoded images (their augmented views) to
    the matching loss: logged as distill/teacher_ce, and the set ends with a lower teacher cross-entropy than the run
    without it (same seed, same start); labels.teacher_ce on the hard track or below 0 is refused."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = data_overrides + TINY + TEACHER + ["labels.kind=soft", f"labels.teacher={teacher_file}",
                                              "synthetic.factor=2", "distill.iterations=12", "distill.log_every=1",
                                              "distill.lr=0.05", "evaluate=false"]
    ce = {}
    for w in (0.0, 3.0):
        cfg, _ = distil(over + [f"labels.teacher_ce={w}", f"out_dir={tmp_path / str(w)}"])
        blob = torch.load(tmp_path / str(w) / "distilled.pt", weights_only=False)
        teacher = load_teacher(cfg, load_manifest(dataset_dir(cfg.dataset)), torch.device("cpu"))
        x, y = formation.decode_set(blob["images"], blob["labels"], 2)
        ce[w] = F.cross_entropy(teacher.logits(x), y).item()
    acc = EventAccumulator(str(tmp_path / "3.0" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [e.value for e in acc.Scalars("distill/teacher_ce")]
    assert len(logged) == 12 and logged[-1] < logged[0], logged
    assert "distill/teacher_ce" not in EventAccumulator(str(tmp_path / "0.0" / "tb")).Reload().Tags()["scalars"]
    print(f"teacher cross-entropy of the set: {ce}; logged {logged[0]:.3f} -> {logged[-1]:.3f}")
    assert ce[3.0] < 0.9 * ce[0.0], ce
    with pytest.raises(ConfigError, match=r"`labels\.teacher_ce`.*labels\.kind=soft"):
        to_config(compose_cfg(data_overrides + ["labels.teacher_ce=1"]))
    with pytest.raises(ConfigError, match=r"`labels\.teacher_ce`.*>= 0"):
        to_config(compose_cfg(data_overrides + ["labels.kind=soft", "labels.teacher_ce=-1"]))
