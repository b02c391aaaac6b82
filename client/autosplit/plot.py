"""The split decision as a picture: bytes per boundary, per-layer times, predictions.

matplotlib is imported when a plot is drawn, not with this module: the
trainer's command line starts without it.
"""

import math

from hapi.client.autosplit.costmodel import Decision, storage_layer_times
from hapi.client.autosplit.profiling import Profile

__all__ = ["plot_decision"]


def plot_decision(decision: Decision, path, profile: Profile | None = None) -> None:
    """Draw the decision to ``path`` (PNG by its extension): per-boundary
    bytes on the wire, per-layer time on each side (with ``profile``),
    predicted time per split and its components, the choice marked. Uses
    matplotlib's Agg canvas directly: no display, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = decision.rows
    splits = [row.split for row in rows]
    panels = 3 if profile is not None else 2
    fig = Figure(figsize=(10, 3.2 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True)
    ax_bytes, ax_pred = axes[0], axes[-1]

    if profile is not None:
        boundaries = list(range(len(profile.boundary_bytes)))
        sizes = [profile.raw_bytes, *profile.boundary_bytes[1:]]
    else:
        boundaries, sizes = splits, [row.wire_bytes for row in rows]
    colors = ["tab:orange" if i == 0 else "tab:blue" for i in boundaries]
    ax_bytes.bar(boundaries, [s / 1e3 for s in sizes], color=colors, width=0.7)
    ax_bytes.set_yscale("log")
    ax_bytes.set_ylabel("KB per sample\non the wire")
    ax_bytes.set_title(f"{decision.model}: split {decision.split} chosen "
                       f"(freeze {decision.freeze}, batch {decision.batch_size}, "
                       f"{decision.bandwidth_bytes_per_s * 8 / 1e6:.1f} Mbit/s)")

    if profile is not None:
        ax_time = axes[1]
        storage, _, _, estimated = storage_layer_times(profile)
        centres = [i + 0.5 for i in range(len(profile.layers))]
        ax_time.step(centres, [layer.trainer_forward_s * 1e3 for layer in profile.layers],
                     where="mid", color="tab:green", label="trainer forward")
        trainable = [i for i, layer in enumerate(profile.layers)
                     if layer.trainer_train_s is not None]
        if trainable:
            ax_time.plot([centres[i] for i in trainable],
                         [profile.layers[i].trainer_train_s * 1e3 for i in trainable], "s",
                         color="tab:green", label="trainer forward+backward")
        for flag, style, label in ((False, "o", "storage measured"),
                                   (True, "x", "storage estimated")):
            points = [i for i, t in enumerate(storage) if estimated[i] == flag and t > 0]
            if points:
                ax_time.plot([centres[i] for i in points], [storage[i] * 1e3 for i in points],
                             style, color="tab:red", label=label)
        ax_time.set_yscale("log")
        ax_time.set_ylabel("ms per sample\nper layer")
        ax_time.legend(fontsize="small", loc="best")

    feasible = [row for row in rows if row.feasible]
    ax_pred.bar([r.split for r in feasible], [r.iteration_s for r in feasible], width=0.7,
                color="lightgrey", label="predicted iteration")
    for key, color, label in (("storage_s", "tab:red", "storage"),
                              ("transfer_s", "tab:blue", "network"),
                              ("trainer_s", "tab:green", "trainer"),
                              ("pipeline_s", "tab:purple", "request path")):
        values = [getattr(r, key) if getattr(r, key) > 0 else math.nan for r in rows]
        ax_pred.plot(splits, values, ".-", color=color, label=label, linewidth=1)
    infeasible = [row for row in rows if not row.feasible]
    if infeasible:
        top = max(row.iteration_s for row in rows)
        ax_pred.plot([r.split for r in infeasible], [top] * len(infeasible), "kx",
                     label="does not fit memory")
    chosen = decision.chosen
    ax_pred.axvline(chosen.split, color="black", linestyle="--", linewidth=1)
    ax_pred.annotate(f"split {chosen.split}\n{chosen.iteration_s:.3g} s", (chosen.split,
                     chosen.iteration_s), xytext=(5, 10), textcoords="offset points")
    ax_pred.set_yscale("log")
    ax_pred.set_ylabel("s per iteration")
    ax_pred.set_xlabel("boundary / split index (0 = vanilla)")
    ax_pred.legend(fontsize="small", loc="best")
    for ax in axes:
        ax.axvline(decision.freeze, color="grey", linestyle=":", linewidth=1)
    fig.savefig(path, dpi=80)
