"""Golden figures: prove a refactor left behaviour unchanged, bit for bit.

  python bench/golden.py record results/golden/figures.json   # before the change
  python bench/golden.py check results/golden/figures.json    # after: exit 1 on any difference

Through the entrypoints users run (so it survives any module layout): for diffurec, v1, v2 and
sasrec, a smoke training run of Toys with one step per epoch (so each epoch's loss is one
step's loss), its validation records, test metrics and a hash of the per-user test ranks;
then `bin/infer.py` on the diffurec and v2 runs: test metrics with a 2-chain, 4-step
ensemble, and the recommendations for a fixed input file. Timing fields are left out; every
other number is compared exactly (float repr). Needs the Toys data ($DIFFUREC_DATA). About 4
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("diffurec", "v1", "v2", "sasrec")
TIMING = {"seconds", "wall_s", "examples_per_s", "compile_s", "users_per_s", "time"}
OVERRIDES = ("--config.data.max_users=160", "--config.train.num_epochs=4",
             "--config.train.max_steps_per_epoch=1", "--config.train.batch_size=32",
             "--config.train.eval_batch_size=64")
INPUT = ("user,item,timestamp\n"
         "a,4,1\na,5,2\na,13,3\n"
         "b,1,1\nb,2,2\n"
         "c,nosuchitem,1\n")


def _strip(value):
  if isinstance(value, dict):
    return {k: _strip(v) for k, v in sorted(value.items()) if k not in TIMING}
  if isinstance(value, list):
    return [_strip(v) for v in value]
  return value


def _run(args: list[str], env: dict) -> str:
  done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False)
  if done.returncode != 0:
    raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
  return done.stdout


def _ranks_digest(path: pathlib.Path) -> str:
  arrays = np.load(path)
  digest = hashlib.sha256()
  for name in sorted(arrays.files):
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(arrays[name]).tobytes())
  return digest.hexdigest()


def figures(workroot: pathlib.Path) -> dict:
  env = dict(os.environ, DIFFUREC_CACHE=str(workroot / "cache"), PYTHONUNBUFFERED="1")
  out = {}
  input_path = workroot / "histories.csv"
  input_path.write_text(INPUT)
  for variant in VARIANTS:
    workdir = workroot / variant
    _run(["bin/train.py", f"--config=configs/toys.py:{variant},smoke", *OVERRIDES,
          f"--workdir={workdir}"], env)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((workdir / "results.json").read_text())
    out[variant] = {"metrics": _strip(records), "results": _strip(results),
                    "test_ranks_sha256": _ranks_digest(workdir / "test_ranks.npz")}
    print(f"{variant}: losses {[r['loss'] for r in records if r.get('split') == 'train']}",
          flush=True)
  for variant in ("diffurec", "v2"):
    workdir = workroot / variant
    last = _run(["bin/infer.py", f"--workdir={workdir}", "--seeds=2", "--steps=4"],
                env).strip().splitlines()[-1]
    out[variant]["infer_test"] = _strip(json.loads(last))
    recs = workroot / f"{variant}_recs.csv"
    _run(["bin/infer.py", f"--workdir={workdir}", f"--input={input_path}",
          f"--output={recs}", "--topk=5"], env)
    out[variant]["infer_recommendations"] = recs.read_text()
  return out


def _differences(old, new, path="") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    found = [f"{path}/{k}: missing after" for k in old if k not in new]
    found += [f"{path}/{k}: new after" for k in new if k not in old]
    for k in old:
      if k in new:
        found += _differences(old[k], new[k], f"{path}/{k}")
    return found
  if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
    return [d for k, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{k}]")]
  return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=["record", "check"])
  parser.add_argument("path")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="diffurec_golden_") as tmp:
    new = figures(pathlib.Path(tmp))
  path = pathlib.Path(args.path)
  if args.mode == "record":
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    print(f"recorded {path}")
    return 0
  old = json.loads(path.read_text())
  differences = _differences(old, json.loads(json.dumps(new)))
  for line in differences[:40]:
    print(line)
  print(f"{len(differences)} difference(s) from {path}" if differences
        else f"identical to {path}: {', '.join(sorted(old))}")
  return 1 if differences else 0


if __name__ == "__main__":
  sys.exit(main())
