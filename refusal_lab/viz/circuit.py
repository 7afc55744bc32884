"""``results/<experiment>_circuit.png``: the top components on the residual stream, from the prompt to the refusal decision.

Drawn with matplotlib alone, so it needs no browser. Layers run left to right along the residual
stream; each top component sits at its layer, heads above the stream and MLPs below, sized and
coloured by its effect. Patching measures each component's effect on the decision, not the
paths between components, so the figure draws no component-to-component edges it has not measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402


def draw_circuit(ranked: dict[str, list[dict[str, Any]]], details: dict[str, Any], n_layers: int, path: Path,
                 method: str = "exact", top_k: int = 12) -> Path:
    """One panel per direction, each with its ``top_k`` components by effect (``method``: exact or attribution)."""
    directions = list(ranked)
    figure, axes = plt.subplots(len(directions), 1, figsize=(14, 4.2 * len(directions)), squeeze=False)
    for axis, direction in zip(axes[:, 0], directions):
        roles = details["directions"][direction]
        name = "activation patching" if method == "exact" else "attribution patching (gradient estimate)"
        _panel(axis, ranked[direction][:top_k], n_layers, f"{roles['source']} into {roles['target']}, {name}: top {top_k} components")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def _panel(axis: Any, rows: list[dict[str, Any]], n_layers: int, title: str) -> None:
    right = n_layers + 1
    axis.annotate("", xy=(right, 0), xytext=(-1, 0), arrowprops={"arrowstyle": "->", "lw": 2, "color": "0.4"})
    axis.text(-1.2, 0, "prompt", ha="right", va="center", fontsize=11, fontweight="bold")
    axis.text(right + 0.2, 0, "refusal\ndecision", ha="left", va="center", fontsize=11, fontweight="bold")
    effects = [r["effect"] for r in rows] or [1.0]
    bound = max(abs(e) for e in effects) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    cmap = plt.get_cmap("RdBu_r")
    stacked: dict[tuple[int, str], int] = {}
    base = {"attn": 1.3, "head": 2.8, "mlp": -1.3}  # attention blocks nearest the stream, heads above them, MLPs below
    for row in rows:
        level = stacked.get((row["layer"], row["kind"]), 0)
        stacked[(row["layer"], row["kind"])] = level + 1
        side = 1 if base[row["kind"]] > 0 else -1
        y = base[row["kind"]] + side * 1.3 * level
        x = row["layer"]
        axis.plot([x, x], [0, y], color="0.7", lw=0.8, zorder=1)
        size = 90 + 600 * abs(row["effect"]) / bound
        axis.scatter([x], [y], s=size, color=cmap(norm(row["effect"])), edgecolors="black", linewidths=0.6, zorder=2)
        axis.annotate(
            f"{row['component']} {row['effect']:+.2f}", (x, y), xytext=(size ** 0.5 / 2 + 2, 2 * side), textcoords="offset points",
            ha="left", va="center", fontsize=7, rotation=30 * side, rotation_mode="anchor",
        )
    axis.set_xlim(-3.5, right + 2.5)
    axis.set_ylim(-6, 7.5)
    axis.set_xticks(range(0, n_layers, max(1, n_layers // 15)))
    axis.set_xlabel("layer")
    axis.set_yticks([])
    for spine in ("left", "right", "top"):
        axis.spines[spine].set_visible(False)
    axis.set_title(title + " (size and colour: effect; attention blocks and heads above the stream, MLPs below)", fontsize=10)
