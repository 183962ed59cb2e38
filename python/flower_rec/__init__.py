"""flower_rec: fine-tune, decode and evaluate LLM recommenders with flower_ext.

Data in the Flower/BIGRec layout (:mod:`flower_rec.data`), items as token sequences and prompts
(:mod:`flower_rec.prompts`), trie-constrained decoding (:mod:`flower_rec.decoding`) and the
paper's accuracy, fairness and diversity metrics (:mod:`flower_rec.metrics`); the command line is
``flower-rec`` (:mod:`flower_rec.cli`).
"""

__version__ = "0.1.0"
