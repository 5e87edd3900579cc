"""Two training runs at once, one core each, against one run on every core (issue 18, section 1).

  python bench/pinned.py [--dataset toys] [--variants diffurec,v1] [--rounds 2] [--steps 10]
                         [--repeats 3] [--markdown docs/performance.md]

Per round and variant, alternating the order between rounds:
  both cores: one `bench/throughput.py --part train` child, unpinned (XLA uses every core);
  pinned:     as many children as cores, started together, child k under `taskset -c k` with
              XLA's intra-op parallelism at 1 thread; they compile, wait for each other
              (throughput.py --barrier) and then time the same steps at the same moment.
The figure compared is the machine's training examples/s: the one child's, or the sum of the
pinned children's. The campaign can run two rows at once if the pinned sum is worth it. Nothing
else should run meanwhile (stop the campaign: it resumes). Needs Linux `taskset`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import side_by_side  # bench/

_DATASET = flags.DEFINE_string("dataset", "toys", "configs/<dataset>.py.")
_VARIANTS = flags.DEFINE_list("variants", ["diffurec", "v1"], "Presets measured.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds; medians are reported.")
_STEPS = flags.DEFINE_integer("steps", 10, "Training steps per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats per child (its median is used).")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the table into this file between "
                                "its pinned-bench markers (docs/performance.md).")

BEGIN, END = "<!-- pinned:begin -->", "<!-- pinned:end -->"
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def child_argv(variant: str, barrier: str | None = None) -> list[str]:
  argv = [sys.executable, os.path.join(side_by_side.BENCH, "throughput.py"),
          f"--config=configs/{_DATASET.value}.py:{variant}", "--part=train",
          f"--steps={_STEPS.value}", f"--repeats={_REPEATS.value}"]
  return argv + ([f"--barrier={barrier}"] if barrier else [])


def _result(process: subprocess.Popen, argv: list[str]) -> dict:
  stdout, stderr = process.communicate()
  return side_by_side.child_json(argv, process.returncode, stdout, stderr)


def both_cores(variant: str) -> float:
  argv = child_argv(variant)
  process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return _result(process, argv)["train_examples_per_s"]


def pinned(variant: str, cores: list[int]) -> list[float]:
  """Each child's examples/s, the children pinned one per core and timed together."""
  folder = tempfile.mkdtemp(prefix="pinned-barrier-")
  try:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + SINGLE_THREAD))
    argv = child_argv(variant, barrier=f"{folder}:{len(cores)}")
    children = [subprocess.Popen(["taskset", "-c", str(core)] + argv, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for core in cores]
    return [_result(child, argv)["train_examples_per_s"] for child in children]
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def markdown(rows: dict, command: str, cores: list[int]) -> str:
  lines = [f"Measured {time.strftime('%Y-%m-%d')} on {side_by_side.machine()}, nothing else "
           f"running. Medians of {_ROUNDS.value} rounds (order alternating), each child the "
           f"median of {_REPEATS.value} repeats of {_STEPS.value} training steps after "
           "compiling.", "", "```bash", command, "```", "",
           f"| variant | one run, {len(cores)} cores: ex/s | {len(cores)} runs pinned, 1 core "
           "each: ex/s per run | sum | sum / one run |", "|---|---|---|---|---|"]
  for variant, row in rows.items():
    one = statistics.median(row["both"])
    each = statistics.median(x for round_ in row["pinned"] for x in round_)
    total = statistics.median(sum(round_) for round_ in row["pinned"])
    lines.append(f"| {variant} | {one:,.1f} | {each:,.1f} | {total:,.1f} | "
                 f"**{total / one:.2f}x** |")
  lines += ["", "Per round (one run; pinned runs):", ""]
  for variant, row in rows.items():
    rounds = "; ".join(f"{b}; {' + '.join(str(x) for x in p)}"
                       for b, p in zip(row["both"], row["pinned"]))
    lines.append(f"- {variant}: {rounds}")
  return "\n".join(lines)


def main(argv):
  del argv
  if not shutil.which("taskset"):
    raise SystemExit("error: taskset not found (util-linux); this bench pins processes to cores.")
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2:
    raise SystemExit(f"error: this process may use {len(cores)} core; pinning needs 2 or more.")
  rows = {variant: {"both": [], "pinned": []} for variant in _VARIANTS.value}
  for round_ in range(_ROUNDS.value):
    for variant in _VARIANTS.value:
      order = ("both", "pinned") if round_ % 2 == 0 else ("pinned", "both")
      for arrangement in order:
        start = time.perf_counter()
        value = both_cores(variant) if arrangement == "both" else pinned(variant, cores)
        rows[variant][arrangement].append(value)
        print(f"# round {round_ + 1}/{_ROUNDS.value} {variant} {arrangement}: {value} ex/s "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
  command = "python bench/pinned.py " + shlex.join(
      a for a in sys.argv[1:] if not a.startswith("--markdown"))
  body = markdown(rows, command, cores)
  print(body)
  print(json.dumps(rows), flush=True)
  if _MARKDOWN.value:
    side_by_side.write_between_markers(_MARKDOWN.value, body, BEGIN, END)
    print(f"# wrote the table into {_MARKDOWN.value}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
