"""The dataset loaders, one module per kind of data.

Every loader takes ``(data_dir, seed)`` and returns the raw splits of a fixed train/test split
as a :class:`~ocnode.data.types.RawSplits`; :func:`ocnode.data.load_dataset` standardises and
wraps them.
"""
