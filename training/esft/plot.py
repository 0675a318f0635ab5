"""A heatmap of ESFT scores: MoE layers x routed experts, each cell the expert's share of its layer's score, with
the selected experts outlined and numbered by rank."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moeserve.training.esft.selection import normalise

logger = logging.getLogger(__name__)


def plot_scores(
    scores: dict[int, torch.Tensor], experts: dict[int, list[int]], path: str | Path, title: str = "ESFT scores"
) -> Path:
    """Writes the heatmap to `path` (the format follows its suffix, e.g. .png or .svg)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    layers = sorted(scores)
    grid = torch.stack([normalise(scores[layer]) for layer in layers]).float().numpy()  # [layers, E]
    num_experts = grid.shape[1]
    fig, ax = plt.subplots(figsize=(min(4 + 0.3 * num_experts, 24), min(2.5 + 0.35 * len(layers), 16)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0)
    label_ranks = num_experts <= 64 and len(layers) <= 40  # numbers become unreadable beyond that
    for row, layer in enumerate(layers):
        for rank, expert in enumerate(experts.get(layer, [])):
            ax.add_patch(Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
            if label_ranks:
                # viridis is light at the top of its range: dark digits there, light ones elsewhere.
                light_cell = image.norm(grid[row, expert]) > 0.6
                ax.text(expert, row, str(rank + 1), ha="center", va="center", fontsize=7, fontweight="bold",
                        color="black" if light_cell else "white")  # fmt: skip
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    step = 1 if num_experts <= 32 else 4
    ax.set_xticks(range(0, num_experts, step))
    ax.set_xlabel("routed expert")
    ax.set_ylabel("decoder layer")
    selected = sum(len(experts.get(layer, [])) for layer in layers)
    ax.set_title(
        f"{title}\n{selected} of {len(layers) * num_experts} experts selected (outlined, numbered by rank)", fontsize=10
    )
    fig.colorbar(image, ax=ax, label="share of the layer's score", fraction=0.04, pad=0.02)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote the expert score plot to %s", path)
    return path
