"""flower_ext: trie ops for flow-guided (GFlowNet) fine-tuning of LLM recommenders.

The catalog's item token sequences form a prefix tree (:class:`Trie`); its ops (log-space flow
aggregation, token bitmasks and logit masks, path walks, children and target transition
log-probabilities) are torch custom ops (:mod:`flower_ext.ops`) with CPU and CUDA kernels that
work under autograd, ``torch.compile`` and CUDA graphs. :mod:`flower_ext.losses` builds the
Flower losses on them and :mod:`flower_ext.generation` the constrained-decoding helpers.
"""

from . import ops
from ._C import has_cuda
from .trie import Trie

__all__ = ["Trie", "ops", "has_cuda"]
__version__ = "0.1.0"
