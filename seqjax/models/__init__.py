"""Language models over layer patterns (``lm``), their blocks (``blocks``), stateful generation
(``generate``) and training recipes (``recipes``). The layers themselves (attention, recurrent mixers, the
Titans blocks) are registered mixers (``seqjax.mixers``). Beside them: pointer networks (``pointer``),
Read-Process-Write for sets (``order_matters``), recurrent relational networks (``rrn``), learnable
commutative monoids over sets (``lcm``), encoder-decoders of attention or mixers (``encdec``) and RNN
hypernetworks for continual learning (``hypernet``)."""

from seqjax.models.lm import LM, LMConfig

__all__ = ["LM", "LMConfig"]
