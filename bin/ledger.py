"""The results ledger: add a finished run, re-evaluate one, rebuild docs/results.md.

  python bin/ledger.py add --workdir runs/toys --name diffurec --command "python bin/train.py ..."
  python bin/ledger.py evaluate --workdir runs/toys --steps 1 --label "1 reverse step"
  python bin/ledger.py report                      # results/ -> docs/results.md + figures

`add` copies config.json, metrics.jsonl, results.json and the machine's description into
results/<dataset>/<name>/seed<k>/ (small files only: never checkpoints or data).
"""

import argparse
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
  report = commands.add_parser("report", help="rebuild docs/results.md from the ledger")
  report.add_argument("--root", default="results")
  report.add_argument("--out", default="docs/results.md")
  return parser.parse_args(argv)


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
                                                         steps=args.steps, sampler=args.sampler)
      # The workdir is named WORKDIR: a report never prints a path of the machine it ran on.
      words = [("WORKDIR" if a == args.workdir else a) for a in (argv or sys.argv[1:])]
      command = "python bin/ledger.py " + " ".join(shlex.quote(a) for a in words)
      ledger.write_evaluation(args.workdir, args.label, args.split, metrics, command=command,
                              settings={"steps": args.steps,
                                        "sampler": loaded.config.sample.sampler})
      print(f"{args.label}: {args.split} " + " ".join(
          f"{k} {metrics[k]:.4f}" for k in ("hit@10", "ndcg@10", "mrr@10")))
    else:
      out = ledger_report.write(args.root, args.out)
      print(f"wrote {out}")
  except errors.UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
