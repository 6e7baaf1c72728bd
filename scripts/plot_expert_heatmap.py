#!/usr/bin/env python3
"""Heatmap of routed tokens per (layer, expert) from GET /v1/telemetry/experts, as a PNG.

Usage: plot_expert_heatmap.py EXPERTS.json OUT.png

Rows are layers, columns experts; non-MoE layers are blank rows so layer numbers line up with
the model. Colour is the expert's share of its layer's tokens (a uniform router is flat at
1/num_experts), so layers with different traffic are comparable. Needs matplotlib (Debian:
python3-matplotlib).
"""
import json
import sys

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot_expert_heatmap.py: needs matplotlib (Debian package python3-matplotlib)")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        telemetry = json.load(f)
    layers = telemetry.get("layers", [])
    num_layers = telemetry.get("num_layers") or (max((l["layer"] for l in layers), default=-1) + 1)
    num_experts = telemetry.get("num_experts") or max((len(l["tokens"]) for l in layers), default=0)
    nan = float("nan")
    grid = [[nan] * num_experts for _ in range(num_layers)]
    for layer in layers:
        if not layer.get("moe", True):
            continue
        total = sum(layer["tokens"]) or 1
        grid[layer["layer"]] = [t / total for t in layer["tokens"]]
    fig, axis = plt.subplots(figsize=(max(6, num_experts * 0.25 + 2), max(4, num_layers * 0.25 + 1.5)))
    image = axis.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    axis.set_xlabel("expert")
    axis.set_ylabel("layer")
    axis.set_title(f"{telemetry.get('model', '')}: share of each layer's routed tokens")
    fig.colorbar(image, ax=axis, label="share of layer tokens")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
