"""The settings of several processes and the stop vote, in one process: --coordinator_address /
--num_processes / --process_id (or JAX_* and SLURM variables) resolved or refused in one
sentence, and the vote by which a signal reaching one process stops all at the same step.
Runs of 2 real processes are tests/test_multiprocess.py.
"""

import pytest

import helpers_train as helpers
from helpers_train import synthetic_data  # noqa: F401  (fixture)

from diffurec_jax import cli
from diffurec_jax.training import interrupt


_ADDRESS = "127.0.0.1:1234"


@pytest.mark.parametrize("flags, environ, expected", [
    ((None, None, None), {}, None),
    ((None, None, None), {"SLURM_NTASKS": "4"}, {}),
    ((_ADDRESS, 2, 1), {}, {"coordinator_address": _ADDRESS, "num_processes": 2,
                            "process_id": 1}),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": _ADDRESS, "JAX_NUM_PROCESSES": "2",
                          "JAX_PROCESS_ID": "0"},
     {"coordinator_address": _ADDRESS, "num_processes": 2, "process_id": 0}),
    ((None, None, 1), {"JAX_COORDINATOR_ADDRESS": _ADDRESS, "JAX_NUM_PROCESSES": "2",
                       "JAX_PROCESS_ID": "0"},  # A flag wins over its variable.
     {"coordinator_address": _ADDRESS, "num_processes": 2, "process_id": 1}),
    ((_ADDRESS, None, None), {}, {"coordinator_address": _ADDRESS}),  # JAX detects the rest.
])
def test_distributed_settings(flags, environ, expected):
  assert cli.distributed_settings(*flags, environ) == expected


@pytest.mark.parametrize("flags, environ, words", [
    ((_ADDRESS, 2, 2), {}, ["--process_id=2", "outside 0 .. 1"]),
    ((_ADDRESS, 2, -1), {}, ["--process_id=-1", "outside 0 .. 1"]),
    ((_ADDRESS, 0, 0), {}, ["--num_processes=0", "at least 1"]),
    ((None, 2, 0), {}, ["need --coordinator_address"]),
    ((_ADDRESS, 2, None), {}, ["--num_processes is set but --process_id is not"]),
    (("127.0.0.1", 2, 0), {}, ["not host:port"]),
    (("127.0.0.1:http", 2, 0), {}, ["not host:port"]),
    ((_ADDRESS, None, None), {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     ["JAX_NUM_PROCESSES='two' is not an integer"]),
])
def test_inconsistent_distributed_settings_are_one_sentence(flags, environ, words):
  with pytest.raises(cli.DistributedError) as raised:
    cli.distributed_settings(*flags, environ)
  message = str(raised.value)
  assert "\n" not in message
  for word in words:
    assert word in message, message


def test_train_refuses_inconsistent_flags_in_one_line(synthetic_data, tmp_path):
  result = helpers.run_bin(
      "train.py", *helpers.cli_flags(), "--workdir", str(tmp_path / "run"),
      f"--coordinator_address={_ADDRESS}", "--num_processes=2", "--process_id=2",
      data_root=synthetic_data)
  helpers.assert_user_error(result, "--process_id=2")
  assert not (tmp_path / "run").exists()


def test_train_help_lists_the_distributed_flags(synthetic_data):
  result = helpers.run_bin("train.py", "--help", data_root=synthetic_data)
  assert result.returncode == 0, result.stderr
  for name in cli.DISTRIBUTED_FLAGS:
    assert f"--{name}:" in result.stdout, name


@pytest.mark.parametrize("asked, at_steps", [
    ([False, False, False, False], [False, False, False, False]),
    ([False, True, False, False], [False, False, False, True]),
    ([True, False, False, False], [False, False, True, False]),  # The loop stops at the first.
])
def test_stop_vote_answers_lag_boundaries_later(asked, at_steps):
  """One process votes alone here; the answer comes StopVote.LAG boundaries after the ask."""
  assert interrupt.StopVote.LAG == 2  # The table is written for it.
  vote = interrupt.StopVote()
  assert [vote.at_step(flag) for flag in asked] == at_steps
  assert vote.now(False) == any(asked[-interrupt.StopVote.LAG:])  # The pending ones.
  assert vote.now(False) is False  # Settled.


def test_collective_interrupts_defer_the_first_signal_everywhere():
  interrupts = interrupt.Interrupts(collective=True)
  with interrupts:
    with interrupts.immediate():  # Validation: the others could not stop here.
      interrupts._handle(2, None)  # SIGINT
    assert interrupts.requested
    assert interrupts.stop_now() is True
    with pytest.raises(interrupt.Interrupted):  # A second signal still stops at once.
      interrupts._handle(2, None)
