"""A sweep's ``report.png``: what a person needs to learn from it at a glance.

* **Held-out upper loss against the step and against wall time**: the best trials in colour,
  each named by its key settings (gamma, lr_y, lr_x, K, optimizer), the others in grey.
* **The lower-level gap** of every trial at its end against its held-out upper loss, with the
  ranking's tolerance: a low upper loss outside the tolerance is not a bilevel solution.
* **The learned schedules** (population-based sweeps): the best trial's gamma, lr_x and lr_y
  against the step, from its lineage.

The title counts the trials by how they ended (completed, stopped early by the scheduler,
diverged, failed), and says so when a population's best trial never exploited another (it
kept its first settings, so there is no schedule to draw).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

__all__ = [
    "SHOWN",
    "kept_settings_note",
    "printable",
    "read_best_schedule",
    "settings_label",
    "status_counts",
    "sweep_figure",
]

SHOWN = 8  # trials drawn in colour and named in the legend (the best ones)
ENDINGS = (("completed", "completed"), ("stopped", "stopped early"), ("diverged", "diverged"))


def status_counts(trials: list[dict[str, Any]]) -> str:
    """ "16 trials: 9 completed, 5 stopped early, 1 diverged, 1 failed"."""
    counts = Counter(str(t.get("status")) for t in trials)
    parts = [f"{counts.pop(key)} {name}" for key, name in ENDINGS if counts.get(key)]
    failed = sum(counts.values())  # error, unsuitable, unknown: did not complete
    if failed:
        parts.append(f"{failed} failed or stopped by the diagnostic")
    return f"{len(trials)} trials: {', '.join(parts)}"


def kept_settings_note(trials: list[dict[str, Any]]) -> str:
    """ "the best trial kept its first settings (no exploit)" where some trial of the sweep
    (``trials``, best first) exploited another but the best one did not, else ""."""
    segments = [len(_lineage(t)) for t in trials]
    if len(segments) < 2 or segments[0] > 1 or max(segments) < 2:
        return ""
    return "the best trial kept its first settings (no exploit)"


def _lineage(trial: dict[str, Any]) -> list:
    try:
        lineage = json.loads(trial.get("lineage") or "[]")
    except (TypeError, ValueError):
        return []
    return lineage if isinstance(lineage, list) else []


def settings_label(trial: dict[str, Any]) -> str:
    """A trial named by its key settings, e.g. "γ=10 lr_y=0.01 lr_x=0.001 K=2 adam"."""
    config = {k.removeprefix("config/"): v for k, v in trial.items() if k.startswith("config/")}
    lr_y = config.get("lr_y")
    if "lr_x" not in config and isinstance(lr_y, float) and "lr_ratio" in config:
        config["lr_x"] = lr_y * config["lr_ratio"]
    names = (("gamma", "γ"), ("lr_y", "lr_y"), ("lr_x", "lr_x"), ("inner_steps", "K"))
    parts = [f"{short}={_g(config[key])}" for key, short in names if key in config]
    if "optimizer" in config:
        parts.append(str(config["optimizer"]))
    return printable(" ".join(parts) or str(trial.get("trial_id")))


def sweep_figure(
    plt: Any,
    trials: list[dict[str, Any]],
    curves: dict[str, list[dict[str, Any]]],
    gap_tol: float,
    title: str,
    best_schedule: dict[str, Any] | None,
) -> Any:
    """The figure (``trials`` ranked best first; ``curves`` each trial's logged rows)."""
    metric, gap = "eval/upper_loss", "eval/lower_gap"
    learned = _learned(best_schedule)
    fig, axes = plt.subplots(1, 4 if learned else 3, figsize=(19 if learned else 15, 4.6))
    by_step, by_time, gaps = axes[:3]
    shown = [t["trial_id"] for t in trials[:SHOWN]]
    positive = True
    for trial in reversed(trials):  # the best drawn last, on top
        rows = [r for r in curves.get(trial["trial_id"], []) if _finite(r.get(metric))]
        if not rows:
            continue
        positive = positive and min(r[metric] for r in rows) > 0
        rank = shown.index(trial["trial_id"]) if trial["trial_id"] in shown else None
        style: dict[str, Any] = {"color": "0.75", "linewidth": 0.8}
        if rank is not None:
            style = {"color": f"C{rank}", "linewidth": 1.6, "marker": "o", "markersize": 3}
            style["label"] = f"#{rank + 1} {settings_label(trial)}"
        # A trial restarted from a checkpoint (an exploit, a resume) draws each run apart.
        for i, run in enumerate(dict.fromkeys(r.get("restart", 0) for r in rows)):
            part = [r for r in rows if r.get("restart", 0) == run]
            kept = style if i == 0 else {k: v for k, v in style.items() if k != "label"}
            by_step.plot([r["step"] for r in part], [r[metric] for r in part], **kept)
            times = [r["time/elapsed_s"] for r in part]
            by_time.plot(times, [r[metric] for r in part], **kept)
    for axis, xlabel in ((by_step, "step"), (by_time, "wall time of the trial (s)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"held-out upper loss ({metric})")
        axis.set_yscale("log" if positive else "linear")
        axis.grid(alpha=0.3)
    by_step.set_title(f"the {len(shown)} best trials in colour, the others grey", fontsize=9)
    by_step.legend(
        fontsize=7, loc="upper right", title="rank: settings", title_fontsize=7, framealpha=0.7
    )
    ended = [t for t in trials if _finite(t.get(metric)) and _finite(t.get(gap))]
    for trial in ended:
        best = trial["trial_id"] in shown
        gaps.scatter(
            trial[gap],
            trial[metric],
            s=28 if best else 12,
            color="C0" if trial[gap] <= gap_tol else "C3",
            alpha=1.0 if best else 0.5,
        )
    gaps.axvline(gap_tol, color="0.3", linestyle="--", linewidth=1, label=f"gap_tol = {gap_tol:g}")
    gaps.set_xlabel(f"lower-level gap at the end ({gap})")
    gaps.set_ylabel("held-out upper loss at the end")
    if _spans_decades([t[gap] for t in ended] + [gap_tol]):
        gaps.set_xscale("log")
    if positive and _spans_decades([t[metric] for t in ended]):
        gaps.set_yscale("log")
    gaps.set_title("within the tolerance (blue) or not (red)", fontsize=9)
    gaps.legend(fontsize=7)
    gaps.grid(alpha=0.3)
    if learned:
        _plot_schedules(axes[3], learned, best_schedule)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _learned(best_schedule: dict[str, Any] | None) -> dict[str, list[tuple[int, float]]]:
    """The best trial's settings that changed along its lineage, as (from_step, value) steps."""
    if not best_schedule:
        return {}
    lineage = best_schedule.get("lineage") or []
    learned = {}
    for key in ("gamma", "lr_x", "lr_y"):
        values = [(int(s["from_step"]), s["settings"].get(key)) for s in lineage]
        if len({v for _, v in values}) > 1 and all(_finite(v) for _, v in values):
            learned[key] = values
    return learned


def _plot_schedules(
    axis: Any, learned: dict[str, list[tuple[int, float]]], best_schedule: dict[str, Any]
) -> None:
    steps = int(best_schedule.get("steps") or 0)
    for key, values in learned.items():
        xs = [s for s, _ in values] + [max(steps, values[-1][0])]
        ys = [v for _, v in values] + [values[-1][1]]
        axis.step(xs, ys, where="post", label=key, linewidth=1.6)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("value (log scale)")
    axis.set_title(
        f"the best trial's learned schedules ({len(best_schedule['lineage'])} segments)",
        fontsize=9,
    )
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)


def printable(text: str) -> str:
    """``text`` with control characters (a terminal escape in a trial id) shown as '?'."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def read_best_schedule(path: Any) -> dict[str, Any] | None:
    """A sweep's ``best_schedule.json`` for the plot (None when absent or unreadable: the
    figure is drawn without the schedules panel)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _spans_decades(values: list[float]) -> bool:
    """A log axis only where the values are positive and spread over more than a decade."""
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _g(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
