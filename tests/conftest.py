"""Session fixtures: where the real data lives, and a prepared-data cache in a tmp dir."""

import os
import pathlib

import pytest

# One persistent XLA compilation cache for the whole session (subprocesses inherit it): runs
# that differ only in seed or data compile the same programs, and 2 CPU cores compile slowly.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffurec_jax_cc_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
  """$DIFFUREC_DATA, else the `shared/data` folder beside the clone; skips when absent."""
  default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
  root = pathlib.Path(os.environ.get("DIFFUREC_DATA") or default).resolve()
  if not root.is_dir():
    pytest.skip(f"No benchmark data at {root}; set DIFFUREC_DATA.")
  return root


@pytest.fixture(scope="session", autouse=True)
def prepared_data_cache(tmp_path_factory) -> pathlib.Path:
  """DIFFUREC_CACHE in a tmp dir: no test writes beside the raw files or in ~/.cache."""
  path = tmp_path_factory.mktemp("prepared")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("DIFFUREC_CACHE", str(path))
    yield path

