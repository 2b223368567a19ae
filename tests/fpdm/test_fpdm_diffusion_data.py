"""The diffusion process (schedule, DDPM/DDIM steps, guidance) and the datasets (digits, folder, latents)."""

import itertools

import numpy as np
import pytest
import torch
from fpdm.data import ImageFolder, LatentFolder, load_dataset, load_digits, pil_to_tensor
from fpdm.diffusion import GaussianDiffusion
from fpdm.reverse import model_eps


def test_linear_schedule_matches_its_definition():
    diffusion = GaussianDiffusion()
    assert diffusion.betas[0] == pytest.approx(1e-4) and diffusion.betas[-1] == pytest.approx(0.02)
    assert float(diffusion.alpha_bar(-1)) == 1.0
    assert float(diffusion.alpha_bar(999)) == pytest.approx(float(torch.prod(1 - diffusion.betas)))
    assert diffusion.respace(5) == [999, 799, 599, 399, 199]  # trailing, the default
    assert diffusion.respace(2) == [999, 499]
    assert GaussianDiffusion(spacing="linspace").respace(5) == [999, 749, 500, 250, 0]
    for spacing in ("trailing", "linspace"):
        assert GaussianDiffusion(spacing=spacing).respace(1000) == list(range(999, -1, -1))


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("num_timesteps", [1, 7, 1000])
def test_respace_gives_distinct_descending_timesteps_from_the_last(spacing, num_timesteps):
    diffusion = GaussianDiffusion(num_timesteps=num_timesteps, spacing=spacing)
    for n in range(1, num_timesteps + 1):
        steps = diffusion.respace(n)
        assert len(steps) == n and steps[0] == num_timesteps - 1 and steps[-1] >= 0
        assert all(a > b for a, b in itertools.pairwise(steps))


def test_unknown_spacing_is_refused():
    with pytest.raises(ValueError, match="spacing must be one of"):
        GaussianDiffusion(spacing="leading")


@pytest.mark.parametrize("t, t_prev", [(999, 500), (500, 120), (40, -1)])
def test_steps_with_the_true_noise_land_on_the_noised_data(t, t_prev):
    diffusion = GaussianDiffusion(clip_denoised=False)
    x0 = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, torch.full((3,), t), noise)
    # DDIM with eta = 0 is deterministic: the same noise at the earlier time.
    expected = diffusion.q_sample(x0, torch.full((3,), t_prev), noise) if t_prev >= 0 else x0
    torch.testing.assert_close(diffusion.ddim_step(x_t, noise, t, t_prev), expected)
    # DDPM's posterior mean with the true x0, plus its variance times the given noise.
    z = torch.randn_like(x0)
    abar, abar_prev = float(diffusion.alpha_bar(t)), float(diffusion.alpha_bar(t_prev))
    beta = 1 - abar / abar_prev
    mean = (abar_prev**0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - abar_prev) * x_t) / (1 - abar)
    std = (beta * (1 - abar_prev) / (1 - abar)) ** 0.5 if t_prev >= 0 else 0.0
    torch.testing.assert_close(diffusion.ddpm_step(x_t, noise, t, t_prev, noise=z), mean + std * z)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("t, t_prev", [(999, 500), (500, 120), (40, 20)])
