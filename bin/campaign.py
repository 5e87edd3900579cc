"""Issue 18's campaign: run the plan's next unfinished rows within a time budget, fill the ledger.

  python bin/campaign.py --status                    # every plan row: done, running, missing...
  python bin/campaign.py --budget_min 150            # run the next rows that fit in 150 minutes
  python bin/campaign.py --budget_min 150 --dry_run  # what it would run

The plan is results/plan.toml. Each row runs as `python bin/train.py --config ... --workdir
runs/<dataset>_<name>_seed<k>` (a half-done workdir resumes), is added to the ledger
(results/) when it finishes, and docs/results.md is rebuilt. When the budget runs out during a
run, the run gets SIGINT: it saves its partial epoch and the next campaign resumes it.
"""

import sys

from absl import flags

from diffurec_jax import cli

_STATUS = flags.DEFINE_bool("status", False, "Print the table of every plan row and exit.")
_BUDGET = flags.DEFINE_float("budget_min", None, "Minutes the campaign may use (runs included).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what would run, run nothing.")
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"],
                            "Run the plan's rows for this device (gpu: the released-size rows).")
_PLAN = flags.DEFINE_string("plan", "results/plan.toml", "The plan file.")
_ROOT = flags.DEFINE_string("root", "results", "The results ledger.")
_RUNS = flags.DEFINE_string("runs", "runs", "Where the workdirs runs/<dataset>_<name>_seed<k> are.")
_REPORT = flags.DEFINE_string("report", "docs/results.md",
                              "Report rebuilt after each run ('' = none).")


def main(argv):
  del argv  # No cli.setup(): the campaign computes nothing with JAX; its runs set up their own.
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # The ledger's machine description starts JAX.
  from diffurec_jax import errors
  from diffurec_jax.lab import campaign

  def run():
    if _STATUS.value:
      print(campaign.status_text(_PLAN.value, root=_ROOT.value, runs=_RUNS.value,
                                 device=_DEVICE.value))
      return 0
    if _BUDGET.value is None:
      raise errors.UsageError("Give --budget_min MINUTES to run the plan, or --status.")
    return campaign.run_campaign(_PLAN.value, root=_ROOT.value, runs=_RUNS.value,
                                 report=_REPORT.value, budget_min=_BUDGET.value,
                                 device=_DEVICE.value, dry_run=_DRY_RUN.value)

  sys.exit(cli.run_guarded(run))


if __name__ == "__main__":
  cli.run(main)
