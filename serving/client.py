"""A thin gRPC client for TF Serving's PredictionService (ours or `tensorflow/serving`).

Needs grpcio, protobuf and numpy only (`pip install 'adrec[client]'`): no TensorFlow, no pandas
(DataFrames and Series are accepted when the caller has pandas).

Every call has a deadline (`timeout`, covering its retries); UNAVAILABLE (server starting,
restarting, unreachable) is retried with exponential backoff and jitter, at most
`max_attempts` times; every other error is raised at once. TLS with `root_certificates`.

Pseudonymised models (`privacy.pseudonymize`, docs/data.md#privacy): with the job's key the client
replaces the user id (and the other inputs the model takes as pseudonyms) by its keyed pseudonym
before sending (`serving.pseudonym`), so callers keep sending their own ids. The embedded server
says which inputs a model takes as pseudonyms and under which key id: a client without the key
sending ids that are not pseudonyms, a client with another key, or a client with a key to a model
trained on plain ids is refused before anything is sent. (`tensorflow/serving` does not say; a
client with a key then hashes `user_id` alone.)
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import struct_pb2

from serving import explanations, values, wire
from serving import rows as rows_of
from serving.contract import (
    CLIENT_MAX_BATCH_SIZE,
    EXCLUDED_AD_IDS,
    MAX_MESSAGE_BYTES,
    PAD_AD_ID,
    PREDICTION_SERVICE,
    RECOMMENDER,
    SIGNATURE_KEY,
)
from serving.pseudonym import (
    DEFAULT_KEY_ENV,
    PRIVACY_METADATA_FIELD,
    check_key,
    is_pseudonym,
    key_from_env,
    key_id,
    pseudonym,
)
from serving.values import RequestError

__all__ = ["RecommendationClient", "RecommendedAd", "RequestError", "RetryPolicy", "ads_frame"]

RECONNECT_BACKOFF_MAX_MS = 1000


@dataclass(frozen=True)
class RecommendedAd:
    """One returned ad. `because`: (history ad id, weight) pairs, the history ads whose removal lowers
    the ad's CTR logit most, best first; `contributions`: {feature group: how far it moves the logit
    from the training average's} (both empty from a model exported without explanations;
    serving/explanations.py)."""

    rank: int
    ad_id: str
    score: float
    scores: dict[str, float]
    because: tuple[tuple[str, float], ...] = ()
    contributions: dict[str, float] = field(default_factory=dict)

    def why(self) -> str:
        """"because you clicked ad_7 (+0.42); moved most by history +0.51, user -0.20" ("" if nothing)."""
        return explanations.render(self.because, self.contributions)


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


def _as_text(value) -> str | None:
    """A string input's value as the text the server gets (bytes as UTF-8, an integer as its digits,
    `serving/values.py`); None for anything else, left for those checks to refuse."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return str(int(value))
    return str(value) if isinstance(value, str) else None