def test_ddim_with_eta_follows_the_ddim_formula_and_eta_1_has_the_ddpm_posterior_variance(eta, t, t_prev):
    # Song et al. 2021, eq. 12 and 16: x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z with
    # sigma = eta sqrt((1 - abar') / (1 - abar) (1 - abar / abar')).
    diffusion = GaussianDiffusion(clip_denoised=False)
    gen = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    x_t = diffusion.q_sample(x0, torch.full((3,), t), eps)
    abar, abar_prev = float(diffusion.alpha_bar(t)), float(diffusion.alpha_bar(t_prev))
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5
    expected = abar_prev**0.5 * x0 + (1 - abar_prev - sigma**2) ** 0.5 * eps + sigma * z
    torch.testing.assert_close(diffusion.ddim_step(x_t, eps, t, t_prev, eta=eta, noise=z), expected)
    if eta == 1.0:
        # The noise's share is the DDPM posterior's standard deviation.
        posterior_var = (1 - abar / abar_prev) * (1 - abar_prev) / (1 - abar)
        noise_part = diffusion.ddim_step(x_t, eps, t, t_prev, eta=1.0, noise=z) - diffusion.ddim_step(
            x_t, eps, t, t_prev, eta=1.0, noise=torch.zeros_like(z)
        )
        torch.testing.assert_close(noise_part, posterior_var**0.5 * z)

    # The sampling loop passes eta on: eta > 0 draws noise and changes the samples.
    def loop(e):
        zero = lambda x, i, t: torch.zeros_like(x)  # noqa: E731
        return diffusion.reverse_loop(
            zero, x_t, [t, t_prev], eta=e, generator=torch.Generator().manual_seed(0)
        )

    assert not torch.allclose(loop(0.0), loop(eta))


def test_ddpm_posterior_variance_matches_empirical_variance_of_the_forward_process():
    # q(x_{t'} | x_t, x0) must be the conditional of the joint Gaussian q(x_t', x_t | x0).
    diffusion = GaussianDiffusion(clip_denoised=False)
    t, t_prev = 600, 300
    abar, abar_prev = float(diffusion.alpha_bar(t)), float(diffusion.alpha_bar(t_prev))
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x_prev = (1 - abar_prev) ** 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)  # x0 = 0
    alpha = abar / abar_prev
    x_t = alpha**0.5 * x_prev + (1 - alpha) ** 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    eps = x_t / (1 - abar) ** 0.5  # the noise that explains x_t exactly, with x0 = 0
    mean = diffusion.ddpm_step(x_t, eps, t, t_prev, noise=torch.zeros(n, dtype=torch.float64))
    residual_var = float((x_prev - mean).var())
    assert residual_var == pytest.approx((1 - alpha) * (1 - abar_prev) / (1 - abar), rel=0.02)


def test_classifier_free_guidance_interpolates_conditional_and_unconditional():
    def model(x, t, y):
        return x * 0 + y.view(-1, 1, 1, 1).float(), None  # eps = the label

    x = torch.zeros(2, 1, 8, 8)
    t, y = torch.tensor([10, 10]), torch.tensor([3, 5])
    for w in (0.0, 1.0, 4.0):
        eps, _ = model_eps(model, x, t, y, guidance=w, null_label=10)
        expected = 10 + w * (y.float() - 10)
        torch.testing.assert_close(eps[:, 0, 0, 0], expected)


def test_sample_loop_returns_data_in_range_and_calls_back_each_step():
    diffusion = GaussianDiffusion()
    seen = []
    x = diffusion.sample(
        lambda x, t: torch.zeros_like(x), (2, 1, 8, 8), 4, method="ddpm",
        generator=torch.Generator().manual_seed(0), callback=lambda i, t, x: seen.append(t),
    )  # fmt: skip
    assert seen == diffusion.respace(4)
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1.0


def test_digits_are_the_bundled_8x8_images_in_minus_one_to_one():
    data = load_dataset("digits")
    assert len(data) == 1797 and data.num_classes == 10
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert set(data.labels.tolist()) == set(range(10))


def write_image_folder(root, per_class: int = 3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(20, 28, 3), dtype=np.uint8)  # not square: centre crop
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_reads_real_images_with_labels_from_class_folders(tmp_path):
    write_image_folder(tmp_path / "images")
    data = ImageFolder(tmp_path / "images", image_size=16)
    assert len(data) == 6 and data.classes == ["cat", "dog"]
    x, y = data[4]
    assert x.shape == (3, 16, 16) and int(y) == 1
    assert -1.0 <= float(x.min()) < float(x.max()) <= 1.0


