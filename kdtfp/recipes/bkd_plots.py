"""Plots of the `bkd` recipe: reliability diagram, deviance vs input noise, interval examples."""

from __future__ import annotations

import os

import numpy as np

from kdtfp.metrics import calibration_bin_sums
from kdtfp.recipes.bkd_methods import METHOD_NAMES, METHODS

COLORS = {
    "labels": "tab:gray",
    "kd": "tab:blue",
    "bkd": "tab:red",
    "mc_dropout": "tab:orange",
    "vi": "tab:green",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability(split, summaries, path, num_bins=10, min_count=5):
    """Accuracy against confidence per confidence bin; bins with < `min_count` examples are
    left out (400 test digits leave the low-confidence bins nearly empty)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect")
    for method in METHODS:
        counts, confidence, correct = calibration_bin_sums(
            summaries[method]["mean_probs"], split.y_test, num_bins
        )
        keep = counts >= min_count
        axis.plot(
            confidence[keep] / counts[keep],
            correct[keep] / counts[keep],
            marker="o",
            color=COLORS[method],
            label=METHOD_NAMES[method],
        )
    axis.set(
        xlabel="confidence (mean predicted probability of the top class)",
        ylabel="accuracy",
        title="Reliability on digits (test)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def deviance_curves(curves, gammas, path):
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 4))
    for method in METHODS:
        axis.plot(
            gammas, curves[method], marker="o", color=COLORS[method], label=METHOD_NAMES[method]
        )
    axis.set(
        xlabel="input noise γ (x + γ·N(0, 1), 0-16 pixel scale)",
        ylabel="mean deviance (nats)",
        title="Uncertainty under input noise (digits)",
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def interval_examples(split, summary, path, count=4):
    """The most and least uncertain test digits with BKD's per-class 95 % intervals."""
    plt = _pyplot()
    order = np.argsort(summary["deviance"])
    chosen = np.concatenate([order[: count // 2], order[-(count - count // 2) :]])
    figure, axes = plt.subplots(2, count, figsize=(3 * count, 5))
    classes = np.arange(summary["mean_probs"].shape[1])
    for column, index in enumerate(chosen):
        image_axis, bar_axis = axes[0, column], axes[1, column]
        image_axis.imshow(split.x_test[index].reshape(8, 8), cmap="gray_r")
        image_axis.set_title(
            f"label {split.y_test[index]}, deviance {summary['deviance'][index]:.2f}", fontsize=9
        )
        image_axis.axis("off")
        mean = summary["mean_probs"][index]
        error = np.stack([mean - summary["lower"][index], summary["upper"][index] - mean])
        bar_axis.bar(classes, mean, yerr=np.maximum(error, 0), color="tab:red", capsize=3)
        in_set = summary["credible_set"][index]
        bar_axis.set_xticks(classes, [f"{k}*" if in_set[k] else str(k) for k in classes])
        bar_axis.set(ylim=(0, 1), xlabel="class (* in the 95 % set)", ylabel="probability")
    figure.suptitle("BKD posterior mean and 95 % intervals: least and most uncertain test digits")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_all(split, summaries, curves, gammas, out):
    paths = [
        os.path.join(out, "reliability.png"),
        os.path.join(out, "deviance_vs_gamma.png"),
        os.path.join(out, "interval_examples.png"),
    ]
    reliability(split, summaries, paths[0])
    deviance_curves(curves, gammas, paths[1])
    interval_examples(split, summaries["bkd"], paths[2])
    return paths
