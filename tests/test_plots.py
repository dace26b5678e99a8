"""Shared figures: what is drawn matches the data (smoothing, error bars, sample sizes in legends)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from cliplab import plots  # noqa: E402
from cliplab.evaluation import Proportion  # noqa: E402


def test_training_curves_are_moving_averages():
    history = [{"step": s, "loss": float(s), "clean": 1.0, "robust": 0.5} for s in range(1, 11)]
    fig = plots.plot_training_curves({"run": history}, window=4)
    loss, clean, robust = (ax.get_lines()[0] for ax in fig.axes)
    assert list(loss.get_xdata()) == [4, 5, 6, 7, 8, 9, 10]
    assert list(loss.get_ydata()) == pytest.approx([2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5])
    assert set(clean.get_ydata()) == {100.0} and set(robust.get_ydata()) == {50.0}
    plt.close(fig)


def test_short_history_is_averaged_over_what_there_is():
    fig = plots.plot_training_curves({"run": [{"step": 1, "loss": 2.0, "clean": 0.0, "robust": 0.0}]})
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [2.0]
    plt.close(fig)


def test_tradeoff_points_carry_their_intervals_and_n():
    fig, ax = plt.subplots()
    plots.plot_tradeoff(ax, {"a": (Proportion(90, 100), Proportion(40, 100))}, xlabel="clean", ylabel="robust")
    (line, _, (xbars, ybars)) = ax.containers[0].lines
    assert list(line.get_xdata()) == [90.0] and list(line.get_ydata()) == [40.0]
    low, high = Proportion(40, 100).ci95
    assert ybars.get_segments()[0][:, 1] == pytest.approx([100 * low, 100 * high])
    assert "n=100" in ax.get_legend().get_texts()[0].get_text()
    plt.close(fig)


def test_the_frontier_is_a_staircase_and_each_family_has_its_marker():
    points = {"full": (Proportion(90, 100), Proportion(50, 100)), "oft": (Proportion(95, 100), Proportion(30, 100)),
              "lora": (Proportion(85, 100), Proportion(20, 100))}
    families = {"full": "full", "oft": "oft", "lora": "lora"}
    fig, ax = plt.subplots()
    plots.plot_frontier(ax, points, {"full": 10**6, "oft": 10**5, "lora": 10**4}, ["full", "oft"], families,
                        xlabel="clean", ylabel="robust", colors=plots.colours_for(points))
    markers = [container.lines[0].get_marker() for container in ax.containers]
    assert len(set(markers)) == 3 and [c.lines[0].get_markersize() for c in ax.containers] == [13, 10, 7]
    (front,) = [line for line in ax.get_lines() if line.get_label().startswith("the frontier")]
    # the edge of what the front dominates, from the left edge at the most robust point's height, down at each
    # point's clean accuracy and across to the next, down to the bottom at the cleanest
    left, bottom = ax.get_xlim()[0], ax.get_ylim()[0]
    assert front.get_drawstyle() == "steps-pre"
    assert list(front.get_xdata()) == [left, 90, 95, 95] and list(front.get_ydata()) == [50, 50, 30, bottom]
    assert ax.containers[2].lines[0].get_markerfacecolor() == "none"  # LoRA hollow, OFT and full filled
    plt.close(fig)


def test_held_out_evaluations_are_drawn_as_points():
    history = [{"step": s, "loss": 1.0, "clean": 1.0, "robust": 0.5} for s in range(1, 5)]
    history[1].update(eval_clean=0.9, eval_robust=0.4, eval_n=16)
    fig = plots.plot_training_curves({"run": history}, window=2)
    points = fig.axes[2].get_lines()[1]
    assert list(points.get_xdata()) == [2] and list(points.get_ydata()) == [40.0]
    assert "n=16" in points.get_label() and len(fig.axes[0].get_lines()) == 1  # no held-out loss
    plt.close(fig)


def test_the_smoothing_explorer_shows_the_vote_and_the_certificate(shapes_clf, batch):
    from cliplab.defences import RandomizedSmoothing

    x, y = batch
    smoothed = RandomizedSmoothing(shapes_clf, sigma=0.06, num_noise=8)
    fig = plots.show_smoothing(smoothed, x[0], y[0].item(), [f"class {i}" for i in range(100)], n=32, seed=0)
    vote = fig.axes[2]
    counts = smoothed.sample_counts(x[:1], 32, seed=0)[0]
    widths = sorted(bar.get_width() for bar in vote.patches)
    if y[0].item() in counts.topk(5).indices:
        assert widths == pytest.approx(sorted((100 * counts.topk(5).values / 32).tolist()))
    assert any(w == pytest.approx(100 * counts[y[0]].item() / 32) for w in widths)  # the label is always shown
    classes, radii = smoothed.certify(x[:1], n0=32, n=32, seed=0)
    expected = "abstains" if classes[0] < 0 else f"certifies class {classes[0]}, L2 radius {radii[0]:.2f}"
    if 0 <= classes[0] != y[0]:
        expected += " (WRONG: a certificate for the wrong class)"
    assert vote.get_title().endswith(expected)
    plt.close(fig)


def test_the_denoising_explorer_names_its_image(shapes_clf, batch):
    x, y = batch
    fig = plots.show_denoising(shapes_clf, x[0], y[0].item(), [f"class {i}" for i in range(100)], name="plain attack")
    assert fig.axes[0].get_title() == f"plain attack\n(label: class {y[0].item()})"
    plt.close(fig)


def test_the_top5_always_shows_the_label_in_red_and_the_target_in_orange():
    import torch

    probabilities = torch.linspace(1, 0.01, 100).softmax(0)  # class 0 likeliest, class 99 least
    fig, ax = plt.subplots()
    plots.show_top5(ax, probabilities, [f"class {i}" for i in range(100)], highlight=[50], target=1)
    names = [label.get_text() for label in ax.get_yticklabels()]
    assert names == ["class 0", "class 1", "class 2", "class 3", "class 50"]  # top-down: the label last
    colours = [bar.get_facecolor() for bar in ax.patches]  # top-down: class 0, 1, 2, 3, then the label
    assert colours[1] == matplotlib.colors.to_rgba("tab:orange") and colours[4] == matplotlib.colors.to_rgba("tab:red")
    plt.close(fig)


def test_every_band_is_named_in_a_legend_beside_the_axes():
    fig, ax = plt.subplots()
    plots.plot_rates(ax, [1, 2], {"a": [Proportion(5, 10), Proportion(7, 10)]}, xlabel="x", ylabel="y")
    plots.plot_rates(ax, [1, 2], {"b": [Proportion(1, 10), Proportion(2, 10)]}, xlabel="x", ylabel="y")
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["a (n=10)", "b (n=10)", plots.BAND]  # the band named once, after the curves
    assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # beside, not over the data
    plt.close(fig)


def test_the_adversarial_views_show_each_model_on_the_same_images(batch):
    x, y = batch
    views = {"a": (x[:3].clamp(0, 0.9), y[:3]), "b": (x[:3].clamp(0.1, 1), (y[:3] + 1) % 100)}
    fig = plots.show_adversarial_views(x[:3], y[:3], views, [f"class {i}" for i in range(100)], eps=4 / 255)
    assert len(fig.axes) == 3 * 2 * 3  # a row of clean images, then one per model; image and perturbation each
    assert fig.axes[6].get_title() == f"a:\nclass {y[0].item()} (right)"
    assert fig.axes[12].get_title().endswith("(wrong)")
    plt.close(fig)


def test_a_figure_is_saved_whole_where_asked_and_nowhere_otherwise(tmp_path):
    fig, ax = plt.subplots()
    assert plots.save_figure(fig, "f", None) is None
    path = plots.save_figure(fig, "f", tmp_path / "figures")
    assert path == tmp_path / "figures" / "f.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]  # no temporary file left beside it
    plt.close(fig)
