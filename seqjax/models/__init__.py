"""Language models over layer patterns (``lm``), their blocks (``blocks``), stateful generation
(``generate``), Titans (``titans``) and training recipes (``recipes``)."""

from seqjax.models.lm import LM, LMConfig

__all__ = ["LM", "LMConfig"]
