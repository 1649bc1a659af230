"""The errors of the dataset loaders: one base class and one subclass per way to fail."""

from __future__ import annotations


class DatasetError(Exception):
    """Base class of the dataset errors below."""


class DatasetFilesNotFoundError(DatasetError, FileNotFoundError):
    """Some files of a dataset read from disk are missing; the message says how to get them."""


class CorruptDatasetError(DatasetError, ValueError):
    """A dataset file is not what its name promises (bad magic number, truncated, ...)."""


class DatasetPackageMissingError(DatasetError, ImportError):
    """The package that ships (or reads) a dataset is not installed; the message says which."""
