"""Choosing where and how hard to steer: attribution patching per layer, layer selection
(``layers.json``), and ``--coefficient auto``."""

from nnsteer.selection.attribution import attribute
from nnsteer.selection.layers import select_layers

__all__ = ["attribute", "select_layers"]
