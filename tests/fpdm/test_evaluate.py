"""Fréchet distance and KID (metrics.py, evaluate.py); the digits classifier and its cache."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from fpdm import digits_classifier
from fpdm import evaluation as evaluate
from fpdm.data import digits_split, load_digits
from fpdm.digits_classifier import (
    ClassifierSettings,
    DigitsClassifier,
    classifier_cache_path,
    load_digits_classifier,
)
from fpdm.evaluation import evaluate_images
from fpdm.inception import InceptionFeatures, inception_extractor
from fpdm.metrics import (
    extract_features,
    frechet_distance,
    frechet_distance_from_statistics,
    kernel_inception_distance,
    mmd2_unbiased,
    polynomial_kernel,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The matrices here are small (at most 1437 x 64): a second thread for torch
    or BLAS costs more in synchronisation than it saves (an eigh 100x slower, measured under load)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache holding the default classifier, trained once for this module."""
    path = tmp_path_factory.mktemp("classifier-cache")
    load_digits_classifier(path)
    return path


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return load_digits_classifier(cache_dir)


@pytest.fixture(scope="module")
def test_features(classifier):
    return extract_features(classifier.features, digits_split("test").images)


def random_spd(d, generator, scale=1.0):
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return (scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))).numpy()


def blur(images):
    """A 3x3 Gaussian blur (sigma 1) with replicated borders."""
    taps = torch.exp(-(torch.arange(-1.0, 2.0) ** 2) / 2)
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel[None, None])


# --- the split and the classifier ---------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_disjoint():
    train, test = digits_split("train"), digits_split("test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8) and -1.0 <= float(train.images.min()) <= float(
        train.images.max()
    )

    # Disjoint and covering: as multisets of (image, label), the two parts add up to the whole set.
    def rows(data):
        return Counter(zip(map(bytes, data.images.flatten(1).numpy()), data.labels.tolist(), strict=True))

    assert rows(train) + rows(test) == rows(load_digits())
    torch.testing.assert_close(digits_split("test").images, test.images)  # the same split every time
    counts_train = torch.bincount(train.labels, minlength=10).double()
    counts_test = torch.bincount(test.labels, minlength=10).double()
    assert ((counts_test / (counts_train + counts_test) - 0.2).abs() < 0.02).all()


def test_classifier_is_accurate_on_the_held_out_split(classifier):
    test = digits_split("test")
    with torch.no_grad():
        accuracy = float((classifier(test.images).argmax(1) == test.labels).double().mean())
    assert accuracy > 0.9
    # The accuracy reported with the cached weights is the accuracy of those weights.
    assert classifier.test_accuracy == pytest.approx(accuracy)
    features = classifier.features(test.images)
    assert features.shape == (360, 64)
    assert 0.3 < float(features.square().mean().sqrt()) < 3.0  # scaled to order one


def test_cache_is_written_once_atomically_and_reused_without_retraining(cache_dir, monkeypatch):
    path = classifier_cache_path(ClassifierSettings(), cache_dir)
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    payload = torch.load(path, weights_only=True)
    assert payload["key"] == ClassifierSettings().key()

    def no_training(settings):
        raise AssertionError("the cached classifier was retrained")

    monkeypatch.setattr(digits_classifier, "train_digits_classifier", no_training)
    reloaded = load_digits_classifier(cache_dir)
    assert path.stat().st_mtime_ns == mtime
    for name, tensor in payload["state_dict"].items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)


def test_classifier_is_trained_only_when_its_cache_file_is_missing(tmp_path, monkeypatch):
    calls = []

    def fake_training(settings):
        calls.append(settings)
        return DigitsClassifier(settings.hidden, settings.feature_dim)

    monkeypatch.setattr(digits_classifier, "train_digits_classifier", fake_training)
    settings = ClassifierSettings(epochs=1)
    load_digits_classifier(tmp_path, settings)
    load_digits_classifier(tmp_path, settings)
    assert calls == [settings]
    load_digits_classifier(tmp_path, ClassifierSettings(epochs=2))  # other settings, other file
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 2


