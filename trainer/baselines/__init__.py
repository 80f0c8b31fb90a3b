"""Retrieval baselines, trained and evaluated on exactly the rows, histories and exclusions the model gets."""

from trainer.baselines.id_only import IdOnlyRetrieval, train_id_only

__all__ = ["IdOnlyRetrieval", "train_id_only"]
