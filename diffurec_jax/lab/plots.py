"""Every PNG the package draws (matplotlib, no display needed), and the t-SNE of reconstructions.

One run's learning curve (`learning_curve.plot`), the experiment report's figures (`report`),
the accuracy-vs-steps curve (`steps_curve.write_report`) and the ledger's time-to-accuracy
figure (`ledger_report`). The callers gather the numbers; these functions only draw them.
Figures are drawn on `matplotlib.figure.Figure` objects with an Agg canvas, never through
matplotlib's global state (no current figure, no backend switch).

The t-SNE follows the DiffuRecSys paper's Figure 3: the reconstructed target representation x0
of each sampled test user (the first chain of the evaluation, same noise keys), embedded in
2-D and coloured by a KMeans clustering of x0 itself.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

LINESTYLES = ("-", "--", ":", "-.")


def _save(figure: Figure, path: str, dpi: int = 110):
  FigureCanvasAgg(figure)
  figure.tight_layout()
  figure.savefig(path, dpi=dpi)


def _colors(names):
  palette = [f"C{i}" for i in range(10)]
  return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def learning_curves(curves: dict, path: str):
  """curves: {variant: [{'seed', 'epochs', 'loss', 'valid_epochs', 'valid_ndcg@10'}]}."""
  figure = Figure(figsize=(11, 4))
  loss_axis, valid_axis = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
  colors = _colors(curves)
  for name, runs in curves.items():
    for run in runs:
      style = dict(color=colors[name], linestyle=LINESTYLES[run["seed"] % len(LINESTYLES)],
                   marker="o", markersize=3, label=f"{name} seed {run['seed']}")
      if run["epochs"]:
        loss_axis.plot(run["epochs"], run["loss"], **style)
      if run["valid_epochs"]:
        valid_axis.plot(run["valid_epochs"], run["valid_ndcg@10"], **style)
  loss_axis.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
  valid_axis.set(title="validation NDCG@10", xlabel="epoch", ylabel="NDCG@10")
  for axis in (loss_axis, valid_axis):
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
  valid_axis.legend(fontsize=7, loc="best")
  _save(figure, path)


def run_learning_curve(losses: list, valid: dict, selected_epoch: int | None, title: str,
                       path: str):
  """One run: losses [(epoch, training loss)], valid {metric: [(epoch, value)]} (metrics
  without points left out), the selected epoch (None while training) as a dotted line."""
  figure = Figure(figsize=(10, 3.8))
  loss_axis, valid_axis = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
  loss_axis.plot(*zip(*losses), marker="o", ms=3)
  loss_axis.set(xlabel="epoch", ylabel="training loss", title="training loss")
  for metric, points in valid.items():
    valid_axis.plot(*zip(*points), marker="o", ms=3, label=metric)
  if selected_epoch is not None:
    valid_axis.axvline(selected_epoch, color="grey", ls=":", label="selected epoch")
  valid_axis.set(xlabel="epoch", ylabel="validation", title="validation")
  if valid:
    valid_axis.legend()
  for axis in (loss_axis, valid_axis):
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
  figure.suptitle(title)
  _save(figure, path)


def accuracy_vs_steps(result: dict, path: str):
  """steps.png of a `steps_curve` result: ndcg@10 vs K (log2 axis, error bars = std over
  seeds) and users/s vs K; the 'one_step' row, if any, as a grey reference line."""
  figure = Figure(figsize=(11, 4.2))
  accuracy, speed = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
  colors = {}
  for sampler in result["samplers"]:
    rows = [r for r in result["rows"] if r["sampler"] == sampler]
    steps = [r["K"] for r in rows]
    errors = [r["ndcg@10_std"] or 0.0 for r in rows]
    line = accuracy.errorbar(steps, [r["ndcg@10_mean"] for r in rows], yerr=errors, marker="o",
                             capsize=3, label=sampler)
    colors[sampler] = line[0].get_color()
    speed.plot(steps, [r["users_per_s"] for r in rows], marker="o", label=sampler,
               color=colors[sampler])
  for row in result["rows"]:
    if row["sampler"] != "one_step":
      continue
    label = "one_step (1 call)"
    accuracy.axhline(row["ndcg@10_mean"], color="gray", linestyle="--", label=label)
    if row["ndcg@10_std"]:
      accuracy.axhspan(row["ndcg@10_mean"] - row["ndcg@10_std"],
                       row["ndcg@10_mean"] + row["ndcg@10_std"], color="gray", alpha=0.15)
    speed.axhline(row["users_per_s"], color="gray", linestyle="--", label=label)
  for axis in (accuracy, speed):
    axis.set_xscale("log", base=2)
    if result["ks"]:
      axis.set_xticks(result["ks"], [str(k) for k in result["ks"]])
    axis.set_xlabel("reverse steps K")
    axis.grid(alpha=0.3)
    axis.legend()
  users = f"{result['n_users']}-user subset" if result["subsampled"] else "all users"
  accuracy.set_ylabel(f"{result['split']} ndcg@10 (mean ± std, {result['seeds']} seeds)")
  accuracy.set_title(f"{result['dataset']} {result['variant']}: accuracy vs K ({users})")
  speed.set_ylabel("users / s")
  speed.set_yscale("log")
  speed.set_title(f"throughput, {result['machine']['device']}")
  _save(figure, path, dpi=120)


def time_to_accuracy(curves: list, references: list, title: str, path: str):
  """Validation NDCG@10 against wall-clock minutes.

  curves: [{'name', 'label', 'trial', 'points': [(minutes, ndcg@10)]}], one colour per name,
  trials dashed; references: [(label, ndcg@10)], published test values as dotted grey lines.
  """
  figure = Figure(figsize=(8, 4.5))
  axis = figure.add_subplot(1, 1, 1)
  colors = {}
  for curve in curves:
    color = colors.setdefault(curve["name"], f"C{len(colors) % 10}")
    axis.plot(*zip(*curve["points"]), "--" if curve["trial"] else "-", marker="o", markersize=3,
              color=color, label=curve["label"])
  for label, value in references:
    axis.axhline(value, color="gray", linestyle=":", linewidth=1)
    axis.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=7,
                  color="gray", va="bottom")
  axis.set(title=title, xlabel="wall-clock minutes since the run started (resumes included)",
           ylabel="validation NDCG@10")
  axis.legend(fontsize=7, loc="lower right")
  _save(figure, path)


def grouped_bars(axis, labels, series: dict, ylabel: str):
  """One group of bars per label, one bar per series; None values are drawn as gaps."""
  width = 0.8 / max(len(series), 1)
  positions = np.arange(len(labels))
  colors = _colors(series)
  for index, (name, values) in enumerate(series.items()):
    heights = [np.nan if value is None else value for value in values]
    axis.bar(positions + (index - (len(series) - 1) / 2) * width, heights, width,
             label=name, color=colors[name])
  axis.set_xticks(positions, labels, fontsize=8, rotation=20, ha="right")
  axis.set_ylabel(ylabel)


def head_tail_bars(head_tail: dict, path: str):
  """head_tail: {variant: {'head': {'hit@10', 'ndcg@10'}, 'tail': {...}}}."""
  figure = Figure(figsize=(11, 4))
  names = list(head_tail)
  for index, key in enumerate(("hit@10", "ndcg@10")):
    axis = figure.add_subplot(1, 2, index + 1)
    series = {group: [head_tail[name][group][key] for name in names] for group in ("head", "tail")}
    grouped_bars(axis, names, series, f"test {key}")
    axis.set_title(f"{key}: head (top 20% items) vs tail")
    axis.legend(fontsize=8)
  _save(figure, path)


def length_group_bars(groups: dict, labels: list[str], path: str):
  """groups: {variant: [{'hit@10', 'ndcg@10'} per length group]}; labels name the groups."""
  figure = Figure(figsize=(11, 4))
  for index, key in enumerate(("hit@10", "ndcg@10")):
    axis = figure.add_subplot(1, 2, index + 1)
    series = {name: [group[key] for group in per_group] for name, per_group in groups.items()}
    grouped_bars(axis, labels, series, f"test {key}")
    axis.set(title=f"{key} by history length (quintile groups)", xlabel="history length")
    axis.legend(fontsize=7)
  _save(figure, path)


def reconstruct_targets(workdir: str, max_users: int = 500, seed: int = 0):
  """(users [n], x0 [n, H]) of up to `max_users` test users (a seeded random sample) of the
  trained diffusion run in `workdir`: the evaluation's first chain, same noise keys."""
  import jax

  from diffurec_jax import data as data_lib
  from diffurec_jax import evaluate as evaluate_lib
  from diffurec_jax import samplers
  from diffurec_jax.models import bundle as bundle_lib
  from diffurec_jax.data import splits
  loaded = evaluate_lib.load(workdir)
  config = loaded.config
  dataset = data_lib.prepare(config.data)
  examples = splits.eval_examples(dataset, "test")
  rng = np.random.default_rng(seed)
  chosen = np.sort(rng.choice(len(examples), size=min(max_users, len(examples)), replace=False))
  examples = examples.take(chosen)
  history = splits.gather_histories(dataset.items, examples.starts, examples.ends,
                                    config.data.max_len)

  @jax.jit
  def chains(bundle, history, users, key, schedule):
    model = bundle_lib.merge(bundle)
    e, key_mask = model.embed_history(history)
    user_keys = samplers.chain_keys(key, 0, users)  # Ensemble member 0, as in evaluation.
    return samplers.run_chain(model, e, key_mask, history, user_keys, schedule,
                            sampler=config.sample.sampler, variance=config.model.reverse_variance,
                            eta=config.sample.eta)

  x0 = chains(loaded.bundle, history, examples.users.astype(np.int32),
              jax.random.key(config.sample.seed), samplers.sampling_schedule(config))
  return examples.users, np.asarray(jax.device_get(x0), dtype=np.float64)