def test_cache_key_follows_the_training_settings(tmp_path):
    default = ClassifierSettings()
    assert classifier_cache_path(default, tmp_path) == classifier_cache_path(ClassifierSettings(), tmp_path)
    others = {
        ClassifierSettings(epochs=3).key(),
        ClassifierSettings(seed=1).key(),
        ClassifierSettings(lr=1e-3).key(),
    }
    assert default.key() not in others and len(others) == 3
    with pytest.raises(ValueError, match="invalid"):
        ClassifierSettings(epochs=0)


# --- the Fréchet distance -----------------------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    # Same eigenvectors: FD = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    a, b = torch.tensor([4.0, 1.0, 0.25, 2.0, 0.0]), torch.tensor([1.0, 9.0, 0.25, 0.5, 1.0])
    mu_a, mu_b = np.zeros(5), np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    sigma_a, sigma_b = (q * a.double()) @ q.T, (q * b.double()) @ q.T
    expected = float(np.sum((mu_a - mu_b) ** 2) + ((a.sqrt() - b.sqrt()) ** 2).sum())
    # sigma_a is singular. Rounding perturbs its zero eigenvalue by about delta = d * eps * |sigma_a|, and
    # the square root turns that into sqrt(delta * |sigma_b|) in tr((sigma_a^1/2 sigma_b sigma_a^1/2)^1/2),
    # whatever the algorithm: FD, which takes that trace twice, is accurate to about
    # 2 sqrt(d eps |sigma_a| |sigma_b|) (2e-7 here), not to a relative 1e-10; the last digits depend on the
    # BLAS kernel and its threads. Allow twice the bound.
    d, eps = 5, np.finfo(np.float64).eps
    bound = 2 * math.sqrt(d * eps * float(a.max()) * float(b.max()))
    got = frechet_distance_from_statistics(mu_a, sigma_a.numpy(), mu_b, sigma_b.numpy())
    assert got == pytest.approx(expected, rel=1e-12, abs=2 * bound)
    # Non-singular covariances have no square root of a rounding error: relative accuracy near eps.
    a_pd = a.double().clamp(min=0.5)
    sigma_pd = (q * a_pd.double()) @ q.T
    expected_pd = float(np.sum((mu_a - mu_b) ** 2) + ((a_pd.sqrt() - b.double().sqrt()) ** 2).sum())
    got_pd = frechet_distance_from_statistics(mu_a, sigma_pd.numpy(), mu_b, sigma_b.numpy())
    assert got_pd == pytest.approx(expected_pd, rel=1e-10)
    # In one dimension: (m_a - m_b)^2 + (s_a - s_b)^2.
    assert frechet_distance_from_statistics([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    gen = torch.Generator().manual_seed(1)
    sigma_a, sigma_b = random_spd(6, gen), random_spd(6, gen, scale=3.0)
    mu_a, mu_b = np.arange(6.0), np.ones(6)
    cross = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2 * cross)
    assert frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_large_gaussian_samples_approaches_the_exact_value():
    gen = torch.Generator().manual_seed(2)
    sigma_a, sigma_b = random_spd(3, gen), random_spd(3, gen, scale=2.0)
    mu_a, mu_b = np.zeros(3), np.array([1.0, 0.0, -1.0])
    exact = frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b)
    n = 200_000
    sample_a = (
        torch.randn(n, 3, generator=gen, dtype=torch.float64)
        @ torch.from_numpy(np.linalg.cholesky(sigma_a)).T
    )
    sample_b = (
        torch.randn(n, 3, generator=gen, dtype=torch.float64)
        @ torch.from_numpy(np.linalg.cholesky(sigma_b)).T
    )
    estimate = frechet_distance(sample_a + torch.from_numpy(mu_a), sample_b + torch.from_numpy(mu_b))
    assert estimate == pytest.approx(exact, rel=0.02)


