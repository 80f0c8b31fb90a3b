"""A thin gRPC client for TF Serving's PredictionService (ours or `tensorflow/serving`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from serving.server import MAX_MESSAGE_BYTES


class RequestError(ValueError):
    """A request cannot be built from the given values (missing or ill-typed features)."""


@dataclass(frozen=True)
class RecommendedAd:
    rank: int
    ad_id: str
    score: float
    scores: dict[str, float]


class RecommendationClient:
    """`recommend(user, context, k)` against a recommender model served over gRPC."""

    def __init__(self, address: str, model_name: str = "recommender",
                 signature_name: str = "serving_default", timeout: float = 10.0):
        self.address = address
        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._inputs: dict[str, dict[str, tf.DType]] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def signature_inputs(self, model_name: str | None = None) -> dict[str, tf.DType]:
        """Input names and dtypes of the model's signature, from GetModelMetadata (cached)."""
        model_name = model_name or self.model_name
        if model_name not in self._inputs:
            request = get_model_metadata_pb2.GetModelMetadataRequest()
            request.model_spec.name = model_name
            request.metadata_field.append("signature_def")
            response = self._stub.GetModelMetadata(request, timeout=self.timeout)
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(sig_map)
            if self.signature_name not in sig_map.signature_def:
                raise RequestError(f"model {model_name!r} has no signature {self.signature_name!r}; "
                                   f"it has {sorted(sig_map.signature_def)}")
            sig = sig_map.signature_def[self.signature_name]
            self._inputs[model_name] = {k: tf.dtypes.as_dtype(v.dtype) for k, v in sig.inputs.items()}
        return self._inputs[model_name]

    def predict(self, inputs: Mapping[str, object], model_name: str | None = None) -> dict[str, np.ndarray]:
        """Call Predict with batched inputs (lists/arrays, one entry per example).

        Values are converted to the dtypes the signature declares (Python ints to int64).
        """
        model_name = model_name or self.model_name
        specs = self.signature_inputs(model_name)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = self.signature_name
        for name, values in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(values, dtype=specs.get(name)))
        response = self._stub.Predict(request, timeout=self.timeout)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    def _request_batch(self, rows: list[Mapping[str, object]], model_name: str | None) -> dict:
        specs = self.signature_inputs(model_name)
        batch = {}
        for name, dtype in specs.items():
            missing = [i for i, r in enumerate(rows) if name not in r or r[name] is None]
            if missing:
                raise RequestError(f"feature {name!r} is missing (rows {missing[:5]}); "
                                   f"the model needs {sorted(specs)}")
            values = [r[name] for r in rows]
            try:
                if dtype == tf.string:
                    batch[name] = np.array([str(v).encode("utf-8") for v in values], dtype=object)
                else:
                    batch[name] = np.array(values, dtype=dtype.as_numpy_dtype)
            except (TypeError, ValueError) as err:
                raise RequestError(f"feature {name!r} must be {dtype.name}: {err}") from err
        return batch

    def recommend_batch(self, requests: list[tuple[Mapping, Mapping]], k: int = 10) -> list[list[RecommendedAd]]:
        rows = [{**user, **context} for user, context in requests]
        if not rows:
            return []
        out = self.predict(self._request_batch(rows, None))
        if "ad_ids" not in out:
            raise RequestError(f"model {self.model_name!r} returns {sorted(out)}, not ad_ids")
        score_key = "pctr" if "pctr" in out else "scores"
        results = []
        for b in range(len(rows)):
            ads = []
            for r, ad in enumerate(out["ad_ids"][b][:k]):
                scores = {key: float(v[b][r]) for key, v in out.items()
                          if key != "ad_ids" and v.ndim == 2}
                ads.append(RecommendedAd(rank=r + 1, ad_id=ad.decode("utf-8"),
                                         score=scores[score_key], scores=scores))
            results.append(ads)
        return results

    def recommend(self, user: Mapping[str, object], context: Mapping[str, object] | None = None,
                  k: int = 10) -> list[RecommendedAd]:
        """Ranked ads for one user in one context (features as plain Python values)."""
        return self.recommend_batch([(user, context or {})], k)[0]

    def recommend_df(self, user: Mapping[str, object], context: Mapping[str, object] | None = None,
                     k: int = 10) -> pd.DataFrame:
        ads = self.recommend(user, context, k)
        return pd.DataFrame([{"rank": a.rank, "ad_id": a.ad_id, "score": a.score, **a.scores} for a in ads])
