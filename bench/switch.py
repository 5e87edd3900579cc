"""What a config switch costs in speed: a preset with and without it, alternated; medians, ratio.

  python bench/switch.py --config configs/toys.py:diffurec \
      --switch catalog.loss=sampled,catalog.negatives=1024 [--rounds 3] [--steps 20] \
      [--part train|infer|both] [--markdown docs/performance.md --name sampled]

Per round, `bench/throughput.py --part train` (and/or `--part infer`) runs in a fresh process
for the preset as it is ("off") and with the switch's overrides ("on"), the order alternating
between rounds so that drift on a noisy machine falls on both. Reported: the medians over rounds
of training examples/s, users/s (32 steps), peak RSS, and the ratio on / off of the medians.
Nothing else should run meanwhile (stop the campaign: its row resumes). No figure is hard-coded.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time

from absl import app, flags

import side_by_side  # bench/

FIELDS = {"train": (("train_examples_per_s", "training examples/s"),
                    ("train_peak_rss_mb", "training peak RSS, MB")),
          "infer": (("infer_users_per_s", "users/s, 32 steps"),
                    ("infer_peak_rss_mb", "inference peak RSS, MB"))}


def parse_switch(items: list[str] | None) -> list[str]:
  """['KEY=VALUE', ...] -> ['--config.KEY=VALUE', ...]; a malformed item is a one-line error."""
  if not items:
    raise SystemExit("error: give --switch KEY=VALUE[,KEY=VALUE]: the overrides to measure.")
  overrides = []
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
      raise SystemExit(f"error: --switch item {item!r} is not KEY=VALUE.")
    overrides.append(f"--config.{key.removeprefix('config.')}={value}")
  return overrides


def parts(part: str) -> tuple[str, ...]:
  return ("train", "infer") if part == "both" else (part,)


def load_warning(load: float, cores: int) -> str | None:
  """A warning when the 1-minute load average says other work shares the cores (the table
  claims nothing else ran)."""
  if load <= 0.5 * cores:
    return None
  return (f"warning: load average {load:.2f} on {cores} cores: other work is running, so "
          "these figures are not a quiet machine's; stop it (the campaign resumes) and rerun.")


def child_argv(config: str, overrides: list[str], part: str, steps: int, repeats: int,
               users: int) -> list[str]:
  return [os.path.join(side_by_side.BENCH, "throughput.py"), f"--config={config}", *overrides,
          f"--part={part}", f"--steps={steps}", f"--repeats={repeats}", f"--users={users}",
          "--nofour_seeds"]


def order(round_index: int) -> tuple[str, str]:
  """Off first in even rounds, on first in odd ones."""
  return ("off", "on") if round_index % 2 == 0 else ("on", "off")


def summarise(records: dict[str, list[dict]], part: str) -> list[tuple[str, float, float, float]]:
  """[(label, off median, on median, on / off)] for the timed parts' fields."""
  rows = []
  for name in parts(part):
    for field, label in FIELDS[name]:
      off = statistics.median(r[field] for r in records["off"])
      on = statistics.median(r[field] for r in records["on"])
      rows.append((label, off, on, on / off))
  return rows


def markdown(records: dict, rows: list, command: str, part: str, repeats: int,
             busy: str | None = None) -> str:
  """The section's text; `busy` (load_warning's message) replaces the claim of a quiet machine."""
  quiet = "nothing else running" if busy is None else busy.removeprefix("warning: ").split(
      ":")[0] + " at the start (other work running)"
  lines = [f"Measured {time.strftime('%Y-%m-%d')} on {side_by_side.machine()}, {quiet}. Medians of {len(records['off'])} rounds (order alternating, each a fresh "
           f"process per setting), each process the median of {repeats} repeats.", "",
           "```bash", command, "```", "",
           "| | off | on | on / off |", "|---|---|---|---|"]
  lines += [f"| {label} | {off:,.1f} | {on:,.1f} | **{ratio:.2f}x** |"
            for label, off, on, ratio in rows]
  first_field = FIELDS[parts(part)[0]][0][0]
  lines += ["", f"Per round ({first_field}, off; on): " + "; ".join(
      f"{a[first_field]}; {b[first_field]}" for a, b in zip(records["off"], records["on"]))]
  return "\n".join(lines)


def define_flags():
  """The command line (defined when run, not on import: the tests import this file beside
  bin/ scripts whose flags have the same names)."""
  flags.DEFINE_string("config", "configs/toys.py:diffurec", "The preset (off).")
  flags.DEFINE_list("switch", None, "KEY=VALUE config overrides that make it on.")
  flags.DEFINE_integer("rounds", 3, "Rounds; medians are reported.")
  flags.DEFINE_integer("steps", 20, "Training steps per timed repeat.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats per child (its median is used).")
  flags.DEFINE_integer("users", 1024, "Test users per inference repeat.")
  flags.DEFINE_enum("part", "train", ["train", "infer", "both"], "What is timed.")
  flags.DEFINE_string("markdown", None, "Write the table into this file between the markers "
                      "<!-- switch:NAME:begin/end -->.")
  flags.DEFINE_string("name", None, "The markers' NAME (with --markdown).")


def main(argv):
  del argv
  options = flags.FLAGS
  overrides = {"off": [], "on": parse_switch(options.switch)}
  if options.rounds < 1:
    raise SystemExit(f"error: --rounds {options.rounds}: give 1 or more.")
  if options.markdown and not options.name:
    raise SystemExit("error: --markdown needs --name (the section's markers).")
  warning = load_warning(os.getloadavg()[0], os.cpu_count() or 1)
  if warning:
    print(warning, file=sys.stderr, flush=True)
  records = {"off": [], "on": []}
  started = time.perf_counter()
  for round_index in range(options.rounds):
    for setting in order(round_index):
      record = {}
      for part in parts(options.part):
        record.update(side_by_side.run_child(child_argv(
            options.config, overrides[setting], part, options.steps, options.repeats,
            options.users)))
      records[setting].append(record)
      print(f"# round {round_index + 1}/{options.rounds} {setting}: " + ", ".join(
          f"{field}={record[field]}" for name in parts(options.part) for field, _ in FIELDS[name])
          + f" ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr, flush=True)
  rows = summarise(records, options.part)
  command = "python bench/switch.py " + shlex.join(
      side_by_side.without_flags(sys.argv[1:], ("--markdown", "--name")))
  body = markdown(records, rows, command, options.part, options.repeats, warning)
  print(body)
  print(json.dumps({"rows": rows, "records": records}), flush=True)
  if options.markdown:
    side_by_side.write_between_markers(options.markdown, body,
                                       f"<!-- switch:{options.name}:begin -->",
                                       f"<!-- switch:{options.name}:end -->")
    print(f"# wrote the table into {options.markdown}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
