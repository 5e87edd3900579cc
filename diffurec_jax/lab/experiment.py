"""A grid of variants x seeds in one directory, then its report: `run_experiment(...)`.

Each run is an ordinary workdir `W/<variant>/seed<k>` trained by `train.train_and_evaluate`
(resumable; a finished run is skipped). Variants are `diffurec`, `v1`, `v2`, `sasrec`, and
ablations joined with '+': `diffurec+lambda0`, `v2+nopos`, ... (`lambda0`, `upstream`,
`nopos`, `steps1` alone mean diffurec+that). `steps1` is an inference ablation: it trains
nothing and re-evaluates the trained runs of its base variant with one reverse step.

Each variant's config is `get_config('<variant presets>,<--config presets>')` of the config
file, then the command line's overrides, then `seed = k`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex
import sys

import ml_collections
import numpy as np

from diffurec_jax import config as config_lib
from diffurec_jax import errors

TRAINING_ABLATIONS = ("upstream", "nopos", "lambda0")
INFERENCE_ABLATIONS = {"steps1": 1}  # Ablation -> sample.steps of the re-evaluation.
ABLATIONS = TRAINING_ABLATIONS + tuple(INFERENCE_ABLATIONS)
# Fields the runner owns: overriding them on the command line would break the grid.
_RUNNER_FIELDS = {"seed": "the runner seeds run k with k (use --seeds)",
                  "variant": "the variant comes from --variants"}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One column of the grid. `name` is canonical ('diffurec+lambda0'); `presets` are the
  training presets; `steps` > 0 marks an inference ablation of the runs of `source`."""
  name: str
  presets: tuple[str, ...]
  steps: int = 0
  source: str = ""

  @property
  def trains(self) -> bool:
    return not self.steps


def parse_variant(name: str) -> Variant:
  """'v2+nopos' -> Variant('v2+nopos', ('v2', 'nopos')); bad names raise UsageError."""
  parts = [part.strip() for part in name.split("+") if part.strip()]
  if not parts:
    raise errors.UsageError(f"Empty variant name in --variants ({name!r}).")
  if parts[0] in ABLATIONS:
    parts = ["diffurec"] + parts
  base, ablations = parts[0], parts[1:]
  known = f"use one of {list(config_lib.VARIANTS)}, optionally +{'/+'.join(ABLATIONS)}"
  if base not in config_lib.VARIANTS:
    raise errors.UsageError(f"Unknown variant {name!r} in --variants; {known}.")
  unknown = [part for part in ablations if part not in ABLATIONS]
  if unknown or len(set(ablations)) != len(ablations):
    raise errors.UsageError(f"Bad ablation(s) in variant {name!r}; {known}, each at most once.")
  if base == "sasrec" and ablations:
    raise errors.UsageError(f"Variant {name!r}: the ablations change the diffusion model; SASRec has "
                     "none of them.")
  inference = [part for part in ablations if part in INFERENCE_ABLATIONS]
  if len(inference) > 1 or (inference and ablations[-1] != inference[0]):
    raise errors.UsageError(f"Variant {name!r}: put the one inference ablation last "
                     f"(e.g. 'v2+nopos+steps1').")
  canonical = "+".join([base] + ablations)
  if inference:
    source = "+".join([base] + ablations[:-1])
    return Variant(canonical, tuple([base] + ablations[:-1]), INFERENCE_ABLATIONS[inference[0]],
                   source)
  return Variant(canonical, tuple([base] + ablations))


def parse_variants(names) -> list[Variant]:
  """Canonical variants in order, duplicates removed. The source of an inference ablation is
  added before it when missing, since its runs must be trained first."""
  requested = [parse_variant(name) for name in names]
  if not requested:
    raise errors.UsageError("--variants is empty; name at least one, e.g. diffurec,v2,sasrec.")
  variants = []
  for variant in requested:
    if variant.steps and variant.source not in [v.name for v in variants]:
      if variant.source not in [v.name for v in requested]:
        print(f"note: {variant.name} re-evaluates the {variant.source} runs; training them too.")
      variants.append(parse_variant(variant.source))
    if variant.name not in [v.name for v in variants]:
      variants.append(variant)
  return variants


def split_config_arg(config_arg: str) -> tuple[str, str]:
  """'configs/toys.py:smoke,v2' -> ('configs/toys.py', 'smoke,v2')."""
  path, _, presets = config_arg.partition(":")
  return path, presets


def load_config_module(path: str):
  """The config file as a module with get_config(arg)."""
  if not os.path.isfile(path):
    raise errors.UsageError(f"Config file {path!r} does not exist; use e.g. configs/toys.py.")
  spec = importlib.util.spec_from_file_location(f"experiment_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise errors.UsageError(f"Config file {path} has no get_config(arg) function.")
  return module


def flatten(config) -> dict:
  """{'model.hidden': 128, ...} of a ConfigDict (or nested dict); tuples stay tuples."""
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  flat = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      flat.update({f"{name}.{key}": inner for key, inner in flatten(value).items()})
    else:
      flat[name] = value
  return flat


def extract_overrides(loaded, default, explicit=()) -> dict:
  """The command line's overrides: fields where `loaded` (the --config value) differs from
  `default` (get_config of the same ':presets'), plus the `explicit` field names (flags set
  to a value equal to the default still apply to every variant). Values come from `loaded`."""
  loaded_flat, default_flat = flatten(loaded), flatten(default)
  names = {key for key in loaded_flat if default_flat.get(key, object()) != loaded_flat[key]}
  names |= {key for key in explicit if key in loaded_flat}
  return {key: loaded_flat[key] for key in sorted(names)}


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict):
  """Sets each dotted field of `overrides` on `config` (in place) and returns it."""
  for name, value in overrides.items():
    *path, field = name.split(".")
    node = config
    for part in path + [field]:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise errors.UsageError(f"--config.{name} is not a field of the config; see "
                         "diffurec_jax/config.py for the fields.")
      parent, node = node, node[part]
    parent[field] = tuple(value) if isinstance(value, list) else value
  return config


