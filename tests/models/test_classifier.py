import torch

from lowbit.models import digits
from lowbit.models.classifier import FEATURE_DIM, load_classifier


def test_shipped_classifier_accuracy_on_heldout():
    clf = load_classifier()
    x, y = digits.load_split("heldout")
    with torch.no_grad():
        acc = (clf.logits(x).argmax(1) == y).float().mean().item()
        feats = clf.features(x)
    # The harness's alignment numbers are only meaningful if the judge is this accurate.
    assert acc >= 0.97, acc
    assert feats.shape == (len(x), FEATURE_DIM)
