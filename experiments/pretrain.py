"""Pretrain a language model: ``python experiments/pretrain.py [--key=value ...]``.

With no arguments: a small hybrid Mamba-2/attention LM (preset ``tiny``) on the embedded corpus (this
interpreter's standard-library sources as bytes; prepared once into ``~/.cache/seqjax``), about five
minutes on a 2-core CPU. Progress bar, held-out bits per byte, checkpoints, TensorBoard logs
(``runs/pretrain/tb``), a loss curve (``runs/pretrain/loss.png``) and a generated sample at the end.
Run it again and it resumes from the last checkpoint (``--resume=false`` to start over).

Examples::

    python experiments/pretrain.py --steps=3 --preset=tiny          # smoke test
    python experiments/pretrain.py --preset=125m --data.data=tfds:lm1b    # on an accelerator
    python experiments/pretrain.py --mesh=1,2,1,4 --accum=4          # fsdp=2 x tensor=4, 4 microbatches
    python experiments/pretrain.py --model.pattern=gla,attention --model.mixer_kwargs=gla.chunk_size=128
    python experiments/pretrain.py --preset=1b --compile_topology=v5p:2x2x4 --mesh=1,16,1,1  # fits? (libtpu)

``--help`` lists every key: the run's (``--steps``, ``--mesh``, ``--nan_policy``, ...), the model's
(``--model.d_model=256``, ``--model.tie_embeddings=false``; the LM's ``LMConfig``), the data's
(``--data.global_batch=32``) and the optimizer's (``--optim.lr=1e-3``); see ``seqjax/cli.py`` for the value forms.
"""

import json
import sys

from seqjax.train import config, run


def main(argv):
    cfg = config.parse(argv)
    summary = run.train(cfg)
    sample = summary.get("sample")
    shown = summary if cfg.compile_topology else {k: v for k, v in summary.items() if k not in ("compile", "sample")}
    print(json.dumps(shown, indent=1, default=str))
    if sample is not None:
        print("\n--- sample ---\n" + sample + "\n--------------")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
