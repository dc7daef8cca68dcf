"""The ``tmerge tune`` figure: drift against FLOPs ratio and against latency ratio, with the Pareto fronts."""

from __future__ import annotations

import io

from .._optional import pyplot


def plot_tune(result: dict) -> bytes:
    """Drift against FLOPs ratio (every measured candidate) and against latency ratio (timed ones);
    the Pareto fronts as lines, the chosen point and the ToMe reference marked; PNG bytes."""
    plt = pyplot()

    cands = result["candidates"]
    metric = result["budget"]["drift_metric"]

    def drift(c):
        return c["drift"].get("calibration", c["drift"].get("screen"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = (("flops_ratio", "FLOPs ratio (merged / unmerged)", "pareto_flops"),
              ("latency_ratio_p50", f"latency ratio p50 ({result['config']['runtime']}, batch "
                                    f"{result['config']['batch']})", "pareto_latency"))
    methods = sorted({c["method"] for c in cands})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (key, xlabel, front_key) in zip(axes, panels):
        pts = [c for c in cands if c.get(key) is not None and drift(c) is not None]
        for m in methods:
            mine = [c for c in pts if c["method"] == m]
            if mine:
                ax.scatter([c[key] for c in mine], [drift(c) for c in mine], s=14, alpha=0.6, color=colors[m], label=m)
        front = [c for c in pts if c["label"] in set(result[front_key])]
        front.sort(key=lambda c: c[key])
        if front:
            ax.plot([c[key] for c in front], [drift(c) for c in front], color="black", linewidth=1, label="Pareto front")
        ref = result.get("reference")
        if ref and ref.get(key) is not None and drift(ref) is not None:
            ax.scatter([ref[key]], [drift(ref)], marker="s", s=70, facecolors="none", edgecolors="red",
                       label=f"constant-r ToMe ({ref['label'].split(' ')[1]})")
        ch = result.get("chosen")
        if ch and ch.get(key) is not None and drift(ch) is not None:
            ax.scatter([ch[key]], [drift(ch)], marker="*", s=220, color="gold", edgecolors="black", zorder=5,
                       label="chosen")
        if result["budget"]["max_drift"] is not None:
            ax.axhline(result["budget"]["max_drift"], color="red", linestyle="--", linewidth=0.8, label="drift budget")
        elif key == "latency_ratio_p50" and result.get("unmerged_ms"):
            ax.axvline(result["budget"]["latency_ms"] / result["unmerged_ms"], color="red", linestyle="--",
                       linewidth=0.8, label="latency budget (approx.)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"drift: {metric} (calibration)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("cost model (FLOPs = 2·MACs)", fontsize=9)
    axes[1].set_title("timed on the target runtime, interleaved with the unmerged model", fontsize=9)
    fig.suptitle(f"tmerge tune · {result['model']}", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
