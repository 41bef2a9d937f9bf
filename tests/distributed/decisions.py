"""What a quantization run decided, as plain tensors, to compare runs bit for bit."""

import torch

from lowbit import QuantizedModel


def decisions(qmodel: QuantizedModel) -> dict[str, torch.Tensor]:
    """Every parameter tensor and every artifact tensor, by name; specs (DGQ's groups) and artifact
    records as text."""
    out = {f"params/{t}/{k}": v for t, p in qmodel.params.items() for k, v in p.tensors().items()}
    out |= {f"params/{t}/spec": repr(p.spec) for t, p in qmodel.params.items()}
    for name, artifact in qmodel.artifacts.items():
        record, tensors = artifact.encode(name)
        out[f"artifact/{name}"] = repr(record)
        out |= {f"artifact/{name}/{k}": v for k, v in tensors.items()}
    return out
