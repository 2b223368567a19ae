"""FID the way papers report it: the FID Inception's preprocessing and weights file, the metrics against
references written from their definitions, and evaluate.py on sample.py's arr_0 and ADM reference batches."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from fpdm import evaluation as evaluate
from fpdm.files import FileKindError
from fpdm.inception import FEATURES, FIDInceptionV3, inception_extractor, resize_like_tensorflow
from fpdm.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from test_command_lines import exit_status
from test_nothing_lost import EXIT_USAGE, one_line

EPS64 = np.finfo(np.float64).eps


# ------------------------------------------------------------------------------------------------------
# The metrics, against their definitions
# ------------------------------------------------------------------------------------------------------


def test_inception_score_is_1_for_one_prediction_and_k_for_balanced_certain_ones():
    same = np.tile(np.array([[2.0, -1.0, 0.5]]), (12, 1))
    assert inception_score(same) == pytest.approx(1.0, abs=1e3 * EPS64)
    certain = np.full((12, 4), -1e4)
    certain[np.arange(12), np.arange(12) % 4] = 0.0  # one-hot, every class 3 times
    assert inception_score(certain) == pytest.approx(4.0, rel=1e3 * EPS64)


def test_inception_score_matches_its_definition_per_split():
    logits = np.random.default_rng(0).standard_normal((10, 5)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = []
    for part in (probs[:4], probs[4:8], probs[8:]):  # splits of 4: the last one shorter
        marginal = part.mean(axis=0)
        scores.append(math.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in part])))
    assert inception_score(logits, split_size=4) == pytest.approx(np.mean(scores), rel=1e4 * EPS64)


def brute_force_precision_recall(real, fake, k):
    def radii(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=2)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(points, centres, r):
        d = np.linalg.norm(points[:, None] - centres[None], axis=2)
        return np.mean([(d[i] <= r).any() for i in range(len(points))])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_and_recall_match_the_k_nearest_neighbour_definition():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((40, 3)), rng.standard_normal((30, 3)) * 1.5 + 0.5
    expected = brute_force_precision_recall(real, fake, k=3)
    assert precision_recall(real, fake, k=3, chunk=7) == pytest.approx(expected, abs=0)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)


def test_chunked_statistics_equal_numpys_covariance_and_fd_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((50, 6)), rng.standard_normal((60, 6)) @ rng.standard_normal((6, 6))
    mean, cov = feature_statistics(a.astype(np.float32), chunk=7)
    np.testing.assert_allclose(mean, a.astype(np.float32).astype(np.float64).mean(axis=0), rtol=0, atol=1e-14)
    np.testing.assert_allclose(cov, np.cov(a.astype(np.float32).astype(np.float64), rowvar=False), atol=1e-13)
    mu_a, sa = a.mean(0), np.cov(a, rowvar=False)
    mu_b, sb = b.mean(0), np.cov(b, rowvar=False)
    reference = np.sum((mu_a - mu_b) ** 2) + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e3 * EPS64 * np.trace(sa))


# ------------------------------------------------------------------------------------------------------
# The network: preprocessing, weights file
# ------------------------------------------------------------------------------------------------------


def test_the_resize_follows_tensorflows_rule_written_out():
    images = torch.arange(2 * 5 * 7, dtype=torch.float64).reshape(1, 2, 5, 7) ** 1.5
    out = resize_like_tensorflow(images, 4)
    expected = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            y, x = i * 5 / 4, j * 7 / 4  # no half-pixel offset
            y0, x0 = math.floor(y), math.floor(x)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            wy, wx = y - y0, x - x0
            top = images[0, :, y0, x0] * (1 - wx) + images[0, :, y0, x1] * wx
            bottom = images[0, :, y1, x0] * (1 - wx) + images[0, :, y1, x1] * wx
            expected[0, :, i, j] = top * (1 - wy) + bottom * wy
    torch.testing.assert_close(out, expected, rtol=0, atol=1e3 * EPS64 * float(images.max()))
    square = images[..., :5]
    assert torch.equal(resize_like_tensorflow(square, 5), square)  # its own size: the identity


def random_inception() -> FIDInceptionV3:
    """The FID Inception with random weights whose activations keep their scale (He initialisation)."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return network.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_inception().state_dict(), path)
    return path


