"""Training data files to examples: the readers behind `peer.data.load_examples`.

Each row becomes an example through `peer.examples.example_of`.

JSON lines and .txt files are parsed here, so that errors name the line. CSV, Parquet and Arrow
files, folders written by `Dataset.save_to_disk` and hub datasets are read through the
`datasets` library, imported on first use (it takes a second), and errors name the data row.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from peer.config import DataConfig
from peer.errors import DataError
from peer.examples import RESPONSE, Chat, Example, example_of, format_example

__all__ = ["Chat", "Example", "RESPONSE", "example_of", "format_example", "load_examples"]

logger = logging.getLogger(__name__)

_DEFAULT_FIELDS = DataConfig()
_SUFFIXES = ".jsonl, .json, .txt, .csv, .parquet or .arrow"
# owner/name, as the hub spells dataset names; anything else that does not exist is a typo.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_examples(path: Path | str, fields: DataConfig = _DEFAULT_FIELDS) -> list[Example]:
    """Read training examples from a file, a folder of files, or a hub dataset.

    Files: JSON lines (.jsonl/.json, blank lines skipped), .txt (one example per paragraph),
    .csv (a header row; every cell is read as text), .parquet and .arrow. A folder gives the
    examples of all its files of these kinds in sorted file-name order (hidden files and
    subfolders are ignored); a folder written by `Dataset.save_to_disk` is read as that
    dataset (its "train" split). A name like `owner/name` that is no local path is loaded
    from the hub when online. Rows are mapped by `fields` (see `example_of`).

    Raises:
        DataError: one line naming the file and line (or data row): a missing, unreadable or
            empty file, an empty folder, bad JSON, a row without usable fields, or a hub name
            while offline.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, fields)
    if path.exists():
        return _load_file(path, fields)
    if _HUB_NAME.fullmatch(str(path)) and path.suffix.lower() not in _READERS:
        return _load_hub(str(path), fields)
    raise DataError(f"{path}: no such file or folder; pass a {_SUFFIXES} file or a folder")


def _load_folder(path: Path, fields: DataConfig) -> list[Example]:
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _load_saved(path, fields)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in _READERS)
    if not files:
        raise DataError(f"{path}: folder holds no {_SUFFIXES} files")
    return [example for file in files for example in _load_file(file, fields)]


def _load_file(path: Path, fields: DataConfig) -> list[Example]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                        f"use {_SUFFIXES}")
    examples = reader(path, fields)
    if not examples:
        raise DataError(f"{path}: empty file, it holds no training examples")
    logger.debug("%s: %d examples", path, len(examples))
    return examples




# ---------------------------------------------------------------------------------------------
# text formats, parsed here


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                        "re-save the file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _read_jsonl(path: Path, fields: DataConfig) -> list[Example]:
    examples = []
    # Split on "\n" only: str.splitlines would also break inside strings holding U+2028 etc.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: bad JSON ({exc.msg} at column {exc.colno}); each line "
                            "must be one JSON object") from None
        examples.append(example_of(where, row, fields))
    return examples


