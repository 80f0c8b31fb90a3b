"""The serving contract, written once: the models a job exports, their signatures' fixed input and
output names, the padding value and the request limits.

Export (trainer/), the embedded server and the thin client all read it; the feature columns
themselves (`user_id`, `device`, ...) come from the job's schema. Imports nothing, so a client
host reads it without TensorFlow.
"""

from __future__ import annotations

# Models, each exported to <export_dir>/<model>/<version>/ with one signature.
RETRIEVAL, RANKING, RECOMMENDER = "retrieval", "ranking", "recommender"
MODEL_NAMES = (RETRIEVAL, RANKING, RECOMMENDER)
SIGNATURE_KEY = "serving_default"  # what an empty `model_spec.signature_name` means
# Why each scored ad scored as it did (trainer/explain.py): the EXPLAINED_HISTORY history ads whose
# removal lowers its CTR logit most (ids, "" where the history has fewer entries, and that drop), and
# per EXPLANATION_GROUPS entry how far the group moves the logit from the training average's.
BECAUSE_AD_IDS, BECAUSE_WEIGHTS, GROUP_CONTRIBUTIONS = "because_ad_ids", "because_weights", "group_contributions"
EXPLANATIONS = (BECAUSE_AD_IDS, BECAUSE_WEIGHTS, GROUP_CONTRIBUTIONS)
EXPLAINED_HISTORY = 3
EXPLANATION_GROUPS = ("user", "context", "ad", "ad_text", "history", "negative_history")
OUTPUTS = {RETRIEVAL: ("ad_ids", "scores"), RANKING: ("pctr", "pcvr", *EXPLANATIONS),
           RECOMMENDER: ("ad_ids", "pctr", "pcvr", "score", "retrieval_scores", *EXPLANATIONS)}

# Inputs besides the schema's features. Ad-id lists are [batch, N] strings padded with PAD_AD_ID;
# the recommender also fills the ad_ids it cannot fill (fewer than k ads left) with it.
HISTORY = "history"  # the user's last N clicked ad ids, most recent first
NEGATIVE_HISTORY = "negative_history"  # the user's last N shown and not clicked ad ids
EXCLUDED_AD_IDS = "excluded_ad_ids"  # recommender: ad ids it must not return (shown, capped), [batch, M]
USER_STATS = ("user_events", "user_clicks", "user_recent_clicks")  # int64 [batch]: counters before the request
PAD_AD_ID = ""
AD_ID_LISTS = (HISTORY, NEGATIVE_HISTORY, EXCLUDED_AD_IDS)


def signature_inputs(model_name: str, query_features: tuple[str, ...], ad_features: tuple[str, ...] = (),
                     history: bool = False, user_inputs: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A model's signature inputs, EXCLUDED_AD_IDS left out. `history`: retrieval (and so the
    recommender) reads the user's HISTORY; `user_inputs`: what the ranking model reads about the
    user's past (HISTORY, NEGATIVE_HISTORY, USER_STATS), which the recommender takes too;
    `ad_features`: the ranking model's ad columns and text."""
    if model_name == RANKING:
        return (*query_features, *user_inputs, *ad_features)
    names = (*query_features, HISTORY) if history else tuple(query_features)
    if model_name == RECOMMENDER:
        names += tuple(n for n in user_inputs if n not in names)
    return names


# gRPC: TF Serving's services (and grpc.health.v1 names for them), and the request limits.
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
HEALTH_SERVICES = ("", PREDICTION_SERVICE, MODEL_SERVICE)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # either way, server and client
SERVER_MAX_BATCH_SIZE = 1024  # the embedded server's default; larger batches get INVALID_ARGUMENT
CLIENT_MAX_BATCH_SIZE = 256  # the client splits larger batches into several Predict calls
# The embedded server's defaults for what one request may cost (serving/limits.py); a request over
# one is refused before any of it is decoded. The recommender's work grows with batch x retrieve_n.
MAX_EXCLUDED_AD_IDS = 1000  # the width of a recommender request's excluded_ad_ids
MAX_REQUEST_ELEMENTS = 1 << 17  # values in all inputs together: 128 rows of 1000 exclusions
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # numeric values x their size, + strings as sent
# How many of a request's rows one model run takes: a larger request runs in slices of this many
# rows, so it shares the cores with other calls between slices and stops at its deadline.
MAX_ROWS_PER_RUN = 32
