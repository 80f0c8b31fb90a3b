"""gRPC serving: a TF Serving-compatible embedded server and a thin recommendation client.

Never imports `trainer`: a serving host needs only this package and TensorFlow, and the client
(`serving.client`, with `serving.contract` and `serving.wire`) only grpcio, protobuf and numpy.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
