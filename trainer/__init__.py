"""Models, losses, strategies, training and export."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Quiet by default: TensorFlow's C++ log lines off (trainer/quiet.py); `TF_CPP_MIN_LOG_LEVEL=0` shows them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
