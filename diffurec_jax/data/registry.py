"""Registered datasets: where their raw files live, and how to fetch them.

A data root holds the raw files in the layout of `shared/data` (see its README):

  beauty/s3rec/Beauty.txt                      (or beauty/derived/beauty_5core_timestamped.csv.gz)
  toys/s3rec/Toys_and_Games.txt                (or toys/derived/toys_5core_timestamped.csv.gz)
  ml-1m/ratings.dat                            (or ml-1m/derived/ml-1m_chronological.csv.gz)

The root is `config.data.root`, else $DIFFUREC_DATA, else the user cache dir
(`$XDG_CACHE_HOME/diffurec_jax/data`, default `~/.cache/diffurec_jax/data`).
The `synthetic` dataset has no download: its long-format CSV (`synthetic/<name encoding the
parameters>.csv.gz`, see data/synthetic.py) is generated into the user cache dir when neither
the root nor that dir has it.
A missing primary file is downloaded with pooch from its official source into the
user cache dir (never into the configured root, which may be read-only): with a
progress bar, retried, checked against its known hash, and renamed into place
atomically; offline, the error says which file to put where.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
import zipfile
from typing import Any, Callable

from diffurec_jax.data import synthetic
from diffurec_jax.data.errors import DataError

_S3REC = "https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/master/data/"
# Attempts after a failed download or checksum; pooch waits 1 s, 2 s, ... between them.
DOWNLOAD_RETRIES = 2


@dataclasses.dataclass(frozen=True)
class Source:
  """One raw file of a registered dataset and how to read it."""
  relpath: str  # Path under the data root.
  format: str  # Reader format (see readers.FORMATS).
  user_col: str = ""  # Long format only: column names.
  item_col: str = ""
  time_col: str = ""
  url: str = ""  # Official source ('' = not downloadable).
  checksum: str = ""  # 'sha256:<hex>' or 'md5:<hex>' of the downloaded file.
  member: str = ""  # For archives: the member to extract as relpath.


# The derived long files are read in their `seq_pos` order: the primary file's order (by time,
# S3-Rec's tie-break), so a fallback prepares the same dataset as the primary file; their
# `timestamp` column has ties (whole days), which the pipeline would order by item id instead.
REGISTRY: dict[str, tuple[Source, ...]] = {
    "beauty": (
        Source("beauty/s3rec/Beauty.txt", "sequences", url=_S3REC + "Beauty.txt",
               checksum="sha256:226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"),
        Source("beauty/derived/beauty_5core_timestamped.csv.gz", "long", "user_id", "item_id",
               "seq_pos"),
    ),
    "toys": (
        Source("toys/s3rec/Toys_and_Games.txt", "sequences", url=_S3REC + "Toys_and_Games.txt",
               checksum="sha256:176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f"),
        Source("toys/derived/toys_5core_timestamped.csv.gz", "long", "user_id", "item_id",
               "seq_pos"),
    ),
    "ml-1m": (
        Source("ml-1m/ratings.dat", "movielens",
               url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
               checksum="md5:c4d9eecfca2ab87c1945afe126590906", member="ml-1m/ratings.dat"),
        Source("ml-1m/derived/ml-1m_chronological.csv.gz", "long", "user_id", "item_id",
               "seq_pos"),
    ),
}

Downloader = Callable[[str, pathlib.Path, str, str], None]  # (url, dest, checksum, member).
PoochDownloader = Callable[[str, str, Any], None]  # (url, output_file, pooch), as pooch calls it.


@dataclasses.dataclass(frozen=True)
class ReadSpec:
  """A resolved raw file and the reader arguments for it."""
  path: pathlib.Path
  format: str
  user_col: str
  item_col: str
  time_col: str
  rating_col: str
  separator: str


def user_cache_dir() -> pathlib.Path:
  """`$XDG_CACHE_HOME/diffurec_jax`, default `~/.cache/diffurec_jax`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "diffurec_jax"


def data_root(data_config) -> pathlib.Path:
  """config.data.root, else $DIFFUREC_DATA, else the user cache data dir."""
  root = data_config.root or os.environ.get("DIFFUREC_DATA", "")
  return pathlib.Path(root).expanduser() if root else user_cache_dir() / "data"


def _fetch(url: str, dest: pathlib.Path, checksum: str,
           pooch_downloader: PoochDownloader | None) -> None:
  """Downloads url to dest with pooch: retried, hash-checked, moved into place.

  pooch streams into a temporary file next to dest and renames it only when its
  hash matches (else it deletes it and raises ValueError); network errors are
  requests' (OSError). With pooch_downloader None, pooch picks one by protocol.
  """
  import pooch  # Only needed when downloading.
  store = pooch.create(path=dest.parent, base_url="", registry={dest.name: checksum or None},
                       urls={dest.name: url}, retry_if_failed=DOWNLOAD_RETRIES)
  store.fetch(dest.name, downloader=pooch_downloader, progressbar=True)


