"""Learning curve of one run: `python bin/plot.py --workdir runs/toys [--output curve.png]`.

Writes W/figures/learning_curve.png (training loss and validation NDCG/HR@10 per epoch) from
W/metrics.jsonl; works on a run in progress. Needs matplotlib (pip install -e '.[report]').
"""

from absl import flags

from diffurec_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by bin/train.py.")
_OUTPUT = flags.DEFINE_string("output", None, "PNG path (default W/figures/learning_curve.png).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  from diffurec_jax.lab import learning_curve

  def run():
    print(learning_curve.plot(_WORKDIR.value, _OUTPUT.value))

  cli.run_guarded(run)


if __name__ == "__main__":
  cli.run(main)
