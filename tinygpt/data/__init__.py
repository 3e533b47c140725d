"""Datasets for the four training stages: loaders of the real file formats, batching, bad-record policy.

Configs name a dataset by kind through :func:`tinygpt.data.registry.build_dataset`; every dataset yields samples
``{"images": FloatTensor[N, 3, S, S], "turns": [{"user", "assistant"}, ...], "dataset": name}`` and
:func:`tinygpt.data.collate.collate_samples` batches them. Import the submodules directly; this package file
imports nothing so that its submodules stay cheap to load.
"""
