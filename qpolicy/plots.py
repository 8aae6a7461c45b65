"""Plots people would rather look at than read: Pareto fronts, bit heatmaps (layer x step), sample grids.
Every figure is rendered to PNG bytes and written atomically."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import image_grid  # noqa: E402
from .io import atomic_write_bytes  # noqa: E402


def _save(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def pareto(policies: Sequence[dict], path, *, title: str = "cost vs final error") -> Path:
    """Scatter of bops_rel_fp32 (x) vs final_error (y, log) for every policy; learned ones highlighted,
    with the lower-left (Pareto) front of all points drawn."""
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(p["bops_rel_fp32"], max(p["final_error"], 1e-12)) for p in policies]
    order = sorted(range(len(pts)), key=lambda i: pts[i])
    front, best = [], np.inf
    for i in order:
        if pts[i][1] < best:
            best = pts[i][1]
            front.append(pts[i])
    ax.plot(*zip(*front), "-", color="0.7", zorder=0, label="Pareto front")
    markers = iter(["*", "P", "D", "^", "v", "s", "X", "h", "<", ">", "p", "d"] * 4)
    colors = iter(plt.cm.tab10.colors * 4)
    for p, (x, y) in zip(policies, pts):
        if p.get("final_error_ci"):  # 95 % bootstrap interval of the mean over images
            lo, hi = p["final_error_ci"]
            ax.errorbar(x, y, yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], fmt="none", ecolor="0.5", lw=0.8, zorder=1)
        if p.get("kind") != "learned" and p["name"].startswith("uniform"):
            ax.scatter(x, y, marker="o", s=20, color="0.55", zorder=1)
            ax.annotate(p["name"].replace("uniform_", ""), (x, y), fontsize=6, color="0.4", xytext=(3, -8),
                        textcoords="offset points")
        else:  # learned and structured baselines: own marker and a legend entry (labels would overlap)
            learned = p.get("kind") == "learned"
            ax.scatter(x, y, marker=next(markers), s=170 if learned else 60, zorder=3 if learned else 2,
                       color="tab:red" if learned and "mean" not in p["name"] else next(colors),
                       edgecolors="black", linewidths=0.5, label=p["name"])
    _cost_error_axes(ax, title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return _save(fig, path)


def _cost_error_axes(ax, title: str) -> None:
    """Log-log BOPs-vs-final-error axes with labels, title and grid (both Pareto plots)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("BOPs relative to the FP32 sampler")
    ax.set_ylabel("final-sample relative error (eval bank)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def bits_vs_features(mean_log2_bits: np.ndarray, features: dict[str, np.ndarray], path, *,
                     title: str = "chosen bits vs input features") -> Path:
    """One panel per input feature: each group's mean log2 bits (G,) against the feature (G,), with a least-squares
    line and the correlation in the panel title (does the policy's precision follow the input?)."""
    fig, axes = plt.subplots(1, len(features), figsize=(4 * len(features), 3.4), squeeze=False)
    y = np.exp2(np.asarray(mean_log2_bits, np.float64))
    for ax, (name, x) in zip(axes[0], features.items()):
        x = np.asarray(x, np.float64)
        ax.scatter(x, y, s=12, alpha=0.7)
        if len(x) > 2 and x.std() > 0 and y.std() > 0:
            a, b = np.polyfit(x, y, 1)
            xs = np.linspace(x.min(), x.max(), 10)
            ax.plot(xs, a * xs + b, color="tab:red", lw=1)
            ax.set_title(f"r = {np.corrcoef(x, y)[0, 1]:+.2f}", fontsize=9)
        else:
            ax.set_title("no variation", fontsize=9)
        ax.set_xlabel(name)
        ax.set_ylabel("group mean bits (geometric)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def bit_heatmaps(schedules: Sequence[tuple[str, np.ndarray, np.ndarray]], layer_names: Sequence[str], path,
                 *, max_panels: int = 12, skip_uniform: bool = True, ncols: int = 4,
                 choices: Sequence[int] | None = None) -> Path:
    """One panel per schedule of bits (layer x step): weights, plus activations when they differ.
    Uniform schedules (every entry equal) are skipped by default: their heatmap is a flat colour.
    choices: the bit choice set; the colour bar spans it (default: the bits that occur), so schedules over a
    narrow set such as (4, 5, 6, 8) use the whole colour range."""
    panels = []
    for name, bw, ba in schedules:
        bw, ba = np.asarray(bw), np.asarray(ba)
        if skip_uniform and np.all(bw == bw.flat[0]) and np.all(ba == ba.flat[0]):
            continue
        panels.append((name if np.array_equal(bw, ba) else f"{name} (W)", bw))
        if not np.array_equal(bw, ba):
            panels.append((f"{name} (A)", ba))
    panels = panels[:max_panels] or [(n, np.asarray(w)) for n, w, _ in schedules[:1]]
    L = len(layer_names)
    ticks = sorted({int(b) for b in (choices if choices is not None else np.concatenate(
        [np.unique(np.asarray(b)) for _, b in panels]))})
    lo, hi = np.log2(ticks[0]), np.log2(ticks[-1])
    hi = hi if hi > lo else lo + 1
    rows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(rows, min(ncols, len(panels)), figsize=(3.2 * min(ncols, len(panels)) + 1.5,
                                                                    0.11 * L * rows + 1.2), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        name, bits = panels[k]
        im = ax.imshow(np.log2(bits.astype(float)).T, aspect="auto", cmap="viridis", vmin=lo, vmax=hi,
                       interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("sampler step (noisy → clean)", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
        if k % ncols == 0:
            ax.set_yticks(range(L))
            ax.set_yticklabels(layer_names, fontsize=max(3, min(6, 400 // L)))
        else:
            ax.set_yticks([])
    cb = fig.colorbar(im, ax=axes, shrink=0.6)
    cb.set_ticks([float(np.log2(b)) for b in ticks])
    cb.set_ticklabels([str(b) for b in ticks])
    cb.set_label("bits")
    return _save(fig, path)


def fp_vs_quantized(fp: np.ndarray, quantized: np.ndarray, path) -> Path:
    """Side-by-side grids: full-precision samples (left) and the same noise quantized (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax, imgs, t in zip(axes, (fp, quantized), ("full precision", "learned precision policy")):
        ax.imshow(image_grid(np.asarray(imgs)))
        ax.set_title(t)
        ax.axis("off")
    return _save(fig, path)


def pareto_ci(rows: Sequence[dict], path, title: str = "cost vs final error (mean over seeds)") -> Path:
    """Mean-over-seeds Pareto plot with confidence intervals: bops_rel_fp32 (x, log) vs final_error (y, log).

    rows: dicts with "label" (policy name), "kind" ("learned" | "baseline"), "group" (e.g. "env.lam=2"; None for
    a single group), "bops_rel_fp32", "final_error" and optional "final_error_ci" / "bops_ci" ([lo, hi]) and "n"
    (seeds). Learned policies are stars in their group's colour (the mean schedule a smaller hollow star);
    baselines fitted per group share their group's colour with a marker per baseline; uniform baselines are small
    grey dots drawn once when identical across groups. Lower whiskers that reach 0 or below (a t interval over
    few seeds) are cut at the bottom of the axis."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if not rows:
        ax.text(0.5, 0.5, "no policies", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    groups = list(dict.fromkeys(r.get("group") for r in rows))
    gcolor = {g: plt.cm.tab10.colors[i % 10] for i, g in enumerate(groups)}
    ys = [r["final_error"] for r in rows if r["final_error"] > 0]
    los = [r["final_error_ci"][0] for r in rows if r.get("final_error_ci") and r["final_error_ci"][0] > 0]
    floor = 0.5 * min(ys + los) if ys + los else 1e-12
    base_names = list(dict.fromkeys(r["label"] for r in rows if r.get("kind") != "learned"
                                    and not r["label"].startswith("uniform")))
    bmarker = {n: m for n, m in zip(base_names, ["P", "D", "^", "v", "s", "X", "h", "<", ">", "p", "d", "8"] * 4)}
    pts, drawn_uniform = [], set()
    for r in rows:
        x, y = float(r["bops_rel_fp32"]), max(float(r["final_error"]), floor)
        learned = r.get("kind") == "learned"
        uniform = not learned and r["label"].startswith("uniform")
        if uniform:
            key = (r["label"], round(x, 12), round(y, 12))
            if key in drawn_uniform:
                continue
            drawn_uniform.add(key)
        pts.append((x, y))
        ci, xci = r.get("final_error_ci"), r.get("bops_ci")
        yerr = None if not ci else [[y - max(float(ci[0]), floor)], [max(float(ci[1]) - y, 0.0)]]
        xerr = None if not xci else [[max(x - float(xci[0]), 0.0)], [max(float(xci[1]) - x, 0.0)]]
        if uniform:
            color, marker, size, z = "0.55", "o", 4, 1
        elif learned:
            color, size, z = gcolor[r.get("group")], 16 if "mean_schedule" not in r["label"] else 10, 4
            marker = "*"
        else:
            color, marker, size, z = gcolor[r.get("group")], bmarker[r["label"]], 7, 2
        hollow = learned and "mean_schedule" in r["label"]
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt=marker, ms=size, color=color, ecolor=color, elinewidth=1,
                    capsize=2, zorder=z, mfc="white" if hollow else color,
                    mec=color if hollow else "black" if learned else color, mew=1.2 if hollow else 0.6 if learned
                    else 0.5, alpha=0.9)
        if uniform:
            ax.annotate(r["label"].replace("uniform_", ""), (x, y), fontsize=6, color="0.4", xytext=(3, -8),
                        textcoords="offset points")
    front, best = [], np.inf
    for x, y in sorted(pts):
        if y < best:
            best = y
            front.append((x, y))
    ax.plot(*zip(*front), "-", color="0.75", zorder=0)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="-", color="0.75", label="Pareto front (means)")]
    multi = len(groups) > 1
    for g in groups:
        handles.append(Line2D([], [], ls="", marker="*", ms=12, color=gcolor[g], mec="black", mew=0.6,
                              label=f"learned · {g}" if multi and g is not None else "learned"))
    if any("mean_schedule" in r["label"] for r in rows if r.get("kind") == "learned"):
        handles.append(Line2D([], [], ls="", marker="*", ms=9, color="0.3", mfc="white", mec="0.3", mew=1.2,
                              label="learned mean schedule"))
    for n in base_names:
        handles.append(Line2D([], [], ls="", marker=bmarker[n], ms=6, color="0.3" if multi else
                              gcolor[groups[0]], label=n))
    if drawn_uniform:
        handles.append(Line2D([], [], ls="", marker="o", ms=4, color="0.55", label="uniform W/A"))
    _cost_error_axes(ax, title)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              title="colour = group" if multi else None, title_fontsize=7)
    return _save(fig, path)
