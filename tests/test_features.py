import numpy as np
import pandas as pd
import pytest

from features import SyntheticConfig, build_vocabularies, generate_world, time_split
from features.dataset import make_dataset
from features.schema import DEFAULT_SCHEMA, SchemaError
from features.text import TextPacker, build_word_vocabulary, make_tokenizer

SMALL = SyntheticConfig(n_users=200, n_advertisers=20, n_ads=100, n_impressions=8000)


def test_generator_is_deterministic():
    a, b = generate_world(SMALL), generate_world(SMALL)
    pd.testing.assert_frame_equal(a.logs, b.logs)
    pd.testing.assert_frame_equal(a.catalog, b.catalog)
    pd.testing.assert_frame_equal(a.users, b.users)
    c = generate_world(SMALL.model_copy(update={"seed": SMALL.seed + 1}))
    assert not a.logs["ad_id"].equals(c.logs["ad_id"])


def test_world_follows_schema_and_ground_truth():
    w = generate_world(SMALL)
    DEFAULT_SCHEMA.require_columns(w.logs, DEFAULT_SCHEMA.log_columns, "logs")
    DEFAULT_SCHEMA.require_columns(w.catalog, DEFAULT_SCHEMA.catalog_columns, "catalog")
    assert w.catalog["ad_id"].is_unique
    assert set(w.logs["ad_id"]) <= set(w.catalog["ad_id"])
    assert w.logs["timestamp"].is_monotonic_increasing
    # Clicks follow the known model: the clicked rows have far higher true probability.
    clicked = w.logs["click"] > 0
    assert w.logs.loc[clicked, "true_p_click"].mean() > 1.5 * w.logs.loc[~clicked, "true_p_click"].mean()
    # Position bias: position 1 is clicked more often than position 5.
    by_pos = w.logs.groupby("position")["click"].mean()
    assert by_pos[1] > 1.5 * by_pos[SMALL.max_position]
    # Conversions only follow clicks.
    assert not ((w.logs["conversion"] > 0) & (w.logs["click"] == 0)).any()
    # Text is written from the topic: every title carries one of its topic's nouns.
    from features.synthetic import TOPICS
    for _, ad in w.catalog.iterrows():
        assert any(noun in ad["title"] for noun in TOPICS[ad["category"]][0])


def test_time_split_and_cold_start_ads():
    w = generate_world(SMALL)
    split = time_split(w.logs, 0.2)
    assert split.train["timestamp"].max() < split.test["timestamp"].min()
    assert len(split.train) + len(split.test) == len(w.logs)
    cold = split.cold_ad_ids()
    assert cold and cold <= w.cold_ad_ids
    assert not split.train["ad_id"].isin(w.cold_ad_ids).any()


def test_vocabularies_come_from_training_rows_only():
    w = generate_world(SMALL)
    split = time_split(w.logs, 0.2)
    vocab = build_vocabularies(split.train, w.catalog)
    assert set(vocab["ad_id"]) == set(split.train["ad_id"])
    assert not set(vocab["ad_id"]) & split.cold_ad_ids()
    assert set(vocab["user_id"]) == set(split.train["user_id"])
    assert vocab["hour"] and all(isinstance(h, int) for h in vocab["hour"])


def test_dataset_dtypes_and_missing_columns():
    w = generate_world(SMALL)
    cols = (*DEFAULT_SCHEMA.query_features, "ad_id", "click")
    batch = next(iter(make_dataset(w.logs, cols, 32)))
    assert batch["user_id"].dtype.name == "string"
    assert batch["hour"].dtype.name == "int64"
    assert batch["click"].dtype.name == "float32"
    with pytest.raises(SchemaError, match="missing column"):
        make_dataset(w.logs.drop(columns=["device"]), cols, 32)


def test_tokenizer_packs_text_and_strips_accents():
    vocab = build_word_vocabulary(["Cafe creme with free delivery", "cheap flight deals"])
    tok = make_tokenizer("tiny", vocab)
    packer = TextPacker(tok, 8)
    packed = packer.pack_numpy(["Café crème", "cheap flight deals with free delivery today"])
    ids = packed["token_ids"]
    assert ids.shape == (2, 8)
    assert ids[0, 0] == tok.token_to_id("[CLS]")
    assert tok.token_to_id("[UNK]") not in ids[0, 1:3]  # accents stripped, words known
    assert packed["padding_mask"][0].sum() == 4 and packed["padding_mask"][1].all()
    assert ids[1, -1] == tok.token_to_id("[SEP]")  # truncated, still closed


def test_bundled_minilm_tokenizer_matches_uncased_vocab():
    tok = make_tokenizer("minilm")
    ids = np.asarray(tok("café running shoes"))
    assert tok.token_to_id("[UNK]") not in ids
    assert tok.vocabulary_size() == 30522


def test_a_missing_string_is_the_empty_string_in_training_tensors_as_in_serving_requests():
    from features.dataset import frame_to_tensors
    from serving.contract import PAD_AD_ID

    frame = pd.DataFrame({"user_id": ["u1", None, np.nan, "u4"]})
    out = frame_to_tensors(frame, ("user_id",), DEFAULT_SCHEMA)["user_id"]
    assert list(out) == ["u1", PAD_AD_ID, PAD_AD_ID, "u4"]  # never "None" or "nan"
