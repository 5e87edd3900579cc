"""The README's results summary: the campaign's main rows and each dataset's verdict, rebuilt
from the ledger with docs/results.md (`python bin/ledger.py report`), between two markers of the
README, so the figures a new user reads first are never typed by hand."""

from __future__ import annotations

from diffurec_jax.lab import ledger as ledger_lib
from diffurec_jax.lab import ledger_report
from diffurec_jax.lab import user_tests as user_tests_lib
from diffurec_jax.lab import verdict as verdict_lib

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def summary(root: str) -> str:
  """Markdown: one table of the main rows (diffurec, v1, v2, sasrec) of every dataset, mean
  +- std over seeds, and each dataset's verdict paragraph."""
  entries = ledger_lib.load(root)
  groups = ledger_report.group_runs(entries)
  lines = ["| dataset | run | seeds | test HR@10 % | test NDCG@10 % | paper HR@10 / NDCG@10 |",
           "|---|---|---|---|---|---|"]
  verdicts = []
  for dataset in sorted({e.dataset for e in entries}):
    title = ledger_report.DATASET_TITLES.get(dataset, dataset)
    rows = [ledger_report.summary_row(dataset, name, groups[(dataset, name)])
            for name in verdict_lib.MAIN_ROWS if (dataset, name) in groups]
    for row in rows:
      paper = row["paper"]
      lines.append(
          f"| {title} | {row['name']} | {row['seeds']} | "
          f"{ledger_report.percent(*row['hit@10'], row['seeds'])} | "
          f"{ledger_report.percent(*row['ndcg@10'], row['seeds'])} | "
          + (f"{100 * paper['hit@10']:.2f} / {100 * paper['ndcg@10']:.2f} |" if paper else "- |"))
    tests = user_tests_lib.user_tests(root, dataset, entries)
    verdicts += verdict_lib.verdict(title, rows, tests)
  if len(lines) == 2:
    return "The ledger has no run of the main rows yet."
  return "\n".join(lines + [""] + verdicts).rstrip()


def has_block(text: str) -> bool:
  start, end = text.find(BEGIN), text.find(END)
  return 0 <= start < end


def replace_block(text: str, block: str) -> str:
  """`text` with what lies between BEGIN and END replaced by `block`; ValueError without the
  markers in that order."""
  if not has_block(text):
    raise ValueError(f"no {BEGIN} ... {END} block")
  start, end = text.find(BEGIN), text.find(END)  # In that order (has_block).
  return text[:start + len(BEGIN)] + "\n" + block + "\n" + text[end:]


def update(readme: str, root: str) -> bool:
  """Rewrites the README's block from the ledger; False (nothing written) without markers."""
  with open(readme) as f:
    text = f.read()
  if not has_block(text):
    return False
  new = replace_block(text, summary(root))
  if new != text:
    with open(readme, "w") as f:
      f.write(new)
  return True
