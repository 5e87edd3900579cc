"""Catalog size against memory and time: the dense path and the item-sharded blockwise one.

  python bench/scale.py [--items 1e4,1e5,1e6] [--devices 1,2,4] [--block 8192]
                        [--dense_max_items 100000] [--markdown docs/performance.md]
                        [--figure docs/figures/scale.png]

For each catalog size N (the synthetic catalog, `configs/synthetic.py:items_<N>`), each device
count D (fake CPU devices, `--xla_force_host_platform_device_count=D`) and each path:
  dense     today's path: [B, N+1] logits, the table replicated on every device (N up to
            --dense_max_items: beyond it the logits alone need gigabytes);
  sharded   catalog.block = --block, catalog.shards = D: the table's rows over the D devices,
            the batch not split (mesh data 1 x items D);
  mixed     catalog.block = --block, catalog.shards = D / 2 (D >= 4): mesh data 2 x items D/2,
            the batch over 2 and the table's rows over D/2;
  sampled   as sharded, trained with the sampled softmax (catalog.loss = sampled, --negatives
            uniform negatives + the batch's targets); inference is sharded's full ranking
(--paths picks which paths run; --markers names the section --markdown writes, so a
`--paths sampled` run can sit beside the main table).
runs `bench/throughput.py --part train` and `--part infer` (32 steps and 1 step) in fresh
processes and reports training examples/s, users/s, each process's peak RSS and XLA's bytes per
device of the compiled step (arguments + temporaries). Fake devices share this machine's cores,
so time does not fall with D here; memory per device does.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import app, flags

import side_by_side  # bench/

_ITEMS = flags.DEFINE_list("items", ["1e4", "1e5", "1e6"], "Catalog sizes (presets items_<N>).")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4"], "Fake CPU device counts.")
_BLOCK = flags.DEFINE_integer("block", 8192, "catalog.block of the sharded path.")
_PATHS = flags.DEFINE_list("paths", ["dense", "sharded", "mixed"], "Paths measured.")
_NEGATIVES = flags.DEFINE_integer("negatives", 1024, "catalog.negatives of the sampled path.")
_MARKERS = flags.DEFINE_string("markers", "scale", "The --markdown section: <!-- NAME:begin -->.")
_DENSE_MAX = flags.DEFINE_integer("dense_max_items", 100_000, "Largest N run on the dense path.")
_VARIANT = flags.DEFINE_string("variant", "diffurec", "Preset of the model.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed training steps.")
_USERS = flags.DEFINE_integer("users", 256, "Test users timed.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 128, "Users per inference batch.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the table between its markers here.")
_FIGURE = flags.DEFINE_string("figure", None, "Write the log-log figure here (PNG).")

PATHS = ("dense", "sharded", "mixed", "sampled")


def item_shards(path: str, devices: int) -> int:
  """catalog.shards of a path on D devices (mixed: half of them, the data axis 2)."""
  return {"dense": 1, "sharded": devices, "mixed": devices // 2, "sampled": devices}[path]


def runs(path: str, items: str, devices: int) -> bool:
  if path == "dense":
    return float(items) <= _DENSE_MAX.value
  return path in ("sharded", "sampled") or devices >= 4


def child(part: str, items: str, devices: int, path: str) -> dict:
  """One `throughput.py --part` process; its JSON plus its wall seconds ({'error': ...} when
  it failed, e.g. out of memory: the other rows still run)."""
  argv = [os.path.join(side_by_side.BENCH, "throughput.py"),
          f"--config=configs/synthetic.py:items_{items},{_VARIANT.value}", f"--part={part}",
          f"--steps={_STEPS.value}", "--repeats=1", f"--users={_USERS.value}",
          f"--eval_batch_size={_EVAL_BATCH.value}", "--nofour_seeds"]
  if path != "dense":
    argv += [f"--config.catalog.block={_BLOCK.value}",
             f"--config.catalog.shards={item_shards(path, devices)}"]
  if path == "sampled":
    argv += ["--config.catalog.loss=sampled", f"--config.catalog.negatives={_NEGATIVES.value}"]
  flags_now = os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ, XLA_FLAGS=f"{flags_now} "
             f"--xla_force_host_platform_device_count={devices}".strip())
  try:
    return side_by_side.run_child(argv, env)
  except SystemExit as failure:
    return {"error": str(failure)}


def measure() -> list[dict]:
  rows = []
  for items in _ITEMS.value:
    for devices in map(int, _DEVICES.value):
      for path in _PATHS.value:
        if path not in PATHS:
          raise app.UsageError(f"--paths: unknown path {path!r}; choose from {PATHS}.")
        if not runs(path, items, devices):
          continue
        shards = item_shards(path, devices)
        row = {"items": items, "devices": devices, "path": path,
               "mesh": f"{devices // shards} x {shards}"}
        for part in ("train", "infer"):
          result = child(part, items, devices, path)
          result.pop("devices", None)  # "D x cpu": the row keeps D as a number.
          row.update(result)
          print(f"# N={items} D={devices} {path} {part}: " + json.dumps(
              {k: v for k, v in row.items() if k.startswith(part) or k == "error"}),
              file=sys.stderr, flush=True)
        rows.append(row)
  return rows


def _cell(row: dict, key: str) -> str:
  value = row.get(key)
  return "n/a" if value is None else f"{value:,.1f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], command: str) -> str:
  lines = [f"Measured {time.strftime('%Y-%m-%d')} on {side_by_side.machine()}; fake CPU devices "
           f"share the cores. {_VARIANT.value}, training {_STEPS.value} steps after compiling, "
           f"inference of {_USERS.value} test users in batches of {_EVAL_BATCH.value}." +
           (f" The sampled path: {_NEGATIVES.value} uniform negatives + the batch's targets "
            "per step." if "sampled" in _PATHS.value else ""), "",
           "```bash", command, "```", "",
           "| N items | devices | path | mesh data x items | train ex/s | train MB / device (XLA) | train peak RSS "
           "MB | infer users/s, 32 steps | 1 step | infer MB / device (XLA) | infer peak RSS MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    if "error" in row:
      lines.append(f"| {row['items']} | {row['devices']} | {row['path']} | {row['mesh']} | "
                   f"failed: {row['error']} | | | | | | |")
      continue
    lines.append(
        f"| {float(row['items']):,.0f} | {row['devices']} | {row['path']} | {row['mesh']} | "
        f"{_cell(row, 'train_examples_per_s')} | {_cell(row, 'train_device_mb')} | "
        f"{_cell(row, 'train_peak_rss_mb')} | {_cell(row, 'infer_users_per_s')} | "
        f"{_cell(row, 'infer_users_per_s_1step')} | {_cell(row, 'infer_device_mb')} | "
        f"{_cell(row, 'infer_peak_rss_mb')} |")
  return "\n".join(lines)


def figure(rows: list[dict], path: str):
  """Log-log: bytes per device and training time per example against N, per (path, D)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 4))
  FigureCanvasAgg(fig)
  memory_axes, time_axes = fig.subplots(1, 2)
  series = sorted({(row["path"], row["devices"]) for row in rows if "error" not in row})
  for path_name, devices in series:
    chosen = [row for row in rows if "error" not in row and row["path"] == path_name
              and row["devices"] == devices]
    sizes = [float(row["items"]) for row in chosen]
    style = {"dense": "--s", "sharded": "-o", "mixed": ":^", "sampled": "-.d"}[path_name]
    label = f"{path_name}, {devices} device{'s' if devices > 1 else ''}"
    memory_axes.plot(sizes, [row["train_device_mb"] for row in chosen], style, label=label)
    time_axes.plot(sizes, [1e3 / row["train_examples_per_s"] for row in chosen], style,
                   label=label)
  for axes, title in ((memory_axes, "training step: MB per device (XLA)"),
                      (time_axes, "training: ms per example (2 CPU cores)")):
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("items N")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
  memory_axes.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  rows = measure()
  command = "python bench/scale.py " + shlex.join(
      side_by_side.without_flags(sys.argv[1:], ("--markdown", "--figure")))
  body = markdown(rows, command)
  print(body)
  print(json.dumps(rows), flush=True)
  if _MARKDOWN.value:
    side_by_side.write_between_markers(_MARKDOWN.value, body, f"<!-- {_MARKERS.value}:begin -->",
                                       f"<!-- {_MARKERS.value}:end -->")
  if _FIGURE.value:
    figure(rows, _FIGURE.value)


if __name__ == "__main__":
  app.run(main)
