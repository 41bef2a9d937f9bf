"""Image-quality and alignment metrics: the FID / IS / CLIP-score stand-ins and PSNR.

They are computed in the feature space of the project's digit classifier instead of Inception
and CLIP, but with the same formulas, so numbers move the same way under quantization.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

__all__ = ["frechet_distance", "inception_score", "alignment", "psnr", "class_spread"]


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def frechet_distance(feats_a, feats_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of (N, D) features."""
    a, b = _np(feats_a), _np(feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular products (dead feature dims) are handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # regularize as the reference FID code does
            eps = np.eye(len(cov_a)) * 1e-6
            covmean = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)  # imaginary parts are numerical noise of sqrtm
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def inception_score(probs) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from (N, C) class posteriors; 1 = no information, C = best."""
    p = _np(probs)
    p_y = p.mean(0, keepdims=True)
    kl = (p * (np.log(p + 1e-12) - np.log(p_y + 1e-12))).sum(1)
    return float(np.exp(kl.mean()))


def alignment(pred_labels, target_labels) -> float:
    """Fraction of images whose predicted class is the class the prompt asked for."""
    pred, target = _np(pred_labels), _np(target_labels)
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {target.shape}")
    return float((pred == target).mean())


def psnr(a, b, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (data range 2); inf when identical."""
    mse = float(((_np(a) - _np(b)) ** 2).mean())
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))


def class_spread(feats, labels) -> tuple[float, float]:
    """(between, within): how far apart the class means are and how spread each class is.

    between = mean over classes c of ||mu_c - mean_c' mu_c'||^2; within = mean over classes of
    Tr(cov_c). Classifier-free guidance pushes samples towards exaggerated class prototypes, which
    raises `between` and lowers `within` against real data; the Frechet distance sees that as
    distance from the real digits even when every sample is well formed and correctly classified.
    """
    f, y = _np(feats), _np(labels)
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(0) for c in classes])
    between = float(((means - means.mean(0)) ** 2).sum(1).mean())
    within = float(np.mean([np.trace(np.atleast_2d(np.cov(f[y == c], rowvar=False))) for c in classes]))
    return between, within
