"""What a finished training job hands to export, evaluation and the demo."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from features.schema import FeatureSchema
from features.split import DataSplit
from features.vocab import Vocabularies
from trainer.builders import TextAssets
from trainer.config import JobConfig
from trainer.ranking import RankingModel
from trainer.retrieval import RetrievalModel


@dataclass
class TrainedModels:
    """Everything export and serving-side evaluation need from a finished job."""

    config: JobConfig
    schema: FeatureSchema
    catalog: pd.DataFrame
    split: DataSplit
    vocabularies: Vocabularies
    text: TextAssets
    catalog_text_embeddings: np.ndarray
    retrieval: RetrievalModel
    ranking: RankingModel
    metrics: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)  # name -> fitted retrieval baseline (trainer.baselines.Scorer)
    excluded: list = field(default_factory=list)  # per test row: the ad ids evaluation excluded
    history: dict = field(default_factory=dict)
