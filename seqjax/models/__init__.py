"""Language models over layer patterns (``lm``), their blocks (``blocks``), stateful generation
(``generate``) and training recipes (``recipes``). The layers themselves (attention, recurrent mixers, the
Titans blocks) are registered mixers (``seqjax.mixers``). Beside them: pointer networks (``pointer``) and
learnable commutative monoids over sets (``lcm``)."""

from seqjax.models.lm import LM, LMConfig

__all__ = ["LM", "LMConfig"]
