"""The shipped specs (configs/data) read each public format: MovieLens 100k / 1m / latest and MIND.

tests/fixtures/ml-100k and tests/fixtures/ml-1m are a few hand-written lines in the exact
MovieLens formats (no real MovieLens data): each has a user rating who is missing from the
users table, a latin-1 title, and (1m) a zip code with a leading zero.
"""

from pathlib import Path

import pytest

from features.loader import load_dataset
from features.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "configs" / "data"
ML_LATEST_SMALL = ROOT.parent / "shared" / "data" / "ml-latest-small"
MIND_FIXTURE = ROOT / "tests" / "fixtures" / "mind"
ML_100K_FIXTURE = ROOT / "tests" / "fixtures" / "ml-100k"
ML_1M_FIXTURE = ROOT / "tests" / "fixtures" / "ml-1m"


def test_movielens_100k_tab_and_pipe_files(tmp_path):
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t5\t891717742\n22\t377\t1\t878887116\n")
    flags = ["0"] * 19
    comedy = flags.copy()
    comedy[5] = "1"
    action_war = flags.copy()
    action_war[1] = action_war[17] = "1"
    items = [["242", "Kolya (1996)", "24-Jan-1997", "", "http://x", *comedy],
             ["302", "L.A. Confidential (1997)", "01-Jan-1997", "", "http://y", *action_war],
             ["377", "Heavyweights (1994)", "01-Jan-1994", "", "http://z", *flags]]
    (tmp_path / "u.item").write_bytes("\n".join("|".join(r) for r in items).replace("Kolya", "Kolj\u00e1")
                                      .encode("latin-1") + b"\n")
    (tmp_path / "u.user").write_text("196|49|M|writer|55105\n186|39|F|executive|00000\n22|25|M|writer|40206\n")
    data = load_dataset(load_spec(SPECS / "ml-100k.yaml", root=tmp_path))
    assert data.catalog["genres"].tolist() == ["Comedy", "Action|War", ""]
    assert data.catalog["title"].iloc[0] == "Kolj\u00e1 (1996)"
    assert data.logs["click"].tolist() == [0.0, 1.0, 0.0]
    assert data.logs["ad_id"].tolist() == ["242", "302", "377"]
    assert data.report.filled_nulls == {}


