"""Datasets, by job:

- :mod:`~flower_rec.data.dataset`: the model (:class:`Dataset`, :class:`Sample`) and
  :class:`DatasetError`;
- :mod:`~flower_rec.data.layout`: the on-disk Flower/BIGRec layout (:func:`load_dataset`,
  :func:`save_dataset`);
- :mod:`~flower_rec.data.popularity`: popularity counts and the popularity groups;
- :mod:`~flower_rec.data.pipeline`: :func:`build_dataset`, the authors' preprocessing that every
  source below goes through;
- the sources: :mod:`~flower_rec.data.amazon` (Amazon Review Data 2018),
  :mod:`~flower_rec.data.movielens`, :mod:`~flower_rec.data.synthetic` (the embedded default
  dataset).
"""

from .amazon import prepare_amazon
from .dataset import SPLITS, Dataset, DatasetError, Sample
from .layout import CSV_COLUMNS, load_dataset, save_dataset
from .movielens import prepare_movielens
from .pipeline import Interaction, build_dataset
from .popularity import PopularityMode, group_item_ids, popularity_counts, popularity_groups
from .synthetic import prepare_synthetic

__all__ = [
    "CSV_COLUMNS",
    "SPLITS",
    "Dataset",
    "DatasetError",
    "Interaction",
    "PopularityMode",
    "Sample",
    "build_dataset",
    "group_item_ids",
    "load_dataset",
    "popularity_counts",
    "popularity_groups",
    "prepare_amazon",
    "prepare_movielens",
    "prepare_synthetic",
    "save_dataset",
]
