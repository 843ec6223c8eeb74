"""The core install (``pip install -e .``, no extras) imports the layers, mixers, RNNs and models without the
training stack. Run by ``.ci/run`` in a fresh environment."""

import importlib.metadata
import importlib.util

import seqjax
import seqjax.mixers
import seqjax.models
import seqjax.rnn

seqjax.mixers.load_all()

TRAIN_ONLY = ("tensorflow_datasets", "grain", "array_record", "tensorboardX", "tqdm", "matplotlib", "tyro")
present = [m for m in TRAIN_ONLY if importlib.util.find_spec(m) is not None]
assert not present, f"the core install brought {present}"
# orbax-checkpoint is installed all the same: flax itself requires it. seqjax's core does not.
core = [r for r in importlib.metadata.requires("seqjax") or [] if "extra ==" not in r]
assert not [r for r in core if r.startswith(("orbax", "grain", "tensorflow"))], core
print(f"core install: seqjax, seqjax.mixers (all), seqjax.rnn, seqjax.models import without {', '.join(TRAIN_ONLY)}")
