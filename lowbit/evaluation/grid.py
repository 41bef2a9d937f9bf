"""PNG grid of samples: one row per recipe or model, the same prompts and seeds in every column.

Side-by-side rows make quantization damage visible where a single number hides it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["save_grid"]


def save_grid(rows: dict[str, torch.Tensor], path: str | Path, column_titles: list[str] | None = None) -> Path:
    """rows: label -> (N, C, H, W) images in [-1, 1], C = 1 (gray) or 3 (RGB), all with the same N."""
    labels = list(rows)
    n = {len(v) for v in rows.values()}
    if len(n) != 1:
        raise ValueError(f"rows have different numbers of images: {n}")
    n_cols = n.pop()
    fig, axes = plt.subplots(len(labels), n_cols, figsize=(0.9 * n_cols + 1.5, 0.9 * len(labels) + 0.4), squeeze=False)
    for r, label in enumerate(labels):
        for c in range(n_cols):
            ax = axes[r][c]
            image = rows[label][c].detach().cpu()
            if image.shape[0] == 3:
                ax.imshow(((image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            else:
                ax.imshow(image[0].numpy(), cmap="gray", vmin=-1.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and column_titles:
                ax.set_title(column_titles[c], fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
