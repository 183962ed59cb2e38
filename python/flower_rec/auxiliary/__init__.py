"""The auxiliary recommender of the personalised rewards: SASRec, whose item scores for a
sample's history give p_u (docs/method.md section 3.2). By job:

- :mod:`~flower_rec.auxiliary.model`: :class:`SASRec` and its :class:`SASRecConfig`;
- :mod:`~flower_rec.auxiliary.io`: a trained model as a folder (:func:`save_sasrec`,
  :func:`load_sasrec`: safetensors weights and a JSON configuration);
- :mod:`~flower_rec.auxiliary.training`: :func:`train_sasrec`, with early stopping;
- :mod:`~flower_rec.auxiliary.evaluation`: :func:`evaluate_sasrec` and
  :func:`most_popular_baseline`, the catalog ranked by title;
- :mod:`~flower_rec.auxiliary.probabilities`: p_u itself (:func:`item_probabilities`) and the
  per-batch source that training and the demo take (:func:`training_probabilities`).

The package is not named ``aux``: Windows reserves that name, so a folder of that name could
not be installed or checked out there.
"""

from .evaluation import evaluate_sasrec, most_popular_baseline
from .io import load_sasrec, save_sasrec
from .model import SASRec, SASRecConfig, catalog_fingerprint, encode_histories
from .probabilities import history_mask, item_probabilities, training_probabilities
from .training import train_sasrec

__all__ = [
    "SASRec",
    "SASRecConfig",
    "catalog_fingerprint",
    "encode_histories",
    "evaluate_sasrec",
    "history_mask",
    "item_probabilities",
    "load_sasrec",
    "most_popular_baseline",
    "save_sasrec",
    "train_sasrec",
    "training_probabilities",
]
