import math

import numpy as np
import scipy.linalg
import torch

from lowbit.evaluation.metrics import alignment, class_spread, frechet_distance, inception_score, psnr


def test_frechet_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(x, x)) < 1e-6  # only sqrtm round-off remains


def test_frechet_matches_closed_form_for_known_gaussians():
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    mu_a, mu_b = np.zeros(d), np.array([1.0, -1.0, 0.5, 0.0])
    cov_a, cov_b = np.diag([1.0, 2.0, 0.5, 1.0]), np.diag([2.0, 1.0, 1.0, 3.0])
    a = rng.multivariate_normal(mu_a, cov_a, size=n)
    b = rng.multivariate_normal(mu_b, cov_b, size=n)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(scipy.linalg.sqrtm(cov_a @ cov_b)))
    # 200k samples: the estimate's standard error is ~0.02 here, so 0.1 is a safe bound
    assert abs(frechet_distance(a, b) - expected) < 0.1


def test_inception_score_bounds():
    assert abs(inception_score(np.full((100, 10), 0.1)) - 1.0) < 1e-9  # uniform posterior: no info
    one_hot = np.eye(10)[np.arange(100) % 10]
    assert abs(inception_score(one_hot) - 10.0) < 1e-6  # confident and balanced: the maximum


def test_alignment():
    assert alignment(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75


def test_psnr():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert psnr(x, x) == math.inf
    # constant offset 0.1: MSE = 0.01, PSNR = 10 log10(2^2 / 0.01) = 26.02 dB
    assert abs(psnr(x, x + 0.1) - 10 * math.log10(4 / 0.01)) < 1e-4


def test_class_spread_on_known_points():
    # class 0: (0,0), (2,0) -> mean (1,0), Tr cov 2; class 1: (10,0), (10,2) -> mean (10,1), Tr cov 2
    feats = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 2.0]])
    between, within = class_spread(feats, np.array([0, 0, 1, 1]))
    assert abs(between - (4.5**2 + 0.5**2)) < 1e-9  # both means are (4.5, 0.5) from their centre
    assert abs(within - 2.0) < 1e-9