def check_preset_arg(preset_arg: str):
  names = [name.strip() for name in (preset_arg or "").split(",") if name.strip()]
  variants = [name for name in names if name in config_lib.VARIANTS or name in ABLATIONS]
  if variants:
    raise errors.UsageError(f"--config presets {variants} choose variants; name them in --variants "
                     "instead (e.g. --variants diffurec,v2,lambda0).")


def check_overrides(overrides: dict):
  for name, reason in _RUNNER_FIELDS.items():
    if name in overrides:
      raise errors.UsageError(f"--config.{name} cannot be set here: {reason}.")


def variant_config(module, variant: Variant, preset_arg: str, overrides: dict, seed: int):
  """The config of one trained run: presets, then overrides, then the seed."""
  arg = ",".join(list(variant.presets) + [p for p in preset_arg.split(",") if p.strip()])
  config = apply_overrides(module.get_config(arg), overrides)
  config.seed = seed
  return config


def run_dir(workdir: str, variant_name: str, seed: int) -> str:
  return os.path.join(workdir, variant_name, f"seed{seed}")


def reevaluate(source: str, workdir: str, steps: int, *, progress: bool = True) -> dict:
  """The test split of the trained run `source` again with sample.steps = `steps`, as an
  ordinary finished workdir (config.json, metrics.jsonl test line, results.json, ranks)."""
  from diffurec_jax import evaluate as evaluate_lib
  from diffurec_jax import sharding
  from diffurec_jax.training import workdir as workdir_lib
  finished = workdir_lib.read_json(workdir, "results.json")
  if finished is not None:
    print(f"{workdir}: re-evaluation already finished; results in {workdir}/results.json")
    return finished
  main = sharding.is_main_process()
  test, per_user, loaded = evaluate_lib.evaluate_workdir(source, "test", steps=steps,
                                                         progress=progress and main)
  workdir_lib.check_or_write_config(workdir, loaded.config, write=main)
  results = dict(workdir_lib.read_json(source, "results.json"))
  results.update(test={key: test[key] for key in results["test"]}, test_all=test, valid={},
                 valid_all={}, sample_steps=steps, reevaluated_from=os.path.abspath(source))
  if main:
    workdir_lib.MetricsLog(workdir, True).write(epoch=results["best_epoch"], split="test",
                                                **test)
    np.savez(os.path.join(workdir, "test_ranks.npz"),
             **{key: np.asarray(value) for key, value in per_user.items()})
    workdir_lib.write_json(workdir, "results.json", results)
  return results


def run_grid(module, variants: list[Variant], preset_arg: str, overrides: dict, seeds: int,
             workdir: str, *, progress: bool = True) -> dict:
  """Trains (or re-evaluates) every run; {variant name: [results.json of seed 0..]}."""
  from diffurec_jax.training import loop as train
  order = [v for v in variants if v.trains] + [v for v in variants if not v.trains]
  total, done = len(order) * seeds, 0
  results = {variant.name: [None] * seeds for variant in variants}
  for variant in order:  # Trained variants first: inference ablations read their runs.
    for seed in range(seeds):
      done += 1
      path = run_dir(workdir, variant.name, seed)
      print(f"[{done}/{total}] {variant.name} seed {seed}: {path}", flush=True)
      if variant.trains:
        config = variant_config(module, variant, preset_arg, overrides, seed)
        results[variant.name][seed] = train.train_and_evaluate(config, path, progress=progress)
      else:
        source = run_dir(workdir, variant.source, seed)
        results[variant.name][seed] = reevaluate(source, path, variant.steps, progress=progress)
  return results


def run_experiment(config_path: str, preset_arg: str, overrides: dict, variants, seeds: int,
                   workdir: str, *, command: str | None = None, progress: bool = True,
                   baselines=None) -> dict:
  """Runs the grid of `variants` x `seeds` into `workdir`, writes report.md, report.json and
  figures/, and returns the report dict. `overrides` = {'model.hidden': 16, ...}; every
  variant is t-tested against each of `baselines` (default: diffurec and sasrec, where run)."""
  from diffurec_jax.lab import report as report_lib
  from diffurec_jax import sharding
  if int(seeds) < 1:
    raise errors.UsageError(f"--seeds={seeds} must be at least 1.")
  grid = parse_variants(list(variants))
  names = [v.name for v in grid]
  if baselines:
    canonical = [parse_variant(name).name for name in baselines]
    missing = [name for name in canonical if name not in names]
    if missing:
      raise errors.UsageError(f"--baselines {missing} are not in --variants {names}.")
  else:
    canonical = list(report_lib.DEFAULT_BASELINES)
  check_preset_arg(preset_arg)
  check_overrides(overrides)
  module = load_config_module(config_path)
  for variant in grid:  # Bad presets or overrides fail here, before any training.
    if variant.trains:
      variant_config(module, variant, preset_arg, overrides, 0)
  os.makedirs(workdir, exist_ok=True)
  run_grid(module, grid, preset_arg, overrides, int(seeds), workdir, progress=progress)
  if not sharding.is_main_process():  # Every process trains; one writes the report.
    return {}
  command = command if command is not None else "python " + shlex.join(sys.argv)
  return report_lib.write_report(workdir, names, int(seeds), command=command,
                                 baselines=canonical)
