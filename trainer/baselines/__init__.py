"""Retrieval baselines, trained and evaluated on exactly the rows, histories and exclusions the model gets."""

from trainer.baselines.base import Scorer, rank_queries
from trainer.baselines.ease import EASE, EASETooLarge
from trainer.baselines.id_only import IdOnlyRetrieval, IdOnlyScorer, train_id_only
from trainer.baselines.itemknn import ItemKNN
from trainer.baselines.popularity import MostPopular
from trainer.baselines.sasrec import SASRec
from trainer.baselines.tuning import select_and_fit

__all__ = ["EASE", "EASETooLarge", "IdOnlyRetrieval", "IdOnlyScorer", "ItemKNN", "MostPopular", "SASRec", "Scorer",
           "rank_queries", "select_and_fit", "train_id_only"]
