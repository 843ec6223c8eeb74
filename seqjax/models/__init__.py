"""Language models over layer patterns (``lm``), their blocks (``blocks``), stateful generation
(``generate``) and training recipes (``recipes``). The layers themselves (attention, recurrent mixers, the
Titans blocks) are registered mixers (``seqjax.mixers``). Beside them: pointer networks (``pointer``),
Read-Process-Write for sets (``order_matters``), recurrent relational networks (``rrn``), learnable
commutative monoids over sets (``lcm``), encoder-decoders of attention or mixers (``encdec``), RNN
hypernetworks for continual learning (``hypernet``), PV-RNN (``pvrnn``), the timescale-study networks
(``timescale_rnn``), convolutional state spaces for video (``convssm``), LRCN (``lrcn``), MossFormer2 for speech
separation (``mossformer``) and BERT4Rec with its causal and recurrent baselines (``bert4rec``)."""

from seqjax.models.lm import LM, LMConfig

__all__ = ["LM", "LMConfig"]
