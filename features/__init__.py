"""Columns and tensors: schema, data specs and validation, synthetic ad world, vocabularies, text, tf.data."""

import os

# TFRS needs Keras 2 (tf_keras) behind tf.keras; keras-hub runs on Keras 3 with the TF backend.
# Both must be decided before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's C++ log lines off unless the user sets a level (trainer/quiet.py says why).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from features.loader import LoadedData, load_dataset  # noqa: E402
from features.schema import DEFAULT_SCHEMA, FeatureSchema  # noqa: E402
from features.spec import DataSpec, DataSpecError, load_spec  # noqa: E402
from features.split import DataSplit, time_split  # noqa: E402
from features.synthetic import SyntheticConfig, SyntheticWorld, generate_world  # noqa: E402
from features.validate import DataValidationError, ValidationReport  # noqa: E402
from features.vocab import Vocabularies, build_vocabularies  # noqa: E402

__all__ = [
    "FeatureSchema",
    "DEFAULT_SCHEMA",
    "SyntheticConfig",
    "SyntheticWorld",
    "generate_world",
    "DataSplit",
    "time_split",
    "Vocabularies",
    "build_vocabularies",
    "DataSpec",
    "DataSpecError",
    "load_spec",
    "load_dataset",
    "LoadedData",
    "DataValidationError",
    "ValidationReport",
]