def test_the_weights_file_loads_and_a_file_of_another_network_is_one_line(weights, tmp_path):
    extractor = inception_extractor(weights)
    features = extractor.features(torch.rand(2, 3, 20, 24) * 2 - 1)
    assert {name: tuple(v.shape) for name, v in features.items()} == {k: (2, d) for k, d in FEATURES.items()}
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in features.values())
    state = torch.load(weights, weights_only=True)
    weight = state.pop("Mixed_7c.branch_pool.conv.weight")
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(FileKindError, match=r"has no 'Mixed_7c\.branch_pool\.conv\.weight'"):
        inception_extractor(tmp_path / "partial.pth")
    state["Mixed_7c.branch_pool.conv.weight"] = weight
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's 1000 classes, not the graph's 1008
    torch.save(state, tmp_path / "torchvision.pth")
    with pytest.raises(FileKindError, match=r"'fc.weight' is \(1000, 2048\), expected \(1008, 2048\)"):
        inception_extractor(tmp_path / "torchvision.pth")


# ------------------------------------------------------------------------------------------------------
# evaluate.py on sample.py's npz and ADM reference batches
# ------------------------------------------------------------------------------------------------------


def uint8_images(count, seed):
    return np.random.default_rng(seed).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)


def test_evaluate_scores_arr_0_against_an_adm_reference_batch(weights, tmp_path, capsys):
    images = uint8_images(5, 0)
    labels = np.arange(5) % 3  # sample.py writes them twice: arr_1 for ADM's layout, labels for ours
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=labels, labels=labels)
    extractor = inception_extractor(weights)
    features = extractor.features(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    trace, trace_s = (float(features[k].double().var(dim=0).sum()) for k in ("pool", "spatial"))  # tr(Sigma)
    np.savez(tmp_path / "ref.npz", arr_0=images)  # an ADM batch without statistics: both sides' features
    argv = ["--samples", str(tmp_path / "samples.npz"), "--real", str(tmp_path / "ref.npz"), "--extractor",
            "inception", "--inception-weights", str(weights), "--kid-subset-size", "5", "--kid-subsets", "2",
            "--json", "--out", str(tmp_path / "scores.json")]  # fmt: skip
    assert evaluate.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "scores.json").read_text())
    # The same images on both sides: every distance 0 (float64 rounding of the traces), manifolds equal.
    assert printed["fid"] == printed["fd"] == pytest.approx(0.0, abs=1e4 * EPS64 * trace)
    assert printed["sfid"] == pytest.approx(0.0, abs=1e4 * EPS64 * trace_s)
    assert printed["precision"] == printed["recall"] == 1.0
    assert printed["inception_score"] == pytest.approx(inception_score(features["logits"]), rel=1e-6)
    assert printed["num_images"] == printed["num_real"] == 5 and printed["feature_dim"] == 2048
    assert "class_agreement" not in printed  # labels are judged for digits only; these are not refused


def test_a_reference_of_statistics_alone_gives_the_frechet_distance(tmp_path):
    rng = np.random.default_rng(3)
    projection = torch.from_numpy(rng.standard_normal((3 * 4 * 4, 6)))

    def project(images):
        return images.double().flatten(1) @ projection

    fake, real = (torch.from_numpy(rng.uniform(-1, 1, (30, 3, 4, 4))) for _ in range(2))
    mu, sigma = feature_statistics(project(real))
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    result = evaluate.evaluate_images(fake, real=str(tmp_path / "stats.npz"), extractor=project)
    # The features are kept in float32 (as ADM's evaluator keeps them): their rounding, not more.
    float32 = 100 * float(np.finfo(np.float32).eps)
    assert result["fd"] == pytest.approx(frechet_distance(project(fake), project(real)), rel=float32)
    assert result["num_real"] is None and "precision" not in result and "kid_mean" not in result


def test_images_without_a_channel_axis_are_named_as_such(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", images=np.zeros((6, 8, 8), dtype=np.float32))
    status, err = exit_status(evaluate.main, ["--samples", str(tmp_path / "s.npz")], capsys)
    assert status == EXIT_USAGE and one_line(err) and "(6, 8, 8): the channel axis is missing" in err
    assert "labels" not in err
    np.savez(tmp_path / "s.npz", images=np.zeros((6, 1, 8, 8), dtype=np.float32), labels=np.arange(5))
    status, err = exit_status(evaluate.main, ["--samples", str(tmp_path / "s.npz")], capsys)
    assert status == EXIT_USAGE and one_line(err) and "6 images but 'labels' of shape (5,)" in err