def test_distance_of_a_set_to_itself_is_zero(test_features, cache_dir):
    assert frechet_distance(test_features, test_features) < 1e-9
    # Through the whole pipeline, with every subset the whole set: KID is 2 (mean off-diagonal - mean
    # diagonal kernel) / m, of order 1/m, tiny next to what noise scores.
    test = digits_split("test").images
    itself = evaluate_images(test, real=test, cache_dir=cache_dir, kid_subsets=3)
    noise_images = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(8)) * 2 - 1
    noise = evaluate_images(noise_images, real=test, cache_dir=cache_dir, kid_subsets=3)
    assert itself["fd"] < 1e-9 and itself["kid_std"] < 1e-12
    assert abs(itself["kid_mean"]) < 0.02 * noise["kid_mean"]


# --- KID ----------------------------------------------------------------------------------------------------


def test_mmd2_unbiased_matches_its_double_sum_definition():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 4, generator=gen), torch.randn(7, 4, generator=gen) + 0.5

    def k(u, v):
        return (float(u @ v) / 4 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(7)) / (5 * 7)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-5)
    assert polynomial_kernel(x, y).shape == (5, 7)


def test_kid_is_unbiased_on_two_halves_of_one_set_while_fd_is_biased_positive(test_features):
    # Over random splits of one set into halves, the expected unbiased MMD^2 is exactly 0: each of its three
    # terms averages the kernel over uniformly drawn pairs of distinct points of the set.
    gen = torch.Generator().manual_seed(4)
    n, splits = test_features.shape[0], 200
    kid, fd, biased = [], [], []
    for _ in range(splits):
        order = torch.randperm(n, generator=gen)
        half_a, half_b = test_features[order[: n // 2]], test_features[order[n // 2 :]]
        kid.append(mmd2_unbiased(half_a, half_b))
        fd.append(frechet_distance(half_a, half_b))
        # The V-statistic keeps the diagonals: biased upwards, as a control that this test can tell.
        biased.append(
            float(
                (polynomial_kernel(half_a, half_a).mean() + polynomial_kernel(half_b, half_b).mean())
                - 2 * polynomial_kernel(half_a, half_b).mean()
            )
        )
    kid, fd, biased = np.array(kid), np.array(fd), np.array(biased)
    standard_error = kid.std() / np.sqrt(splits)
    assert abs(kid.mean()) < 3 * standard_error
    assert 0.2 < (kid < 0).mean() < 0.8  # negative about as often as positive
    assert biased.mean() > 10 * biased.std() / np.sqrt(splits)
    assert (fd > 0).all() and fd.mean() > 10 * fd.std() / np.sqrt(splits)
    # On the same small sets FD's bias is large relative to its spread; KID centres on zero.
    assert fd.mean() > 3 * fd.std()


def test_kid_subsets_draw_reproducibly_and_report_their_spread(test_features):
    shifted = test_features + 0.2
    mean, std = kernel_inception_distance(test_features, shifted, num_subsets=20, subset_size=100, seed=7)
    again = kernel_inception_distance(test_features, shifted, num_subsets=20, subset_size=100, seed=7)
    assert (mean, std) == again
    assert mean > 5 * std > 0
    with pytest.raises(ValueError):
        kernel_inception_distance(test_features, shifted, num_subsets=0)


# --- evaluate_images and the command line -------------------------------------------------------------------


def test_real_digits_score_far_better_than_noise_and_blurred_digits(cache_dir):
    test = digits_split("test")
    gen = torch.Generator().manual_seed(5)
    real = evaluate_images(test.images, real="digits-train", labels=test.labels, cache_dir=cache_dir)
    noise = evaluate_images(
        torch.rand(360, 1, 8, 8, generator=gen) * 2 - 1,
        real="digits-train",
        labels=torch.randint(0, 10, (360,), generator=gen),
        cache_dir=cache_dir,
    )
    blurred = evaluate_images(blur(test.images), real="digits-train", cache_dir=cache_dir)
    assert real["extractor"] == "digits-classifier" and real["num_real"] == 1437
    assert 10 * real["fd"] < min(noise["fd"], blurred["fd"])
    assert real["kid_mean"] < 0.1 * min(noise["kid_mean"], blurred["kid_mean"])
    assert blurred["kid_mean"] > 5 * blurred["kid_std"]
    assert (
        real["class_agreement"] == pytest.approx(real["classifier_test_accuracy"])
        and real["class_agreement"] > 0.9
    )
    assert noise["class_agreement"] < 0.35
    # The pixel-space distance agrees on the order.
    assert 10 * real["fd_pixels"] < min(noise["fd_pixels"], blurred["fd_pixels"])


def test_evaluate_images_takes_any_feature_extractor():
    # A stand-in extractor on RGB images of another size: a fixed random projection of the pixels.
    gen = torch.Generator().manual_seed(6)
    projection = torch.randn(3 * 6 * 6, 16, generator=gen)

    def project(images):
        return images.flatten(1) @ projection

    fake, real = (
        torch.rand(300, 3, 6, 6, generator=gen) * 2 - 1,
        torch.rand(400, 3, 6, 6, generator=gen) * 1.6 - 0.8,
    )
    result = evaluate_images(fake, real=real, extractor=project, kid_subsets=10, kid_subset_size=200)
    assert result["extractor"] == "project" and result["feature_dim"] == 16
    assert result["fd"] == pytest.approx(frechet_distance(project(fake).double(), project(real).double()))
    assert "classifier_test_accuracy" not in result
    assert result["fd_pixels"] == pytest.approx(
        frechet_distance(fake.flatten(1).double(), real.flatten(1).double())
    )
    with pytest.raises(ValueError, match="class agreement"):
        evaluate_images(fake, real=real, extractor=project, labels=torch.zeros(300))


def test_inception_adapter_feeds_uint8_rgb_values_to_the_network():
    seen = []

    class StandIn(torch.nn.Module):
        def forward(self, pixels):
            seen.append(pixels)
            return {"pool": pixels.mean(dim=(2, 3)), "logits": pixels[:, :, 0, 0]}

    images = torch.tensor([-1.0, 0.0, 1.0, 0.5]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    adapter = InceptionFeatures(StandIn())
    features = adapter(images)
    (pixels,) = seen
    assert pixels.shape == (2, 3, 2, 2) and torch.equal(pixels, pixels.round())  # uint8 values, 3 channels
    assert pixels[0, 2].flatten().tolist() == [0, 128, 255, 191]
    assert features.shape == (2, 3) and set(adapter.features(images)) == {"pool", "logits"}


def test_inception_extractor_says_where_to_get_its_weights(tmp_path):
    message = r"not found at .*missing.pth; download .*pt_inception-2015-12-05"
    with pytest.raises(FileNotFoundError, match=message):
        inception_extractor(tmp_path / "missing.pth")


def test_command_line_prints_fd_kid_and_class_agreement(tmp_path, cache_dir, capsys):
    test = digits_split("test")
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=test.images[:200].numpy(), labels=test.labels[:200].numpy())
    args = [
        "--samples",
        str(samples),
        "--real",
        "digits-test",
        "--cache-dir",
        str(cache_dir),
        "--kid-subsets",
        "5",
    ]
    evaluate.main(args)
    out = capsys.readouterr().out
    assert "FD " in out and "KID " in out and "class agreement 0.9" in out
    evaluate.main([*args, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == evaluate_images(
        test.images[:200], real="digits-test", labels=test.labels[:200], cache_dir=cache_dir, kid_subsets=5
    )
