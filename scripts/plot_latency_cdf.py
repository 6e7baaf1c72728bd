#!/usr/bin/env python3
"""Latency CDFs (TTFT, TPOT, ITL, E2EL) of a `keel bench serve --save-json` result as one PNG.

Usage: plot_latency_cdf.py RESULT.json OUT.png

Reads the per-request arrays keel writes under vLLM's names ("ttfts", "itls" in seconds) plus
keel's "tpots", "e2els" and "success"; failed requests are left out, as in the summary metrics.
Drawn as empirical CDFs (not histograms) so tails are readable and runs can be compared by
overlaying files. Needs matplotlib (Debian: python3-matplotlib).
"""
import json
import sys

try:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot_latency_cdf.py: needs matplotlib (Debian package python3-matplotlib)")


def cdf(axis, values_ms, title):
    values = sorted(values_ms)
    axis.set_title(title)
    axis.set_xlabel("ms")
    axis.set_ylabel("fraction of samples")
    axis.grid(True, alpha=0.3)
    if not values:
        axis.text(0.5, 0.5, "no samples", ha="center", va="center", transform=axis.transAxes)
        return
    n = len(values)
    axis.step(values, [(i + 1) / n for i in range(n)], where="post")
    for q, style in ((0.5, ":"), (0.99, "--")):
        v = values[min(n - 1, int(q * (n - 1) + 0.5))]
        axis.axvline(v, linestyle=style, color="gray", linewidth=0.8)
        axis.annotate(f"p{int(q * 100)} {v:.1f}", (v, q), fontsize=7)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        result = json.load(f)
    ok = result.get("success") or [True] * len(result.get("ttfts", []))
    pick = lambda key: [v * 1e3 for v, good in zip(result.get(key, []), ok) if good]
    ttft, e2el = pick("ttfts"), pick("e2els")
    outs = result.get("output_lens", [])
    tpot = [v * 1e3 for v, good, n in zip(result.get("tpots", []), ok, outs) if good and n > 1]
    itl = [g * 1e3 for gaps, good in zip(result.get("itls", []), ok) if good for g in gaps]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    cdf(axes[0][0], ttft, "Time to first token")
    cdf(axes[0][1], tpot, "Time per output token (excl. 1st)")
    cdf(axes[1][0], itl, "Inter-token latency")
    cdf(axes[1][1], e2el, "End-to-end latency")
    rate = result.get("request_rate")
    fig.suptitle(
        f"{result.get('completed', len(ttft))} requests, rate {rate}, "
        f"burstiness {result.get('burstiness')}, max concurrency {result.get('max_concurrency')}"
    )
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
