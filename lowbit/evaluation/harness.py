"""Evaluation harness: any (prompts, seeds) -> images sampler in, FID / IS / alignment out.

The FP reference, a quantized denoiser or a VAR model are all just samplers, so the same
prompts and seeds go to each and their images can also be compared pixel by pixel (PSNR).
FID is measured against the held-out real digits in the classifier's feature space; alignment
is measured for the phrasings seen in training and for held-out phrasings.

FID is reported but is not one of the KEPT_METRICS that rank models: it measures distance from the
real digits, and the full-precision reference (CFG 3.0) sits far from them because guidance
exaggerates class prototypes, so quantization noise that blurs the prototypes can lower it
(bench/fid_guidance.py measures this; README, "Do the metrics order the obvious cases?").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from lowbit.core.distributed import map_sharded, rank, world_size
from lowbit.evaluation.metrics import alignment, frechet_distance, inception_score
from lowbit.models import digits
from lowbit.models.classifier import DigitClassifier, load_classifier

__all__ = [
    "Sampler", "EvalResult", "KEPT_METRICS", "prompt_set", "evaluate", "real_vs_real_fid", "blob_sampler",
    "in_order", "alignment_slack", "main",
]

Sampler = Callable[[list[str], list[int]], torch.Tensor]

# Metric -> higher is better, for the metrics that rank models. Each orders full precision, W8A8,
# W4A4 and an untrained model as it must (bench/metric_ordering.py). FID is left out on purpose.
KEPT_METRICS = {"inception_score": True, "alignment_seen": True, "alignment_heldout": True, "psnr_vs_fp": True}


@dataclass(frozen=True)
class EvalResult:
    fid: float
    inception_score: float
    alignment_seen: float
    alignment_heldout: float
    images_seen: torch.Tensor
    images_heldout: torch.Tensor
    prompts_seen: list[str]
    prompts_heldout: list[str]
    labels: torch.Tensor
    seeds: list[int]

    def metrics(self) -> dict[str, float]:
        return {
            "fid": round(self.fid, 4),
            "inception_score": round(self.inception_score, 4),
            "alignment_seen": round(self.alignment_seen, 4),
            "alignment_heldout": round(self.alignment_heldout, 4),
            "n_samples": len(self.seeds),
        }


def prompt_set(n: int, which: str, seed: int) -> tuple[list[str], torch.Tensor, list[int]]:
    """n balanced prompts (class i % 10), phrasing drawn with `seed`, and per-image noise seeds."""
    rng = np.random.default_rng([seed, 0 if which == "seen" else 1])
    labels = torch.arange(n) % 10
    prompts = [rng.choice(digits.prompts_for(int(c), which)).item() for c in labels]
    seeds = [seed * 1_000_003 + i for i in range(n)]
    return prompts, labels, seeds


def _generate(sampler: Sampler, prompts: list[str], seeds: list[int], batch_size: int, desc: str) -> torch.Tensor:
    """The images of ``prompts`` and ``seeds``, ``batch_size`` at a time; under torchrun each process
    samples every n-th batch and all receive every image (the batches are those of one process, so
    the images are too)."""
    batches = [(prompts[i : i + batch_size], seeds[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    bar = tqdm(total=math.ceil(len(batches) / world_size()), desc=desc, leave=False, disable=rank() != 0)

    def generate(batch: tuple[list[str], list[int]]) -> torch.Tensor:
        images = sampler(*batch).float()
        bar.update(1)
        return images

    try:
        return torch.cat(map_sharded(generate, batches))
    finally:
        bar.close()


@torch.no_grad()
def evaluate(
    sampler: Sampler,
    n_samples: int,
    seed: int = 0,
    n_heldout: int | None = None,
    batch_size: int = 50,
    classifier: DigitClassifier | None = None,
) -> EvalResult:
    """Generate n_samples (seen phrasings) + n_heldout (held-out phrasings, default n_samples) and score.

    Deterministic: the same sampler and seed give the same images and numbers. Both sets use the
    same noise seeds, so image i of each differs only by the phrasing.
    """
    clf = classifier or load_classifier()
    n_heldout = n_samples if n_heldout is None else n_heldout
    p_seen, labels, seeds = prompt_set(n_samples, "seen", seed)
    p_held, labels_held, seeds_held = prompt_set(n_heldout, "heldout", seed)
    img_seen = _generate(sampler, p_seen, seeds, batch_size, "seen prompts")
    img_held = _generate(sampler, p_held, seeds_held, batch_size, "held-out prompts")

    real, _ = digits.load_split("heldout")
    feats = clf.features(img_seen)
    probs = clf.head(feats).softmax(-1)
    return EvalResult(
        fid=frechet_distance(feats, clf.features(real)),
        inception_score=inception_score(probs),
        alignment_seen=alignment(probs.argmax(-1), labels),
        alignment_heldout=alignment(clf.logits(img_held).argmax(-1), labels_held),
        images_seen=img_seen,
        images_heldout=img_held,
        prompts_seen=p_seen,
        prompts_heldout=p_held,
        labels=labels,
        seeds=seeds,
    )


@torch.no_grad()
def real_vs_real_fid(classifier: DigitClassifier | None = None) -> float:
    """FID between the two halves of the held-out real digits: the floor a perfect model would reach.

    Each half has ~180 images, fewer than a typical evaluation, so the floor is an upper estimate.
    """
    clf = classifier or load_classifier()
    x, y = digits.load_split("heldout")
    order = torch.argsort(y, stable=True)  # interleave within classes so both halves are balanced
    feats = clf.features(x[order])
    return frechet_distance(feats[0::2], feats[1::2])


def in_order(values: list[float], higher_is_better: bool = True, slack: list[float] | None = None) -> bool:
    """Whether ``values`` (best model first) never get better down the list.

    ``slack[i]`` lets model i + 1 beat model i by that much (sampling noise); none by default.
    """
    quality = [v if higher_is_better else -v for v in values]
    slack = slack if slack is not None else [0.0] * (len(values) - 1)
    if len(slack) != len(values) - 1:
        raise ValueError(f"{len(slack)} slacks for {len(values)} values")
    return all(b - a <= s for a, b, s in zip(quality, quality[1:], slack))


def alignment_slack(p_a: float, p_b: float, n: int, z: float = 2.0) -> float:
    """z standard errors of the difference of two alignment fractions, each measured on n images."""
    return z * math.sqrt((p_a * (1 - p_a) + p_b * (1 - p_b)) / n)


def blob_sampler(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Sanity baseline: a random Gaussian blob per seed, ignoring the prompt."""
    grid = torch.linspace(-1.0, 1.0, digits.IMAGE_SIZE)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    out = []
    for s in seeds:
        u = torch.rand(4, generator=torch.Generator().manual_seed(int(s)))
        cx, cy = u[0] - 0.5, u[1] - 0.5  # centre within the middle half
        sx, sy = 0.2 + 0.5 * u[2], 0.2 + 0.5 * u[3]  # width
        blob = torch.exp(-((xx - cx) ** 2 / (2 * sx**2) + (yy - cy) ** 2 / (2 * sy**2)))
        out.append(blob * 2.0 - 1.0)
    return torch.stack(out)[:, None]


def main(argv: list[str] | None = None) -> None:
    """`python -m lowbit.evaluation.harness`: the shipped FP reference against the baselines."""
    import argparse

    from lowbit.models.reference import build_reference_model, load_reference_model, make_sampler

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # the untrained baseline's random weights
    fp = make_sampler(load_reference_model(), steps=args.steps)
    rows = {
        "FP reference, seed 0": evaluate(fp, args.n, seed=0).metrics(),
        "FP reference, seed 1": evaluate(fp, args.n, seed=1).metrics(),
        "untrained PixArt": evaluate(make_sampler(build_reference_model().eval(), steps=args.steps), args.n).metrics(),
        "Gaussian blobs": evaluate(blob_sampler, args.n).metrics(),
    }
    print(f"real-vs-real FID floor (two halves of the held-out digits): {real_vs_real_fid():.2f}\n")
    print("| sampler | FID | IS | alignment seen | alignment held-out | n |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in rows.items():
        print(f"| {name} | {m['fid']:.2f} | {m['inception_score']:.2f} | {m['alignment_seen']:.3f} "
              f"| {m['alignment_heldout']:.3f} | {m['n_samples']} |")


if __name__ == "__main__":
    main()