def tsne_clusters(x0, clusters: int = 5, seed: int = 0):
  """(coords [n, 2] t-SNE of x0, labels [n] KMeans(k) clusters of x0 itself)."""
  from sklearn.cluster import KMeans
  from sklearn.manifold import TSNE
  from threadpoolctl import threadpool_limits
  count = len(x0)
  perplexity = float(min(30.0, max(1.0, (count - 1) / 3)))
  # One thread: on a shared machine OpenMP oversubscription makes Barnes-Hut t-SNE 10x slower.
  with threadpool_limits(1):
    labels = KMeans(n_clusters=min(clusters, count), n_init=10,
                    random_state=seed).fit_predict(x0)
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca",
                  random_state=seed).fit_transform(x0)
  return coords, labels


def tsne_plot(coords, labels, title: str, path: str):
  figure = Figure(figsize=(6, 5.5))
  axis = figure.add_subplot(1, 1, 1)
  for cluster in np.unique(labels):
    points = coords[labels == cluster]
    axis.scatter(points[:, 0], points[:, 1], s=8, color=f"C{cluster}",
                 label=f"cluster {cluster} ({len(points)})")
  axis.set(title=title, xticks=[], yticks=[])
  axis.legend(fontsize=7, markerscale=2)
  _save(figure, path)