def test_movielens_1m_double_colon_files(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::3408::x::978300275\n")
    (tmp_path / "movies.dat").write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                          "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                                          "3408::Erin Brockovich (2000)::Drama\n".encode("latin-1"))
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    data = load_dataset(load_spec(SPECS / "ml-1m.yaml", root=tmp_path))
    assert data.catalog["genres"].tolist()[1] == "Animation|Children's|Musical"
    assert data.logs["click"].tolist() == [1.0, 0.0]
    assert data.report.logs.skipped == {"bad_type": 1}
    assert "ratings.dat:3: column 'rating': got 'x', expected a number [bad_type]" in data.report.format()
    assert set(data.logs.columns) >= {"hour", "weekday"}


def test_movielens_100k_fixture_joins_u_user_and_counts_missing_users():
    data = load_dataset(load_spec(SPECS / "ml-100k.yaml", root=ML_100K_FIXTURE))
    logs = data.logs.set_index(["user_id", "ad_id"])
    assert logs.loc[("1", "1"), ["age", "gender", "occupation", "zip_code"]].tolist() == [
        "24", "M", "technician", "85711"]
    assert logs.loc[("5", "3"), "zip_code"] == "T8H1N"
    # user 6 rated a movie but is not in u.user: kept, user features empty, counted
    assert logs.loc[("6", "1"), ["age", "gender", "occupation", "zip_code"]].tolist() == ["", "", "", ""]
    assert data.report.users.read == data.report.users.kept == 5
    assert data.report.logs.kept == 8 and data.report.users_missing == 1
    text = data.report.format()
    assert "  users              5           5         0  u.user" in text
    assert "log rows whose user is not in the users table (kept, user features empty): 1 rows of 1 users, " \
           "e.g. '6'" in text
    assert data.schema.user_categoricals == ("age", "gender", "occupation", "zip_code")
    assert data.catalog.set_index("ad_id").loc["3", "title"] == "Caf\u00e9 Society (1995)"
    assert data.catalog.set_index("ad_id").loc["1", "genres"] == "Animation|Children's|Comedy"


def test_movielens_1m_fixture_joins_users_dat():
    data = load_dataset(load_spec(SPECS / "ml-1m.yaml", root=ML_1M_FIXTURE))
    users = data.logs.drop_duplicates("user_id").set_index("user_id")
    assert users.loc["1", ["gender", "age", "occupation", "zip_code"]].tolist() == ["F", "1", "10", "48067"]
    assert users.loc["4", "zip_code"] == "02460"  # read as text: the leading zero stays
    assert users.loc["5", ["gender", "age", "occupation", "zip_code"]].tolist() == ["", "", "", ""]
    assert data.report.users.kept == 4 and data.report.users_missing == 1
    assert data.logs["click"].tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert data.catalog.set_index("ad_id").loc["3", "title"] == "Caf\u00e9 Society (1995)"


def test_mind_impressions_expand_to_click_rows_with_position(tmp_path):
    (tmp_path / "news.tsv").write_text(
        'N1\tsports\tfootball\t"Big" win\tThe team won.\thttp://a\t[]\t[]\n'
        "N2\tfinance\tmarkets\tRates rise\t\thttp://b\t[]\t[]\n")
    (tmp_path / "behaviors.tsv").write_text(
        "1\tU1\t11/11/2019 9:05:58 AM\tN2\tN1-1 N2-0\n"
        "2\tU2\t11/12/2019 3:00:00 PM\t\tN2-1 N1-x\n"
        "3\tU3\t11/13/2019 25:00:00 PM\tN1\tN1-0\n")
    data = load_dataset(load_spec(SPECS / "mind.yaml", root=tmp_path))
    logs = data.logs
    assert logs[["user_id", "ad_id", "position", "click"]].values.tolist() == [
        ["U1", "N1", 1, 1.0], ["U1", "N2", 2, 0.0], ["U2", "N2", 1, 1.0]]
    assert logs["hour"].tolist() == [9, 9, 15]
    assert data.report.logs.read == 5 and data.report.logs.skipped == {"bad_type": 1, "bad_timestamp": 1}
    text = data.report.format()
    assert "behaviors.tsv:2: column 'click': got 'x', expected a number (0 or 1) [bad_type]" in text
    assert "behaviors.tsv:3: column 'time': got '11/13/2019 25:00:00 PM'" in text
    assert data.catalog["title"].tolist() == ['"Big" win', "Rates rise"]  # quotes are text in MIND
    assert data.report.filled_nulls == {"abstract": 1}
    assert data.schema.position == "position" and data.schema.ad_categoricals == ("category", "subcategory")


def test_mind_fixture_loads_clean():
    data = load_dataset(load_spec(SPECS / "mind.yaml", root=MIND_FIXTURE))
    assert data.report.logs.read == data.report.logs.kept == 2100
    assert 0.1 < data.logs["click"].mean() < 0.5


@pytest.mark.skipif(not (ML_LATEST_SMALL / "ratings.csv").exists(),
                    reason=f"MovieLens ml-latest-small not found at {ML_LATEST_SMALL}")
def test_ml_latest_small_reads_in_place_and_describes():
    from features.describe import describe

    data = load_dataset(load_spec(SPECS / "ml-latest-small.yaml"))
    assert data.report.logs.read == data.report.logs.kept == 100_836
    assert data.report.catalog.kept == 9_742
    d = describe(data)
    assert d["users"] == 610 and d["catalog_ads"] == 9_742
    assert d["label_rates"]["click"] == pytest.approx((data.logs["rating"] >= 4).mean())
    assert data.schema.context_integers == ("hour", "weekday") and data.schema.context_categoricals == ()
