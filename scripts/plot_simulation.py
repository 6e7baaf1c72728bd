#!/usr/bin/env python3
"""Plots of a `keel simulate --save-json` result as one PNG.

Usage: plot_simulation.py RESULT.json OUT.png

Panels: KV-cache usage and running/waiting requests over simulated time, cumulative
preemptions, TTFT and TPOT empirical CDFs (per-request arrays "ttfts"/"tpots" in seconds, under
the names `keel bench serve --save-json` uses), and, when the run had --sweep-rate, p99 TTFT /
TPOT of every probe against the rate with the SLO found. Needs matplotlib (Debian:
python3-matplotlib).
"""
import json
import sys

try:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot_simulation.py: needs matplotlib (Debian package python3-matplotlib)")


def cdf(axis, values_ms, title):
    values = sorted(values_ms)
    axis.set_title(title)
    axis.set_xlabel("ms")
    axis.set_ylabel("fraction of requests")
    axis.grid(True, alpha=0.3)
    if not values:
        axis.text(0.5, 0.5, "no samples", ha="center", va="center", transform=axis.transAxes)
        return
    n = len(values)
    axis.plot(values, [(i + 1) / n for i in range(n)])
    p99 = values[min(n - 1, int(0.99 * (n - 1) + 0.5))]
    axis.axvline(p99, color="red", linestyle=":", label=f"p99 {p99:.1f} ms")
    axis.legend(loc="lower right")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        result = json.load(f)
    series = result.get("series", {})
    sweep = result.get("sweep")
    rows = 3 if sweep else 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows))
    t = series.get("t_s", [])

    ax = axes[0][0]
    ax.set_title("KV cache usage and requests")
    ax.plot(t, [100 * u for u in series.get("kv_usage", [])], label="KV used (%)", color="tab:blue")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("KV used (%)")
    ax.set_ylim(0, 105)
    ax.grid(True, alpha=0.3)
    twin = ax.twinx()
    twin.plot(t, series.get("running", []), label="running", color="tab:green", alpha=0.7)
    twin.plot(t, series.get("waiting", []), label="waiting", color="tab:orange", alpha=0.7)
    twin.set_ylabel("requests")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left")

    ax = axes[0][1]
    ax.set_title(f"preemptions (total {result.get('preemptions', 0)}), rejected {result.get('rejected', 0)}")
    ax.plot(t, series.get("preemptions", []), color="tab:red")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("cumulative preemptions")
    ax.grid(True, alpha=0.3)

    ok = result.get("success", [])
    ttfts = [1000 * v for v, s in zip(result.get("ttfts", []), ok) if s]
    tpots = [1000 * v for v, s, n in zip(result.get("tpots", []), ok, result.get("output_lens", [])) if s and n > 1]
    cdf(axes[1][0], ttfts, "TTFT")
    cdf(axes[1][1], tpots, "TPOT")

    if sweep:
        probes = sorted(sweep.get("probes", []), key=lambda p: p["rate"])
        rates = [p["rate"] for p in probes]
        for ax, key, title in ((axes[2][0], "p99_ttft_ms", "p99 TTFT vs rate"),
                               (axes[2][1], "p99_tpot_ms", "p99 TPOT vs rate")):
            ax.set_title(title)
            ax.plot(rates, [p[key] for p in probes], marker="o")
            for p in probes:
                ax.plot([p["rate"]], [p[key]], marker="o", color="tab:green" if p["meets_slo"] else "tab:red")
            if sweep.get("max_rate") is not None:
                ax.axvline(sweep["max_rate"], color="gray", linestyle="--",
                           label=f"max rate {sweep['max_rate']:.2f} req/s")
                ax.legend(loc="upper left")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)

    fig.suptitle(f"keel simulate: {result.get('completed', 0)} completed, "
                 f"p99 TTFT {result.get('p99_ttft_ms', 0):.1f} ms, p99 TPOT {result.get('p99_tpot_ms', 0):.1f} ms, "
                 f"{result.get('output_throughput', 0):.0f} tok/s")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)


if __name__ == "__main__":
    main()
