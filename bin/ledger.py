"""The results ledger: add a finished run, re-evaluate one, rebuild docs/results.md.

  python bin/ledger.py add --workdir runs/toys --name diffurec --command "python bin/train.py ..."
  python bin/ledger.py evaluate --workdir runs/toys --steps 1 --label "1 reverse step"
  python bin/ledger.py ensemble --workdir runs/toys_v2_seed0 --entry results/toys/v2/seed0
  python bin/ledger.py report                      # results/ -> docs/results.md + figures

`add` copies config.json, metrics.jsonl, results.json and the machine's description into
results/<dataset>/<name>/seed<k>/ (small files only: never checkpoints or data). `ensemble`
tests the selected checkpoint with S = 1, 2, 4, 8 averaged reverse chains (DiffuRecSys
Algorithm 3) and writes ensemble.json and ensemble_ranks.npz into the run's entry.
"""

import argparse
import os
import shlex
import sys


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command_name", required=True)
  add = commands.add_parser("add", help="copy a finished run's small files into the ledger")
  add.add_argument("--workdir", required=True)
  add.add_argument("--name", required=True, help="row name, e.g. diffurec, sasrec, diffurec+lambda0")
  add.add_argument("--command", default="", help="the command that made the run")
  add.add_argument("--kind", default="run", choices=("run", "trial"))
  add.add_argument("--notes", default="")
  add.add_argument("--root", default="results")
  add.add_argument("--overwrite", action="store_true")
  evaluate = commands.add_parser("evaluate", help="test the selected checkpoint again")
  evaluate.add_argument("--workdir", required=True)
  evaluate.add_argument("--steps", type=int, required=True, help="reverse steps K")
  evaluate.add_argument("--sampler", default="", help="reverse | ddim | one_step ('' = the run's)")
  evaluate.add_argument("--label", required=True)
  evaluate.add_argument("--split", default="test", choices=("valid", "test"))
  evaluate.add_argument("--lambda0", action="store_true",
                        help="lambda = 0 at inference (issue 18 H2: does x_t matter?)")
  ensemble = commands.add_parser("ensemble", help="seed ensembles of the selected checkpoint")
  ensemble.add_argument("--workdir", required=True)
  ensemble.add_argument("--entry", required=True,
                        help="the run's ledger folder, e.g. results/toys/v2/seed0")
  ensemble.add_argument("--seeds", default="1,2,4,8", help="chain counts S, e.g. 1,2,4,8")
  ensemble.add_argument("--max_users", type=int, default=0,
                        help="a fixed random subset of test users (0 = all)")
  report = commands.add_parser("report", help="rebuild docs/results.md from the ledger")
  report.add_argument("--root", default="results")
  report.add_argument("--out", default="docs/results.md")
  report.add_argument("--readme", default="README.md",
                      help="also rebuild this file's results block (between <!-- results:begin "
                           "--> and <!-- results:end -->), where it has one; '' for none")
  return parser.parse_args(argv)


def recorded_command(argv, names: dict) -> str:
  """The command as the ledger records it, each path in `names` replaced by its name (a
  report never prints a path of the machine it ran on): {workdir: 'WORKDIR'}."""
  words = []
  for word in argv:
    flag, equals, value = word.partition("=")
    if word in names:
      word = names[word]
    elif equals and flag.startswith("--") and value in names:
      word = f"{flag}={names[value]}"
    words.append(word)
  return "python bin/ledger.py " + " ".join(shlex.quote(word) for word in words)


def main(argv=None):
  args = parse(argv)
  from diffurec_jax import errors
  from diffurec_jax.lab import ledger
  from diffurec_jax.lab import ledger_report
  try:
    if args.command_name == "add":
      target = ledger.add_run(args.workdir, args.root, args.name, command=args.command,
                              kind=args.kind, notes=args.notes, overwrite=args.overwrite)
      print(f"added {args.workdir} as {target}")
    elif args.command_name == "evaluate":
      from diffurec_jax import evaluate as evaluate_lib
      metrics, _, loaded = evaluate_lib.evaluate_workdir(args.workdir, args.split,
                                                         steps=args.steps, sampler=args.sampler,
                                                         lambda_zero=args.lambda0)
      command = recorded_command(argv or sys.argv[1:], {args.workdir: "WORKDIR"})
      ledger.write_evaluation(args.workdir, args.label, args.split, metrics, command=command,
                              settings={"steps": args.steps,
                                        "sampler": loaded.config.sample.sampler,
                                        **({"lambda": 0.0} if args.lambda0 else {})})
      print(f"{args.label}: {args.split} " + " ".join(
          f"{k} {metrics[k]:.4f}" for k in ("hit@10", "ndcg@10", "mrr@10")))
    elif args.command_name == "ensemble":
      from diffurec_jax.lab import ensemble
      chains = ensemble.parse_chains(args.seeds)
      names = {args.workdir: "WORKDIR"}
      if os.path.isabs(args.entry):  # A relative entry (results/...) is the same everywhere.
        names[args.entry] = "ENTRY"
      result = ensemble.record(args.workdir, args.entry, chains, max_users=args.max_users,
                               command=recorded_command(argv or sys.argv[1:], names))
      for row in result["rows"]:
        print(f"S={row['S']}: hit@10 {row['metrics']['hit@10']:.4f} ndcg@10 "
              f"{row['metrics']['ndcg@10']:.4f} {row['users_per_s']:.1f} users/s "
              f"(compile {row['compile_s']:.1f} s)")
      print(f"wrote the seed ensembles of {result['n_users']} users into {args.entry}")
    else:
      out = ledger_report.write(args.root, args.out, readme=args.readme or None)
      print(f"wrote {out}")
  except errors.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
