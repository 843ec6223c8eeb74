"""Sequence mixers: one file per family, each registered by name (see ``registry``)."""

from seqjax.mixers.registry import MixerSpec, feature_matrix, get, load_all, names, register

__all__ = ["MixerSpec", "feature_matrix", "get", "load_all", "names", "register"]