def test_extract_latents_script_writes_latents_the_dataset_loads(tmp_path):
    write_image_folder(tmp_path / "images")
    out = tmp_path / "latents"
    from fpdm import latents as extract_latents

    argv = ["--data", f"folder:{tmp_path / 'images'}", "--out", str(out), "--random-tiny-vae",
            "--image-size", "16", "--batch-size", "4", "--device", "cpu", "--workers", "0"]  # fmt: skip
    assert extract_latents.main(argv) == 0
    data = LatentFolder(out)
    # The tiny VAE downsamples once: 16x16x3 images -> 8x8x4 latents.
    assert data.latents.shape == (6, 4, 8, 8) and data.num_classes == 2 and data.class_names == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, _ = data.fetch(range(6))
    assert torch.isfinite(x).all() and x.std() > 0
    assert load_dataset(f"latents:{out}").fetch([5])[0].shape == (1, 4, 8, 8)


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    write_image_folder(root)
    (root / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".ipynb_checkpoints" / "0-checkpoint.png")
    (root / "cat" / "._0.png").write_bytes(b"macOS resource fork, not an image")
    data = ImageFolder(root, image_size=8)
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]  # not shifted by the hidden folder
    assert [data.path(i).name for i in range(3)] == ["0.png", "1.png", "2.png"]


def test_a_class_folder_without_images_is_refused_in_one_line(tmp_path, capsys):
    from fpdm import training as train

    root = tmp_path / "images"
    write_image_folder(root)
    (root / "bird").mkdir()
    (root / "bird" / "readme.txt").write_text("the download failed")
    with pytest.raises(ValueError, match=r"class folder .*bird holds no image"):
        ImageFolder(root, image_size=8)
    argv = ["--out", str(tmp_path / "run"), "--data", f"folder:{root}", "--image-size", "8", "--steps", "1"]
    try:
        status = train.main(argv)
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "bird holds no image" in err


def test_the_adm_crop_halves_with_a_box_filter_resizes_the_short_side_and_takes_the_centre():
    from PIL import Image

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(70, 150, 3), dtype=np.uint8))  # 150 x 70
    # By hand, for 16 px: 150x70 -> 75x35 -> 37x17 (box, while the short side >= 32), then bicubic to a short
    # side of 16: 35x16 (round(37 * 16 / 17) = 35), then the centred 16x16 from x = 9.
    step = image.resize((75, 35), Image.BOX).resize((37, 17), Image.BOX).resize((35, 16), Image.BICUBIC)
    expected = np.asarray(step.crop((9, 0, 25, 16)), dtype=np.float32) / 127.5 - 1.0
    got = pil_to_tensor(image, 16, crop="adm").permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)
    # A short side of exactly 2 x 16 is halved too: 150x64 -> 75x32 -> 37x16, centred from x = 10.
    exact = image.resize((150, 64), Image.BICUBIC)
    step = exact.resize((75, 32), Image.BOX).resize((37, 16), Image.BOX).resize((37, 16), Image.BICUBIC)
    expected = np.asarray(step.crop((10, 0, 26, 16)), dtype=np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(pil_to_tensor(exact, 16, crop="adm").permute(1, 2, 0).numpy(), expected)
    # The plain centre crop takes the square first: another image.
    assert not np.array_equal(pil_to_tensor(image, 16).permute(1, 2, 0).numpy(), expected)
    with pytest.raises(ValueError, match="crop must be one of"):
        pil_to_tensor(image, 16, crop="random")


def test_unknown_dataset_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("mnist")
    assert load_digits().images.dtype == torch.float32


def test_digits_train_and_test_specs_are_the_evaluation_split():
    from fpdm.data import digits_split

    train, test = load_dataset("digits-train"), load_dataset("digits-test")
    assert (len(train), len(test)) == (1437, 360) and train.num_classes == 10
    assert torch.equal(train.images, digits_split("train").images)
    assert torch.equal(test.labels, digits_split("test").labels)
    # Stratified: every class keeps about a fifth of its images in the test part.
    per_class = torch.bincount(test.labels, minlength=10).float()
    totals = torch.bincount(load_digits().labels, minlength=10).float()
    assert ((per_class / totals - 0.2).abs() < 0.01).all()