def download(url: str, dest: pathlib.Path, checksum: str, member: str = "",
             pooch_downloader: PoochDownloader | None = None) -> None:
  """Downloads url (with a progress bar), checks it, and renames it to dest.

  For archives, `member` is extracted as dest and the archive is deleted.
  `pooch_downloader` replaces the one pooch picks for the URL's protocol (tests
  pass a local one). Raises OSError (network, via requests) or ValueError (hash).
  """
  dest.parent.mkdir(parents=True, exist_ok=True)
  if not member:
    _fetch(url, dest, checksum, pooch_downloader)
    return
  with tempfile.TemporaryDirectory(prefix=dest.name + ".", suffix=".part",
                                   dir=dest.parent) as scratch:
    archive = pathlib.Path(scratch) / url.rsplit("/", 1)[-1]
    _fetch(url, archive, checksum, pooch_downloader)
    extracted = pathlib.Path(scratch) / dest.name
    with zipfile.ZipFile(archive) as zipped, zipped.open(member) as source, \
        open(extracted, "wb") as out:
      shutil.copyfileobj(source, out)
    os.replace(extracted, dest)


def _from_config(data_config) -> ReadSpec:
  return ReadSpec(pathlib.Path(data_config.path).expanduser(), data_config.format,
                  data_config.user_col, data_config.item_col, data_config.time_col,
                  data_config.rating_col, data_config.separator)


def _from_source(path: pathlib.Path, source: Source) -> ReadSpec:
  return ReadSpec(path, source.format, source.user_col, source.item_col, source.time_col, "", "")


def _synthetic(data_config) -> ReadSpec:
  """The synthetic log's CSV: from the data root or the user cache dir, else generated there."""
  download_root = user_cache_dir() / "data"
  path = synthetic.ensure_file(synthetic.spec_from_config(data_config),
                               [data_root(data_config), download_root], download_root)
  return ReadSpec(path, "long", "user", "item", "timestamp", "", ",")


def resolve(data_config, downloader: Downloader | None = download) -> ReadSpec:
  """Finds (or downloads) the raw file that config.data names.

  `data.path` wins for any name; otherwise the registered dataset's files are
  looked up in the data root, then in the user cache dir where downloads go.
  Raises DataError saying which file to put where when none can be had.
  """
  if data_config.path:
    return _from_config(data_config)
  name = data_config.name
  if name == synthetic.NAME:
    return _synthetic(data_config)
  if name not in REGISTRY:
    if name == "custom":
      raise DataError("Custom data needs a file: set --config.data.path=FILE "
                      "(and --config.data.format or column names if needed).")
    raise DataError(f"Unknown dataset --config.data.name={name!r}; use one of "
                    f"{sorted(REGISTRY) + [synthetic.NAME]} or 'custom' with "
                    "--config.data.path=FILE.")
  root = data_root(data_config)
  download_root = user_cache_dir() / "data"
  primary = REGISTRY[name][0]
  looked = [root / source.relpath for source in REGISTRY[name]]
  if download_root.resolve() != root.resolve():
    looked.append(download_root / primary.relpath)
  sources = list(REGISTRY[name]) + [primary]
  for path, source in zip(looked, sources):
    if path.is_file():
      return _from_source(path, source)
  target = root / primary.relpath
  where = f"put {pathlib.PurePath(primary.relpath).name} (from {primary.url}) at {target}"
  if primary.member:
    where = (f"extract {primary.member} from {primary.url} to {target}")
  looked_text = ", ".join(str(path) for path in looked)
  if not (data_config.download and downloader):
    raise DataError(
        f"No raw file for dataset '{name}' (looked for {looked_text}) and downloads are off; "
        f"{where}, or set --config.data.root or $DIFFUREC_DATA to a data root that has it.")
  dest = download_root / primary.relpath
  try:
    downloader(primary.url, dest, primary.checksum, primary.member)
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise DataError(
        f"No raw file for dataset '{name}' (looked for {looked_text}) and downloading "
        f"{primary.url} failed ({e}); {where}, or set --config.data.root or $DIFFUREC_DATA "
        "to a data root that has it.") from e
  if not dest.is_file():
    raise DataError(f"Downloading {primary.url} did not produce {dest}; {where}.")
  return _from_source(dest, primary)
