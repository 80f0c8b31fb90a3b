"""A thin gRPC client for TF Serving's PredictionService (ours or `tensorflow/serving`).

Needs grpcio, protobuf and numpy only (`pip install 'adrec[client]'`): no TensorFlow, no pandas
(DataFrames and Series are accepted when the caller has pandas).

Every call has a deadline (`timeout`, covering its retries); UNAVAILABLE (server starting,
restarting, unreachable) is retried with exponential backoff and jitter, at most
`max_attempts` times; every other error is raised at once. TLS with `root_certificates`.
"""

from __future__ import annotations

import math
import random
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from serving import wire
from serving.contract import (
    AD_ID_LISTS,
    CLIENT_MAX_BATCH_SIZE,
    EXCLUDED_AD_IDS,
    HISTORY,
    MAX_MESSAGE_BYTES,
    NEGATIVE_HISTORY,
    PAD_AD_ID,
    PREDICTION_SERVICE,
    RECOMMENDER,
    SIGNATURE_KEY,
    USER_STATS,
)

RECONNECT_BACKOFF_MAX_MS = 1000


class RequestError(ValueError):
    """A request cannot be built from the given values (missing or ill-typed features)."""


@dataclass(frozen=True)
class RecommendedAd:
    rank: int
    ad_id: str
    score: float
    scores: dict[str, float]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff on UNAVAILABLE: initial * multiplier**n, capped, with full jitter."""

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.initial_backoff * self.multiplier ** attempt))


def _read_pem(value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class RecommendationClient:
    """`recommend(user, context, k, exclude=[...])` against a recommender model served over gRPC.

    The recommender orders by its exported objective and returns `score` (that objective's value),
    `pctr`, `pcvr` and `retrieval_scores` per ad; `exclude` lists ad ids it must not return
    (already shown, frequency-capped), sent as the `excluded_ad_ids` input. Padded slots (fewer
    than k ads left after exclusions, ad id "") are dropped, so a result can be shorter than k.

    `root_certificates` (PEM path or bytes) switches to TLS; `server_name` overrides the name
    checked against the server certificate. `timeout` is each call's deadline, retries included.
    `recommend_batch` splits its rows into Predict calls of at most `max_batch_size` (keep it at
    or under the server's limit).
    """

    def __init__(self, address: str, model_name: str = RECOMMENDER,
                 signature_name: str = SIGNATURE_KEY, timeout: float = 10.0,
                 root_certificates: str | Path | bytes | None = None, server_name: str | None = None,
                 retry: RetryPolicy | None = None, max_batch_size: int = CLIENT_MAX_BATCH_SIZE):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.address = address
        self.max_batch_size = max_batch_size
        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # gRPC's own reconnect backoff grows to 120 s by default: after a server restart
                   # the channel would fail calls fast for seconds after the server is back.
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        pem = _read_pem(root_certificates)
        if pem is not None:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(pem), options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._rpc = wire.stubs(self._channel)
        self._inputs: dict[str, dict[str, str]] = {}
        self._shapes: dict[str, dict[str, list[int]]] = {}
        self._stats_lock = threading.Lock()
        self.calls = 0
        self.retries = 0

    def _call(self, method, request):
        """One RPC under the call's deadline, retrying the retryable codes with backoff."""
        deadline = time.monotonic() + self.timeout
        with self._stats_lock:
            self.calls += 1
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                return method(request, timeout=max(remaining, 0.001))
            except grpc.RpcError as err:
                attempt += 1
                if err.code() not in self.retry.retry_codes or attempt >= self.retry.max_attempts:
                    raise
                pause = self.retry.backoff(attempt - 1)
                if time.monotonic() + pause >= deadline:
                    raise
                with self._stats_lock:
                    self.retries += 1
                time.sleep(pause)

    def health(self, service: str = PREDICTION_SERVICE) -> str:
        """The server's grpc.health.v1 status for `service`: 'SERVING', 'NOT_SERVING', ..."""
        response = self._call(self._rpc["Check"], wire.HealthCheckRequest(service=service))
        return wire.enum_name(response, "status", response.status)

    def model_status(self, model_name: str | None = None) -> dict[int, str]:
        """ModelService.GetModelStatus: each version's state ('AVAILABLE', 'LOADING', ...), newest first."""
        request = wire.GetModelStatusRequest()
        request.model_spec.name = model_name or self.model_name
        response = self._call(self._rpc["GetModelStatus"], request)
        return {s.version: wire.enum_name(s, "state", s.state) for s in response.model_version_status}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def signature_inputs(self, model_name: str | None = None) -> dict[str, str]:
        """Input names and dtypes (TF dtype names: 'string', 'int64', ...) of the model's signature,
        from GetModelMetadata (cached)."""
        model_name = model_name or self.model_name
        if model_name not in self._inputs:
            request = wire.GetModelMetadataRequest()
            request.model_spec.name = model_name
            request.metadata_field.append("signature_def")
            response = self._call(self._rpc["GetModelMetadata"], request)
            packed = response.metadata["signature_def"]
            if not packed.type_url.endswith("/" + wire.SignatureDefMap.DESCRIPTOR.full_name):
                raise RequestError(f"model {model_name!r}: metadata holds {packed.type_url!r}, not a SignatureDefMap")
            sig_map = wire.SignatureDefMap.FromString(packed.value)
            if self.signature_name not in sig_map.signature_def:
                raise RequestError(f"model {model_name!r} has no signature {self.signature_name!r}; "
                                   f"it has {sorted(sig_map.signature_def)}")
            sig = sig_map.signature_def[self.signature_name]
            self._inputs[model_name] = {k: wire.dtype_name(v.dtype) for k, v in sig.inputs.items()}
            self._shapes[model_name] = {k: [d.size for d in v.tensor_shape.dim] for k, v in sig.inputs.items()}
        return self._inputs[model_name]

    def predict(self, inputs: Mapping[str, object], model_name: str | None = None) -> dict[str, np.ndarray]:
        """Call Predict with batched inputs (lists/arrays, one entry per example).

        Values are converted to the dtypes the signature declares (Python ints to int64). For a
        recommender, `excluded_ad_ids` may be a list of per-example id lists (padded here) or left
        out (nothing excluded).
        """
        return self.predict_versioned(inputs, model_name)[0]

    def predict_versioned(self, inputs: Mapping[str, object],
                          model_name: str | None = None) -> tuple[dict[str, np.ndarray], int]:
        """`predict`, plus the model version that answered."""
        model_name = model_name or self.model_name
        specs = self.signature_inputs(model_name)
        request = wire.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = self.signature_name
        inputs = dict(inputs)
        if EXCLUDED_AD_IDS in specs and inputs:
            given = inputs.get(EXCLUDED_AD_IDS)
            if given is None:
                batch = len(next(iter(inputs.values())))
                inputs[EXCLUDED_AD_IDS] = _padded_ad_ids([[]] * batch)
            elif not isinstance(given, np.ndarray):
                inputs[EXCLUDED_AD_IDS] = _padded_ad_ids([_ad_id_list(e, EXCLUDED_AD_IDS) for e in given])
        for name, values in inputs.items():
            try:
                request.inputs[name].CopyFrom(wire.make_tensor_proto(values, specs.get(name)))
            except (TypeError, ValueError) as err:
                raise RequestError(f"input {name!r}: {err}") from err
        response = self._call(self._rpc["Predict"], request)
        return {k: wire.make_ndarray(v) for k, v in response.outputs.items()}, response.model_spec.version.value

    def _request_batch(self, rows: list[Mapping[str, object]], model_name: str | None) -> dict:
        specs = self.signature_inputs(model_name)
        shapes = self._shapes.get(model_name or self.model_name, {})
        batch = {}
        if HISTORY not in specs and any(_ad_id_list(r.get(HISTORY), HISTORY) for r in rows):
            raise RequestError(f"model {model_name or self.model_name!r} takes no {HISTORY!r} "
                               "(it was exported with retrieval.history_length 0)")
        for name, dtype in specs.items():
            if name == EXCLUDED_AD_IDS:
                batch[name] = _padded_ad_ids([_ad_id_list(r.get(name), name) for r in rows])
                continue
            if name in (HISTORY, NEGATIVE_HISTORY):
                batch[name] = _padded_ad_ids([_ad_id_list(r.get(name), name) for r in rows],
                                             shapes.get(name, [-1, -1])[-1])
                continue
            missing = [i for i, r in enumerate(rows) if name not in r or _is_missing(r[name])]
            if name in USER_STATS:  # unknown counters: a user with no earlier events, like an empty history
                batch[name] = np.array([0 if i in set(missing) else int(r[name]) for i, r in enumerate(rows)],
                                       dtype=np.int64)
                continue
            if missing:
                needed = sorted(set(specs) - {*AD_ID_LISTS, *USER_STATS})
                raise RequestError(f"feature {name!r} is missing (rows {missing[:5]}); "
                                   f"the model needs {needed}")
            values = [r[name] for r in rows]
            try:
                if dtype == "string":
                    batch[name] = np.array([str(v).encode("utf-8") for v in values], dtype=object)
                else:
                    batch[name] = np.array(values, dtype=wire.numpy_dtype(dtype))
            except (TypeError, ValueError) as err:
                raise RequestError(f"feature {name!r} must be {dtype}: {err}") from err
        return batch

    def recommend_batch(self, requests, k: int = 10,
                        exclude: Sequence[Sequence[str]] | None = None) -> list[list[RecommendedAd]]:
        """Ranked ads for many users: (user, context) or (user, context, history) tuples, or a
        DataFrame with one row per request (columns = feature names, optionally `history` and
        `excluded_ad_ids`), sent in Predict calls of at most `max_batch_size` rows. A history is a
        list of the user's recently clicked ad ids, most recent first; missing means empty.
        `exclude`: one list of ad ids per request that must not come back (shown, capped)."""
        if hasattr(requests, "columns") and hasattr(requests, "to_dict"):  # a pandas DataFrame
            rows = requests.to_dict("records")
        else:
            rows = [{**_as_dict(r[0]), **_as_dict(r[1]), **({HISTORY: r[2]} if len(r) > 2 else {})}
                    for r in requests]
        if exclude is not None:
            if len(exclude) != len(rows):
                raise RequestError(f"exclude has {len(exclude)} lists for {len(rows)} requests")
            rows = [{**r, EXCLUDED_AD_IDS: list(e or [])} for r, e in zip(rows, exclude, strict=True)]
        batches = [self._request_batch(rows[i:i + self.max_batch_size], None)  # validate all before sending
                   for i in range(0, len(rows), self.max_batch_size)]
        results = []
        for batch in batches:
            results.extend(self._ranked(self.predict(batch), k))
        return results

    def _ranked(self, out: dict[str, np.ndarray], k: int) -> list[list[RecommendedAd]]:
        if "ad_ids" not in out:
            raise RequestError(f"model {self.model_name!r} returns {sorted(out)}, not ad_ids")
        score_key = next(key for key in ("score", "pctr", "scores") if key in out)
        results = []
        for b in range(len(out["ad_ids"])):
            ads = []
            for r, ad in enumerate(out["ad_ids"][b][:k]):
                if ad == PAD_AD_ID.encode():  # the recommender's padding: fewer than k ads remained after exclusions
                    continue
                scores = {key: float(v[b][r]) for key, v in out.items()
                          if key != "ad_ids" and v.ndim == 2}
                ads.append(RecommendedAd(rank=len(ads) + 1, ad_id=ad.decode("utf-8"),
                                         score=scores[score_key], scores=scores))
            results.append(ads)
        return results

    def recommend(self, user: Mapping[str, object], context: Mapping[str, object] | None = None,
                  k: int = 10, history: Sequence[str] | None = None,
                  exclude: Sequence[str] = ()) -> list[RecommendedAd]:
        """Ranked ads for one user in one context (dicts of plain Python/numpy values or pandas Series),
        never one of the ad ids in `exclude`.

        `history`: the ad ids the user recently clicked, most recent first (default none); padded
        with "" (or cut) to the length the model was exported with. A model trained with
        `ranking.user_stats` also reads the user's counters before the request from `user`
        (`user_events`, `user_clicks`, `user_recent_clicks`; missing ones are 0: a user with no
        earlier events), one with `ranking.negative_history` the `negative_history` list of the
        ad ids the user saw lately and did not click (from `user`, most recent first; missing: none).
        """
        request = (user, {} if context is None else context, [] if history is None else history)
        return self.recommend_batch([request], k, [list(exclude)])[0]

    def recommend_df(self, user: Mapping[str, object], context: Mapping[str, object] | None = None,
                     k: int = 10, history: Sequence[str] | None = None, exclude: Sequence[str] = ()):
        """`recommend` as a pandas DataFrame (rank, ad_id, score and every output score); needs pandas."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("recommend_df needs pandas (pip install pandas); recommend() does not") from err
        ads = self.recommend(user, context, k, history=history, exclude=exclude)
        return pd.DataFrame([{"rank": a.rank, "ad_id": a.ad_id, "score": a.score, **dict(sorted(a.scores.items()))}
                             for a in ads])


def _ad_id_list(value, name: str) -> list[str]:
    """One request's list of ad ids (`history`, `excluded_ad_ids`): None/NaN means none, "" entries
    are padding; a bare string is refused (it would otherwise be read as a list of characters)."""
    if value is None or isinstance(value, float) and np.isnan(value):
        return []
    if isinstance(value, str | bytes):
        raise RequestError(f"{name!r} must be a list of ad ids, got a single string {value!r}")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value
            if v is not None and v not in (PAD_AD_ID, PAD_AD_ID.encode())]


def _padded_ad_ids(lists: list[list[str]], width: int | None = None) -> np.ndarray:
    """[batch, width] utf-8 ad ids padded with PAD_AD_ID and cut to `width` (the first entries kept);
    without a width, the longest list's (at least 1)."""
    if width is None or width < 0:
        width = max([1, *(len(v) for v in lists)])
    out = np.full((len(lists), width), PAD_AD_ID.encode(), dtype=object)
    for i, values in enumerate(lists):
        values = values[:width]
        out[i, :len(values)] = [v.encode("utf-8") for v in values]
    return out


def _as_dict(values) -> dict:
    if hasattr(values, "to_dict") and not isinstance(values, Mapping):  # a pandas Series
        return values.to_dict()
    return dict(values or {})


def _is_missing(value) -> bool:
    if value is None:
        return True
    pd = sys.modules.get("pandas")  # values from a DataFrame may be pd.NA / NaT: pandas knows them
    if pd is not None:
        try:
            return bool(pd.isna(value))
        except (TypeError, ValueError):  # arrays and other non-scalars
            return False
    return isinstance(value, float | np.floating) and math.isnan(value)