def _pseudonym_of(value, key: bytes):
    text = _as_text(value)
    return value if text is None else pseudonym(text, key)


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

    `pseudonym_key` (bytes or text): the key the model's training job pseudonymised user ids with;
    not given, the environment variable `key_env` (ADREC_PSEUDONYM_KEY) when set (`key_env=None`:
    never). With a key, user ids are sent as their pseudonyms; without, as they are.
    """

    def __init__(self, address: str, model_name: str = RECOMMENDER,
                 signature_name: str = SIGNATURE_KEY, timeout: float = 10.0,
                 root_certificates: str | Path | bytes | None = None, server_name: str | None = None,
                 retry: RetryPolicy | None = None, max_batch_size: int = CLIENT_MAX_BATCH_SIZE,
                 pseudonym_key: bytes | str | None = None, key_env: str | None = DEFAULT_KEY_ENV):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        if pseudonym_key is not None:
            self._key: bytes | None = check_key(pseudonym_key, "pseudonym_key")
        else:
            self._key = key_from_env(key_env) if key_env else None
        self.address = address
        self.max_batch_size = max_batch_size
        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
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
        self._widths: dict[str, int] = {}  # the ad_ids output's width per model (-1: open)
        self._privacy: dict[str, dict | None] = {}  # per model: its privacy block, None when the server has none
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
            response = self._metadata(model_name)
            packed = response.metadata["signature_def"]
            if not packed.type_url.endswith("/" + wire.SignatureDefMap.DESCRIPTOR.full_name):
                raise RequestError(f"model {model_name!r}: metadata holds {packed.type_url!r}, not a SignatureDefMap")
            sig_map = wire.SignatureDefMap.FromString(packed.value)
            if self.signature_name not in sig_map.signature_def:
                raise RequestError(f"model {model_name!r} has no signature {self.signature_name!r}; "
                                   f"it has {sorted(sig_map.signature_def)}")
            sig = sig_map.signature_def[self.signature_name]
            self._shapes[model_name] = {k: [d.size for d in v.tensor_shape.dim] for k, v in sig.inputs.items()}
            ad_ids = sig.outputs.get("ad_ids")
            self._widths[model_name] = ad_ids.tensor_shape.dim[-1].size \
                if ad_ids is not None and len(ad_ids.tensor_shape.dim) == 2 else -1
            self._inputs[model_name] = {k: wire.dtype_name(v.dtype) for k, v in sig.inputs.items()}
        return self._inputs[model_name]

    def _metadata(self, model_name: str):
        """GetModelMetadata with the signatures and, from the embedded server, the privacy block; a server
        that knows no such field (tensorflow/serving) is asked again for the signatures alone."""
        request = wire.GetModelMetadataRequest()
        request.model_spec.name = model_name
        request.metadata_field.extend(["signature_def", PRIVACY_METADATA_FIELD])
        try:
            response = self._call(self._rpc["GetModelMetadata"], request)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            del request.metadata_field[1:]
            response = self._call(self._rpc["GetModelMetadata"], request)
        privacy = None
        if PRIVACY_METADATA_FIELD in response.metadata:
            struct = struct_pb2.Struct()
            response.metadata[PRIVACY_METADATA_FIELD].Unpack(struct)
            shown = struct.fields
            names = shown["pseudonymized_inputs"].list_value.values if "pseudonymized_inputs" in shown else []
            privacy = {"pseudonymized_inputs": [v.string_value for v in names],
                       "key_id": shown["key_id"].string_value if "key_id" in shown else ""}
        self._privacy[model_name] = privacy
        return response

    def _pseudonymized(self, inputs: dict[str, object], model_name: str) -> dict[str, object]:
        """`inputs` with the values of the inputs the model takes as pseudonyms replaced by them (with the
        key), or checked to be pseudonyms already (without); refused when the key does not fit the model."""
        privacy = self._privacy.get(model_name)
        if privacy is None:  # the server does not say: with a key, the user id is what the job always hashes
            names = ["user_id"] if self._key is not None else []
        else:
            names = privacy["pseudonymized_inputs"]
            if self._key is not None and not names:
                raise RequestError(f"model {model_name!r} was trained on plain user ids, but this client has a "
                                   "pseudonymisation key (pseudonym_key or $ADREC_PSEUDONYM_KEY): drop the key")
            if self._key is not None and key_id(self._key) != privacy["key_id"]:
                raise RequestError(f"model {model_name!r} was trained on ids pseudonymised under another key "
                                   f"(key id {privacy['key_id']}, this client's {key_id(self._key)}): give the "
                                   "job's key (its privacy.key_file or $ADREC_PSEUDONYM_KEY)")
        out, key = dict(inputs), self._key
        for name in (n for n in names if n in out):
            given = np.asarray(out[name], dtype=object)
            if key is not None:
                out[name] = np.vectorize(lambda v: _pseudonym_of(v, key), otypes=[object])(given) \
                    if given.size else given
            elif any(not is_pseudonym(text) for text in map(_as_text, given.ravel()) if text):
                raise RequestError(f"model {model_name!r} takes {name!r} as keyed pseudonyms, and this client has "
                                   "no key to make them: give the job's key (pseudonym_key, $ADREC_PSEUDONYM_KEY, "
                                   "adrec recommend --key-file)")
        return out

    def max_k(self, model_name: str | None = None) -> int | None:
        """The most ads the model returns per request: its `ad_ids` output's width, fixed at export
        (the recommender's `export.recommend_k`, retrieval's `export.top_k`); None when open."""
        self.signature_inputs(model_name)
        width = self._widths[model_name or self.model_name]
        return width if width > 0 else None

    def predict(self, inputs: Mapping[str, object], model_name: str | None = None) -> dict[str, np.ndarray]:
        """Call Predict with batched inputs (lists/arrays, one entry per example).

        Values are converted to the dtypes the signature declares (Python ints to int64), never
        changed on the way (`serving/values.py`). For a recommender, `excluded_ad_ids` may be a list
        of per-example id lists (padded here) or left out (nothing excluded).
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
        inputs = self._pseudonymized(dict(inputs), model_name)
        if EXCLUDED_AD_IDS in specs and inputs:
            given = inputs.get(EXCLUDED_AD_IDS)
            if given is None:
                batch = len(next(iter(inputs.values())))  # type: ignore[arg-type]
                inputs[EXCLUDED_AD_IDS] = values.padded_ad_ids([[]] * batch)
            elif not isinstance(given, np.ndarray):
                inputs[EXCLUDED_AD_IDS] = values.padded_ad_ids([values.ad_ids(e, EXCLUDED_AD_IDS)
                                                                for e in given])  # type: ignore[attr-defined]
        for name, tensor in inputs.items():
            try:
                request.inputs[name].CopyFrom(wire.make_tensor_proto(tensor, specs.get(name)))
            except (TypeError, ValueError) as err:
                raise RequestError(f"input {name!r}: {err}") from err
        response = self._call(self._rpc["Predict"], request)
        return {k: wire.make_ndarray(v) for k, v in response.outputs.items()}, response.model_spec.version.value

    def _request_batch(self, rows: list[dict], ignore_unknown: bool) -> dict[str, np.ndarray]:
        """One Predict's inputs from request rows, every value checked against the signature."""
        specs = self.signature_inputs()
        rows_of.check_names(rows, specs, self.model_name, ignore_unknown)
        return rows_of.predict_inputs(rows, specs, self._shapes[self.model_name])

    def _checked_k(self, k: object) -> int:
        """`k` as asked (a positive int, no bool), at most what the model returns; None: all of it."""
        if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1):
            raise RequestError(f"k must be a positive integer, got {values.shown(k)}")
        most = self.max_k()
        if k is None:
            if most is None:
                raise RequestError(f"k=None: model {self.model_name!r} leaves its number of ads open; give k")
            return most
        if most is not None and k > most:
            raise RequestError(f"k={k} is more than the {most} ads model {self.model_name!r} returns per "
                               "request (fixed at export: export.recommend_k for the recommender)")
        return int(k)

    def recommend_batch(self, requests, k: int | None = 10, exclude: Sequence[Sequence[str]] | None = None,
                        ignore_unknown_features: bool = False) -> list[list[RecommendedAd]]:
        """Ranked ads for many users: (user, context) or (user, context, history) tuples, or a
        DataFrame with one row per request (columns = feature names, optionally `history` and
        `excluded_ad_ids`), sent in Predict calls of at most `max_batch_size` rows. A history is a
        list of the user's recently clicked ad ids, most recent first; missing means empty.
        `exclude`: one list of ad ids per request that must not come back (shown, capped).

        `k`: 1 up to `max_k()` (None: every ad the model returns). Every value is checked before
        anything is sent (`serving/values.py`); a name that is no input of the model is refused
        unless `ignore_unknown_features`."""
        k = self._checked_k(k)
        rows = rows_of.request_rows(requests, exclude)
        batches = [self._request_batch(rows[i:i + self.max_batch_size], ignore_unknown_features)
                   for i in range(0, len(rows), self.max_batch_size)]  # validate all before sending
        results = []
        for batch in batches:
            results.extend(self._ranked(self.predict(batch), k))
        return results

    def _ranked(self, out: dict[str, np.ndarray], k: int) -> list[list[RecommendedAd]]:
        if "ad_ids" not in out:
            raise RequestError(f"model {self.model_name!r} returns {sorted(out)}, not ad_ids")
        if out["ad_ids"].ndim == 2 and out["ad_ids"].shape[1] < k:  # a signature that left the width open
            raise RequestError(f"k={k} is more than the {out['ad_ids'].shape[1]} ads model "
                               f"{self.model_name!r} returned")
        score_key = next(key for key in ("score", "pctr", "scores") if key in out)
        results = []
        for b in range(len(out["ad_ids"])):
            ads: list[RecommendedAd] = []
            for r, ad in enumerate(out["ad_ids"][b][:k]):
                if ad == PAD_AD_ID.encode():  # the recommender's padding: fewer than k ads remained after exclusions
                    continue
                scores = {key: float(v[b][r]) for key, v in out.items()
                          if key != "ad_ids" and v.ndim == 2}
                because, contributions = explanations.read(out, b, r)
                ads.append(RecommendedAd(rank=len(ads) + 1, ad_id=ad.decode("utf-8"),
                                         score=scores[score_key], scores=scores, because=because,
                                         contributions=contributions))
            results.append(ads)
        return results

    def recommend(self, user: Mapping[str, object], context: Mapping[str, object] | None = None,
                  k: int | None = 10, history: Sequence[str] | None = None,
                  exclude: Sequence[str] | None = None, ignore_unknown_features: bool = False) -> list[RecommendedAd]:
        """Ranked ads for one user in one context (dicts of plain Python/numpy values or pandas Series),
        never one of the ad ids in `exclude` (a list: a bare string is refused, not split).

        `history`: the ad ids the user recently clicked, most recent first (default none); padded
        with "" (or cut) to the length the model was exported with. A model trained with
        `ranking.user_stats` also reads the user's counters before the request from `user`
        (`user_events`, `user_clicks`, `user_recent_clicks`; missing ones are 0: a user with no
        earlier events), one with `ranking.negative_history` the `negative_history` list of the
        ad ids the user saw lately and did not click (from `user`, most recent first; missing: none).
        A name in both `user` and `context` is refused; `k` and the rest as `recommend_batch`.
        """
        request = (user, {} if context is None else context, history)
        return self.recommend_batch([request], k, None if exclude is None else [exclude],
                                    ignore_unknown_features)[0]

    def recommend_df(self, user: Mapping[str, object], context: Mapping[str, object] | None = None,
                     k: int | None = 10, history: Sequence[str] | None = None,
                     exclude: Sequence[str] | None = None, ignore_unknown_features: bool = False):
        """`recommend` as a pandas DataFrame (rank, ad_id, score and every output score); needs pandas."""
        return ads_frame(self.recommend(user, context, k, history=history, exclude=exclude,
                                        ignore_unknown_features=ignore_unknown_features))


def ads_frame(ads: Sequence[RecommendedAd]):
    """Ads as a pandas DataFrame: rank, ad_id, score and every output score; needs pandas."""
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError("recommend_df needs pandas (pip install pandas); recommend() does not") from err
    return pd.DataFrame([{"rank": a.rank, "ad_id": a.ad_id, "score": a.score, **dict(sorted(a.scores.items()))}
                         for a in ads])