def _read_paragraphs(path: Path, fields: DataConfig) -> list[Example]:
    paragraphs: list[list[str]] = [[]]
    for line in _read_text(path).split("\n"):
        if line.strip():
            paragraphs[-1].append(line.rstrip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return ["\n".join(lines).strip() for lines in paragraphs if lines]


# ---------------------------------------------------------------------------------------------
# tables, read through `datasets`


def _read_csv(path: Path, fields: DataConfig) -> list[Example]:
    columns = _csv_columns(path)
    if columns is None:
        return []
    from datasets import Features, Value

    # Every cell as text: inferred types would turn an input of "007" into 7.0, and "NA" or
    # "null" into a missing value.
    features = Features({name: Value("string") for name in columns})
    return _rows_of(str(path), _load_local("csv", path, features=features,
                                           keep_default_na=False), fields)


def _csv_columns(path: Path) -> list[str] | None:
    """The header of a CSV file, or None when it has no data row."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            first = next((row for row in reader if any(cell.strip() for cell in row)), None)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8"
                        ) from exc
    except (OSError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from exc
    if header is None or first is None:
        return None
    if len(set(header)) < len(header):
        raise DataError(f"{path}: the header row repeats a column name ({', '.join(header)})")
    return header


def _read_parquet(path: Path, fields: DataConfig) -> list[Example]:
    import pyarrow.parquet as pq

    return _read_table("parquet", path, fields, lambda: pq.read_metadata(path).num_rows)


def _read_arrow(path: Path, fields: DataConfig) -> list[Example]:
    return _read_table("arrow", path, fields, lambda: _arrow_rows(path))


def _arrow_rows(path: Path) -> int:
    """Rows of an Arrow IPC file, in file or stream format (memory-mapped: nothing copied)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            return int(pa.ipc.open_file(source).read_all().num_rows)
        except pa.ArrowInvalid:
            source.seek(0)
            return int(pa.ipc.open_stream(source).read_all().num_rows)


def _read_table(kind: str, path: Path, fields: DataConfig, count: Callable[[], int]
                ) -> list[Example]:
    """Rows of a Parquet or Arrow file, counted first: `datasets` fails on an empty table
    with a message that does not say so."""
    import pyarrow as pa

    try:
        rows = count()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read as {kind.upper()} ({_reason(exc)})") from None
    return _rows_of(str(path), _load_local(kind, path), fields) if rows else []


def _rows_of(source: str, rows: Iterable[Any], fields: DataConfig) -> list[Example]:
    return [example_of(f"{source}: row {n}", row, fields) for n, row in enumerate(rows, start=1)]


def _load_local(kind: str, path: Path, **options: Any) -> Any:
    """One local file as a `datasets` table, held in memory, its cache in a temporary folder."""
    import datasets

    with _quiet(), tempfile.TemporaryDirectory(prefix="loraswarm-datasets-") as cache:
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train",
                                         cache_dir=cache, keep_in_memory=True, **options)
        except (datasets.exceptions.DatasetsError, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read as {kind.upper()} ({_reason(exc)})") from None


def _load_saved(path: Path, fields: DataConfig) -> list[Example]:
    import datasets

    with _quiet():
        try:
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        except (datasets.exceptions.DatasetsError, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read this saved dataset ({_reason(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: saved dataset has no 'train' split "
                            f"(splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    examples = _rows_of(str(path), loaded, fields)
    if not examples:
        raise DataError(f"{path}: empty dataset, it holds no training examples")
    return examples


def _load_hub(name: str, fields: DataConfig) -> list[Example]:
    """A hub dataset's train split; its download is cached where `datasets` keeps them."""
    if _offline():
        raise DataError(_unreachable(name, "offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE "
                                     "is set"))
    import datasets

    with _quiet():
        try:
            loaded = datasets.load_dataset(name, split="train", keep_in_memory=True)
        except (datasets.exceptions.DatasetsError, OSError, ValueError) as exc:
            raise DataError(_unreachable(name, _reason(exc))) from None
    examples = _rows_of(name, loaded, fields)
    if not examples:
        raise DataError(f"{name}: empty dataset, it holds no training examples")
    return examples


def _unreachable(name: str, why: str) -> str:
    return (f"{name}: not a local file or folder, and the hub could not be reached for it "
            f"({why}); pass a local {_SUFFIXES} file or a folder")


def _offline() -> bool:
    # Read at call time: `datasets` reads these once, when it is first imported.
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause: `datasets` wraps the parser's own error."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without progress bars and `datasets`' own error logs: our DataError says it once."""
    from datasets.utils import logging as datasets_logging

    bars = datasets_logging.is_progress_bar_enabled()
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.disable_progress_bar()
    datasets_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets_logging.enable_progress_bar()


_READERS: dict[str, Callable[[Path, DataConfig], list[Example]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_jsonl,
    ".txt": _read_paragraphs,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
}
