"""Ours and the official DiffuRec, measured alternately in fresh processes; medians and ratios.

Driven by `bench/throughput.py --upstream PATH` (see its docstring). Each measurement is a
child process printing one JSON line: `bench/throughput.py --part train|infer` for ours,
`bench/upstream_throughput.py --part train|infer` for the official code.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- side-by-side:begin -->", "<!-- side-by-side:end -->"
TARGET = 10.0  # The goal: ours >= 10x the official code, training and 32-step inference.

OURS_FIELDS = ("train_examples_per_s", "infer_users_per_s", "infer_users_per_s_1step",
               "infer_users_per_s_4seeds", "train_compile_s", "infer_compile_s",
               "train_peak_rss_mb", "infer_peak_rss_mb", "train_gflops_per_s")
OFFICIAL_FIELDS = ("train_examples_per_s", "infer_users_per_s", "peak_rss_mb")


@dataclasses.dataclass(frozen=True)
class Options:
  upstream: str | None
  rounds: int
  variants: tuple[str, ...]
  dataset: str
  steps: int
  users: int
  users_4seeds: int
  eval_batch_size: int
  upstream_steps: int
  upstream_users: int
  markdown: str | None


def child_json(argv: list[str], returncode: int, stdout: str, stderr: str) -> dict:
  """The JSON of a finished measurement process's last stdout line; SystemExit (one line,
  with the last line of its stderr) when it failed."""
  if returncode:
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    raise SystemExit(f"error: {shlex.join(argv)} failed (exit {returncode}): {tail}")
  return json.loads(stdout.strip().splitlines()[-1])


def run_child(argv: list[str], env: dict | None = None) -> dict:
  """Runs one measurement process (python `argv`); its last stdout line is JSON."""
  start = time.perf_counter()
  done = subprocess.run([sys.executable] + argv, capture_output=True, text=True, env=env)
  result = child_json(argv, done.returncode, done.stdout, done.stderr)
  result["process_s"] = round(time.perf_counter() - start, 1)
  return result


def ours_argv(options: Options, variant: str, part: str) -> list[str]:
  argv = [os.path.join(BENCH, "throughput.py"), f"--config=configs/{options.dataset}.py:{variant}",
          f"--part={part}", f"--steps={options.steps}", "--repeats=1",
          f"--users={options.users}", f"--eval_batch_size={options.eval_batch_size}"]
  if options.users_4seeds:
    argv.append(f"--users_4seeds={options.users_4seeds}")
  return argv


def official_argv(options: Options, part: str) -> list[str]:
  return [os.path.join(BENCH, "upstream_throughput.py"), f"--upstream={options.upstream}",
          f"--config=configs/{options.dataset}.py:diffurec", f"--part={part}",
          f"--steps={options.upstream_steps}", f"--users={options.upstream_users}",
          f"--eval_batch_size={options.eval_batch_size}", f"--threads={os.cpu_count() or 1}",
          "--json"]


def _say(message: str):
  print(f"# {message}", file=sys.stderr, flush=True)


def measure(options: Options) -> dict:
  """{'ours': {variant: [round records]}, 'official': [round records]}, alternating."""
  ours = {variant: [] for variant in options.variants}
  official = []
  started = time.perf_counter()
  for round_index in range(options.rounds):
    for variant in options.variants:
      jobs = [("ours", variant)]
      if options.upstream and variant == "diffurec":
        jobs = jobs + [("official", variant)] if round_index % 2 == 0 else \
            [("official", variant)] + jobs
      for who, name in jobs:
        record = {}
        for part in ("train", "infer"):
          argv = ours_argv(options, name, part) if who == "ours" else official_argv(options, part)
          record.update(run_child(argv))
          if who == "official":
            record[f"{part}_peak_rss_mb"] = record.pop("peak_rss_mb")
        (ours[name] if who == "ours" else official).append(record)
        _say(f"round {round_index + 1}/{options.rounds} {who} {name}: " + ", ".join(
            f"{k}={record[k]}" for k in ("train_examples_per_s", "infer_users_per_s")) +
            f" ({time.perf_counter() - started:.0f} s so far)")
  return {"ours": ours, "official": official}


def median_of(records: list[dict], field: str):
  values = [r[field] for r in records if field in r]
  return round(statistics.median(values), 1) if values else None


def summarise(measured: dict) -> dict:
  """Medians per variant, and ratios ours / official where the official code has the variant."""
  summary = {}
  for variant, records in measured["ours"].items():
    row = {field: median_of(records, field) for field in OURS_FIELDS}
    row["rounds"] = [{k: r.get(k) for k in ("train_examples_per_s", "infer_users_per_s")}
                     for r in records]
    first = records[0]
    row.update(batch_size=first["batch_size"], max_len=first["max_len"],
               eval_batch_size=first["eval_batch_size"])
    summary[variant] = {"ours": row}
  if measured["official"] and "diffurec" in summary:
    records = measured["official"]
    official = {field: median_of(records, field)
                for field in ("train_examples_per_s", "infer_users_per_s",
                              "train_peak_rss_mb", "infer_peak_rss_mb")}
    official["rounds"] = [{k: r.get(k) for k in ("train_examples_per_s", "infer_users_per_s")}
                          for r in records]
    official["torch"] = records[0].get("torch")
    official["threads"] = records[0].get("threads")
    ours = summary["diffurec"]["ours"]
    ratio = lambda a, b: round(a / b, 2) if a and b else None
    summary["diffurec"]["official"] = official
    summary["diffurec"]["ratios"] = {
        "train": ratio(ours["train_examples_per_s"], official["train_examples_per_s"]),
        "infer_32_steps": ratio(ours["infer_users_per_s"], official["infer_users_per_s"]),
        "infer_1_step_vs_official_32": ratio(ours["infer_users_per_s_1step"],
                                             official["infer_users_per_s"]),
        "peak_rss_train": ratio(ours["train_peak_rss_mb"], official["train_peak_rss_mb"]),
        "peak_rss_infer": ratio(ours["infer_peak_rss_mb"], official["infer_peak_rss_mb"])}
  return summary


def machine() -> str:
  """The CPU, its cores, Python and jax, in words (no JAX backend is started here)."""
  from diffurec_jax.lab import machine as machine_lib
  host = machine_lib.host()
  return f"{host['cpu']}, {host['cpu_count']} cores, Python {host['python']}, jax {host['jax']}"


def _cell(value, unit: str = "") -> str:
  if value is None:
    return "n/a"
  return f"{value:,.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _ratio(value) -> str:
  return "n/a" if value is None else f"{value:.2f}x"


def markdown(summary: dict, options: Options, command: str) -> str:
  """The side-by-side table, its command and what each ratio means against the 10x target."""
  lines = [f"Measured {datetime.date.today().isoformat()} on {machine()}"
           + (f"; official code: torch {summary.get('diffurec', {}).get('official', {}).get('torch')}"
              f", {summary.get('diffurec', {}).get('official', {}).get('threads')} threads"
              if "official" in summary.get("diffurec", {}) else "; official code not given")
           + f". Medians of {options.rounds} rounds; ours and the official code alternate, each"
           " part in a fresh process (peak RSS is that process's high-water mark; compilation"
           " is cold: no persistent cache).", "", "```bash", command, "```", "",
           "| variant (batch, max_len) | code | train ex/s | infer users/s, 32 steps | 1 step |"
           " 4 seeds | compile s (train + eval) | peak RSS train / eval (MB) |",
           "|---|---|---|---|---|---|---|---|"]
  for variant, entry in summary.items():
    ours = entry["ours"]
    shape = f"{variant} ({ours['batch_size']}, {ours['max_len']})"
    compile_s = (None if ours["train_compile_s"] is None else
                 f"{ours['train_compile_s']:.0f} + {ours['infer_compile_s']:.0f}")
    lines.append(f"| {shape} | ours | {_cell(ours['train_examples_per_s'])} | "
                 f"{_cell(ours['infer_users_per_s'])} | {_cell(ours['infer_users_per_s_1step'])} | "
                 f"{_cell(ours['infer_users_per_s_4seeds'])} | {compile_s} | "
                 f"{_cell(ours['train_peak_rss_mb'])} / {_cell(ours['infer_peak_rss_mb'])} |")
    if "official" in entry:
      official, ratios = entry["official"], entry["ratios"]
      lines.append(f"| {shape} | official | {_cell(official['train_examples_per_s'])} | "
                   f"{_cell(official['infer_users_per_s'])} | | | | "
                   f"{_cell(official['train_peak_rss_mb'])} / "
                   f"{_cell(official['infer_peak_rss_mb'])} |")
      lines.append(f"| {shape} | **ours / official** | **{_ratio(ratios['train'])}** | "
                   f"**{_ratio(ratios['infer_32_steps'])}** | "
                   f"{_ratio(ratios['infer_1_step_vs_official_32'])} (vs their 32) | | | "
                   f"{_ratio(ratios['peak_rss_train'])} / {_ratio(ratios['peak_rss_infer'])} |")
  if "official" in summary.get("diffurec", {}):
    ratios = summary["diffurec"]["ratios"]
    verdict = lambda r: "meets" if r and r >= TARGET else "below"
    lines += ["", f"Against the 10x target: training {_ratio(ratios['train'])} "
              f"({verdict(ratios['train'])}), 32-step inference "
              f"{_ratio(ratios['infer_32_steps'])} ({verdict(ratios['infer_32_steps'])})."]
  lines += ["", "Per-round figures (train ex/s, infer users/s):", ""]
  for variant, entry in summary.items():
    for who in ("ours", "official"):
      if who in entry:
        rounds = "; ".join(f"{r['train_examples_per_s']}, {r['infer_users_per_s']}"
                           for r in entry[who]["rounds"])
        lines.append(f"- {variant}, {who}: {rounds}")
  return "\n".join(lines)


def without_flags(args: list[str], names: tuple[str, ...]) -> list[str]:
  """`args` without the flags `names` and their values (`--name=v` or `--name v`): a
  recorded command that does not name where its output went."""
  kept, skip = [], False
  for arg in args:
    if skip:
      skip = False
    elif arg in names:
      skip = True
    elif not arg.startswith(tuple(f"{name}=" for name in names)):
      kept.append(arg)
  return kept


def write_between_markers(path: str, body: str, begin: str = BEGIN, end: str = END):
  """Replaces the text between `begin` and `end` in `path` (appends both if absent)."""
  text = open(path).read() if os.path.exists(path) else ""
  block = f"{begin}\n{body}\n{end}"
  if begin in text and end in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
  with open(path, "w") as handle:
    handle.write(text)


def run(options: Options):
  if options.upstream and not os.path.exists(os.path.join(options.upstream, "diffurec.py")):
    raise SystemExit(f"error: --upstream {options.upstream}: no diffurec.py there; point it at "
                     "the official code's src/.")
  command = "python bench/throughput.py " + shlex.join(
      without_flags(sys.argv[1:], ("--markdown",)))
  summary = summarise(measure(options))
  body = markdown(summary, options, command)
  print(body)
  print(json.dumps(summary), flush=True)
  if options.markdown:
    write_between_markers(options.markdown, body)
    _say(f"wrote the table into {options.markdown}")
