"""Why does digit-FID rank a crude W4A4 model ahead of full precision? Guidance, measured.

FID is a distance from the real digits, not from the full-precision model. The reference sampler
uses classifier-free guidance 3.0, which pushes each sample towards an exaggerated prototype of
its class: the class means in the classifier's feature space move apart and each class gets
narrower than the real digits. FID counts that as distance from the real data although the
samples are well formed and 99% correctly classified. Quantization noise blurs the prototypes
back towards the real spread, so a W4A4 model can land closer to the real digits than the model
it approximates. This bench samples the FP model at several guidance scales and the W4A4
baseline at guidance 3 and 1, on the harness's seen prompts and seeds, and reports FID against
the held-out real digits, IS, alignment, and the between-class / within-class spread of the
classifier features (lowbit.evaluation.metrics.class_spread) beside those of the real digits.
It also adds plain Gaussian pixel noise to the FP images at guidance 3 and 1 (PSNR against the
clean images in the name): damage that any sound quality metric must penalize.
Writes bench/results/fid_guidance.md.

    .venv/bin/python bench/fid_guidance.py [--samples 300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lowbit.evaluation.run import calibrate_reference
from lowbit.evaluation.harness import _generate, prompt_set, real_vs_real_fid
from lowbit.evaluation.metrics import alignment, class_spread, frechet_distance, inception_score, psnr
from lowbit.models import digits
from lowbit.models.classifier import load_classifier
from lowbit.models.reference import DEFAULT_GUIDANCE, load_reference_model, make_sampler
from lowbit.core.quantize import quantize
from lowbit.recipes import get_recipe

FP_GUIDANCE = (1.0, 1.5, 2.0, DEFAULT_GUIDANCE)
W4A4_GUIDANCE = (DEFAULT_GUIDANCE, 1.0)
NOISE_SIGMAS = (0.1, 0.2, 0.3)  # added to the FP images at these guidance scales:
NOISE_GUIDANCE = (DEFAULT_GUIDANCE, 1.0)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    clf = load_classifier()
    real_x, real_y = digits.load_split("heldout")
    real_f = clf.features(real_x)
    prompts, labels, seeds = prompt_set(args.samples, "seen", 0)  # the harness's seen set, seed 0

    model = load_reference_model()
    w4a4 = quantize(model, get_recipe("minmax-w4a4"), calibrate_reference(model), progress=True)
    runs = [(f"full precision, guidance {g:g}", model, g) for g in FP_GUIDANCE]
    runs += [(f"minmax-w4a4, guidance {g:g}", w4a4, g) for g in W4A4_GUIDANCE]

    between, within = class_spread(real_f, real_y)
    lines = ["| images | FID ↓ | IS | align seen | between-class spread | within-class spread | time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| held-out real digits ({len(real_y)}) | {real_vs_real_fid(clf):.1f} (two halves) | "
             f"{inception_score(clf.logits(real_x).softmax(-1)):.3f} | "
             f"{alignment(clf.logits(real_x).argmax(-1), real_y):.3f} | {between:.0f} | {within:.0f} | – |"]

    def row(name: str, images: torch.Tensor, seconds: float | None) -> None:
        feats = clf.features(images)
        probs = clf.head(feats).softmax(-1)
        between, within = class_spread(feats, labels)
        lines.append(f"| {name} | {frechet_distance(feats, real_f):.1f} | {inception_score(probs):.3f} | "
                     f"{alignment(probs.argmax(-1), labels):.3f} | {between:.0f} | {within:.0f} | "
                     f"{'–' if seconds is None else f'{seconds:.0f}'} |")
        print(lines[-1], flush=True)

    noisy = []
    for name, denoiser, guidance in runs:
        start = time.perf_counter()
        images = _generate(make_sampler(denoiser, guidance=guidance), prompts, seeds, 50, name)
        row(name, images, time.perf_counter() - start)
        if denoiser is model and guidance in NOISE_GUIDANCE:
            for sigma in NOISE_SIGMAS:
                g = torch.Generator().manual_seed(0)
                damaged = (images + sigma * torch.randn(images.shape, generator=g)).clamp(-1.0, 1.0)
                db = sum(psnr(a, b) for a, b in zip(damaged, images)) / len(images)
                noisy.append((f"{name} + pixel noise σ={sigma:g} ({db:.1f} dB)", damaged))
    for name, images in noisy:
        row(name, images, None)
    text = "\n".join(lines) + "\n"
    print(text)
    path = Path(__file__).parent / "results" / "fid_guidance.md"
    path.write_text(f"Made by `.venv/bin/python bench/fid_guidance.py --samples {args.samples}` "
                    f"({args.samples} images per row, seen phrasings, the harness's seed 0).\n\n{text}")


if __name__ == "__main__":
    main()
