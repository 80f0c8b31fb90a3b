"""Real-log ingestion: every bad-input case gives its exact error (fail) or its count (skip)."""

import numpy as np
import pandas as pd
import pytest
import yaml

from features.loader import load_dataset
from features.spec import DataSpecError, load_spec, spec_from_dict
from features.validate import DataValidationError

CATALOG = "ad,title,category,cpc\na1,Red shoes,fashion,0.5\na2,Blue hats,fashion,0.7\na3,Cheap flights,travel,1.2\n"
LOGS = ("user,ad,ts,clicked,slot\n"
        "u1,a1,1700000000,1,1\n"
        "u2,a2,1700000100,0,2\n"
        "u3,a3,1700000200,1,1\n"
        "u4,a1,1700000300,0,3\n")
COLUMNS = {"user_id": "user", "ad_id": "ad", "timestamp": {"column": "ts", "format": "unix"},
           "labels": {"click": "clicked"}, "ad_categoricals": ["category"], "ad_text": ["title"],
           "position": "slot", "bid": "cpc"}


def _spec(tmp_path, logs=LOGS, catalog=CATALOG, policy=None, **extra):
    (tmp_path / "logs.csv").write_text(logs)
    (tmp_path / "catalog.csv").write_text(catalog)
    raw = {"name": "t", "logs": {"files": ["logs.csv"]}, "catalog": {"files": ["catalog.csv"]},
           "columns": COLUMNS, "policy": policy or {}, **extra}
    return spec_from_dict(raw, base_dir=tmp_path)


def _replace_line(text: str, line: int, new: str) -> str:
    lines = text.splitlines()
    lines[line - 1] = new
    return "\n".join(lines) + "\n"


# (problem, which file, line to replace, replacement, exact message)
CASES = [
    ("bad_type", "logs", 3, "u2,a2,1700000100,0,top",
     "logs.csv:3: column 'slot': got 'top', expected an integer [bad_type]"),
    ("bad_timestamp", "logs", 4, "u3,a3,yesterday,1,1",
     "logs.csv:4: column 'ts': got 'yesterday', expected unix seconds (a number, 1970..2100) [bad_timestamp]"),
    ("bad_timestamp", "logs", 4, "u3,a3,1700000200000,1,1",
     "logs.csv:4: column 'ts': got '1700000200000', expected unix seconds (a number, 1970..2100) [bad_timestamp]"),
    ("null_id", "logs", 5, ",a1,1700000300,0,3",
     "logs.csv:5: column 'user': got None, expected a non-empty user id [null_id]"),
    ("null_id", "logs", 2, "u1,  ,1700000000,1,1",
     "logs.csv:2: column 'ad': got '  ', expected a non-empty ad id [null_id]"),
    ("label_domain", "logs", 2, "u1,a1,1700000000,2,1",
     "logs.csv:2: column 'clicked': got '2', expected 0 or 1 [label_domain]"),
    ("bad_type", "logs", 2, "u1,a1,1700000000,yes,1",
     "logs.csv:2: column 'clicked': got 'yes', expected a number (0 or 1) [bad_type]"),
    ("unknown_ad", "logs", 5, "u4,zz9,1700000300,0,3",
     "logs.csv:5: column 'ad': got 'zz9', expected an ad id present in the catalog [unknown_ad]"),
    ("duplicate_catalog_id", "catalog", 4, "a1,Another red shoe,fashion,0.9",
     "catalog.csv:4: column 'ad': got 'a1', expected an ad id not already in the catalog [duplicate_catalog_id]"),
    ("null_id", "catalog", 3, ",Blue hats,fashion,0.7",
     "catalog.csv:3: column 'ad': got None, expected a non-empty ad id [null_id]"),
    ("bad_type", "catalog", 2, "a1,Red shoes,fashion,cheap",
     "catalog.csv:2: column 'cpc': got 'cheap', expected a number [bad_type]"),
]


@pytest.mark.parametrize("problem,table,line,new,message", CASES)
def test_each_problem_fails_with_file_line_column_and_expected_form(tmp_path, problem, table, line, new, message):
    files = {"logs": LOGS, "catalog": CATALOG}
    files[table] = _replace_line(files[table], line, new)
    spec = _spec(tmp_path, policy={problem: "fail"})
    (tmp_path / "logs.csv").write_text(files["logs"])
    (tmp_path / "catalog.csv").write_text(files["catalog"])
    with pytest.raises(DataValidationError) as err:
        load_dataset(spec)
    assert str(err.value) == message
    assert err.value.problem.reason == problem and err.value.problem.line == line


@pytest.mark.parametrize("problem,table,line,new,message", CASES)
def test_each_problem_is_skipped_counted_and_reported_under_skip(tmp_path, problem, table, line, new, message):
    files = {"logs": LOGS, "catalog": CATALOG}
    files[table] = _replace_line(files[table], line, new)
    spec = _spec(tmp_path, logs=files["logs"], catalog=files["catalog"], policy={problem: "skip"})
    data = load_dataset(spec)
    report = data.report
    counts = getattr(report, table)
    assert counts.skipped == {problem: 1}
    assert counts.kept == counts.read - 1
    if table == "catalog" and problem != "duplicate_catalog_id":
        # the dropped ad's log rows become unknown ads: counted too, never silently lost
        dropped_ad = CATALOG.splitlines()[line - 1].split(",")[0]
        assert report.logs.skipped == {"unknown_ad": LOGS.count(f",{dropped_ad},")}
    text = report.format()
    assert f"e.g. {message}" in text and problem in text


def test_missing_column_always_fails_with_role_and_found_columns(tmp_path):
    logs = LOGS.replace("clicked,", "click,")
    spec = _spec(tmp_path, logs=logs, policy={"bad_type": "skip"})
    with pytest.raises(DataValidationError) as err:
        load_dataset(spec)
    assert str(err.value) == ("logs.csv:1: missing column(s) 'clicked' (labels.click); found columns "
                              "['user', 'ad', 'ts', 'click', 'slot'] [missing_column]")


def test_rating_labels_domain_and_threshold(tmp_path):
    logs = "user,ad,ts,stars\nu1,a1,1700000000,4.5\nu2,a2,1700000001,2\nu3,a3,1700000002,9\n"
    columns = {**COLUMNS, "labels": {"rating": "stars", "threshold": 4, "rating_min": 0.5, "rating_max": 5}}
    columns.pop("position")
    (tmp_path / "logs.csv").write_text(logs)
    (tmp_path / "catalog.csv").write_text(CATALOG)
    raw = {"logs": {"files": ["logs.csv"]}, "catalog": {"files": ["catalog.csv"]}, "columns": columns}
    data = load_dataset(spec_from_dict(raw, base_dir=tmp_path))
    assert data.logs["click"].tolist() == [1.0, 0.0]
    assert data.report.logs.skipped == {"label_domain": 1}
    assert "logs.csv:4: column 'stars': got '9', expected a rating in [0.5, 5] [label_domain]" in data.report.format()
    with pytest.raises(DataValidationError, match=r"logs.csv:4: column 'stars'"):
        load_dataset(spec_from_dict({**raw, "policy": {"label_domain": "fail"}}, base_dir=tmp_path))


def test_100_bad_rows_among_10000_keeps_9900_and_reports_each_reason(tmp_path):
    n = 10_000
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user": [f"u{i}" for i in range(n)], "ad": rng.choice(["a1", "a2", "a3"], n),
                          "ts": (1_700_000_000 + np.arange(n)).astype(str),
                          "clicked": rng.integers(0, 2, n).astype(str),
                          "slot": rng.integers(1, 6, n).astype(str)})
    bad = rng.choice(n, size=100, replace=False)
    reasons = ["null_id", "bad_timestamp", "label_domain", "bad_type", "unknown_ad"]
    for j, row in enumerate(bad):
        reason = reasons[j % 5]
        if reason == "null_id":
            frame.at[row, "user"] = ""
        elif reason == "bad_timestamp":
            frame.at[row, "ts"] = "2024-13-45"
        elif reason == "label_domain":
            frame.at[row, "clicked"] = "-1"
        elif reason == "bad_type":
            frame.at[row, "slot"] = "first"
        else:
            frame.at[row, "ad"] = "ghost"
    (tmp_path / "logs.csv").write_text(frame.to_csv(index=False))
    (tmp_path / "catalog.csv").write_text(CATALOG)
    raw = {"logs": {"files": ["logs.csv"]}, "catalog": {"files": ["catalog.csv"]}, "columns": COLUMNS,
           "chunk_rows": 999}
    data = load_dataset(spec_from_dict(raw, base_dir=tmp_path))
    assert data.report.logs.read == 10_000 and data.report.logs.kept == 9_900 and len(data.logs) == 9_900
    assert data.report.logs.skipped == {r: 20 for r in reasons}
    good = set(frame["user"].drop(index=bad))
    assert set(data.logs["user_id"]) == good
    # the reported lines point at the corrupted rows (header is line 1)
    for examples in data.report.examples.values():
        for problem in examples:
            assert problem.line - 2 in set(bad)
    assert data.logs["timestamp"].dtype == np.int64 and data.logs["position"].dtype == np.int64


def test_too_many_skipped_rows_fails_with_the_report(tmp_path):
    logs = LOGS.replace(",1,1\n", ",7,1\n")  # two of four rows get an impossible label
    spec = _spec(tmp_path, logs=logs, max_skipped_fraction=0.25)
    with pytest.raises(DataValidationError, match="2 of 4 log rows were skipped") as err:
        load_dataset(spec)
    assert err.value.report.logs.skipped == {"label_domain": 2}


def test_parquet_globs_and_chunks_keep_file_and_row(tmp_path):
    (tmp_path / "logs").mkdir()
    rows = pd.read_csv(pd.io.common.StringIO(LOGS), dtype=str)
    rows.iloc[:2].to_parquet(tmp_path / "logs" / "part-0.parquet")
    second = rows.iloc[2:].copy()
    second.iloc[1, second.columns.get_loc("user")] = None
    second.to_parquet(tmp_path / "logs" / "part-1.parquet")
    (tmp_path / "catalog.csv").write_text(CATALOG)
    raw = {"logs": {"files": ["logs/*.parquet"]}, "catalog": {"files": ["catalog.csv"]}, "columns": COLUMNS,
           "chunk_rows": 1}
    data = load_dataset(spec_from_dict(raw, base_dir=tmp_path))
    assert data.report.logs.read == 4 and data.report.logs.kept == 3
    (problem,) = data.report.examples["logs:null_id"]
    assert (problem.file, problem.line, problem.column) == ("logs/part-1.parquet", 2, "user")


def test_spec_errors_are_named_and_point_at_the_key(tmp_path):
    with pytest.raises(DataSpecError, match=r"spec.columns: unknown key\(s\) \['userid'\]"):
        spec_from_dict({"logs": {"files": ["x"]}, "catalog": {"files": ["y"]},
                        "columns": {"userid": "u", "labels": {"click": "c"}, "ad_text": ["t"]}})
    with pytest.raises(DataSpecError, match="exactly one of `click` or `rating`"):
        spec_from_dict({"logs": {"files": ["x"]}, "catalog": {"files": ["y"]}, "columns": {"ad_text": ["t"]}})
    with pytest.raises(DataSpecError, match=r"spec.policy.null_id: expected one of \['fail', 'skip'\]"):
        spec_from_dict({"logs": {"files": ["x"]}, "catalog": {"files": ["y"]}, "policy": {"null_id": "ignore"},
                        "columns": {"labels": {"click": "c"}, "ad_text": ["t"]}})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"logs": {"files": ["nope/*.csv"]}, "catalog": {"files": ["c.csv"]},
                                    "columns": {"labels": {"click": "c"}, "ad_text": ["t"]}}))
    from features.readers import DataReadError
    with pytest.raises(DataReadError, match="no file matches 'c.csv'"):
        load_dataset(load_spec(path))


def test_cli_validate_prints_report_and_one_line_errors(tmp_path, capsys):
    from trainer.cli import main

    spec = _spec(tmp_path, logs=_replace_line(LOGS, 3, "u2,a2,soon,0,2"))
    path = tmp_path / "spec.yaml"
    raw = {"name": "t", "logs": {"files": ["logs.csv"]}, "catalog": {"files": ["catalog.csv"]}, "columns": COLUMNS}
    path.write_text(yaml.safe_dump(raw))
    assert spec.root_dir == tmp_path.resolve()
    assert main(["data", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "logs               4           3         1" in out
    assert "bad_timestamp" in out and "logs.csv:3: column 'ts': got 'soon'" in out
    raw["policy"] = {"bad_timestamp": "fail"}
    path.write_text(yaml.safe_dump(raw))
    assert main(["data", "validate", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["adrec data: error: logs.csv:3: column 'ts': got 'soon', expected unix seconds "
                   "(a number, 1970..2100) [bad_timestamp]"]
    assert main(["data", "describe", str(tmp_path / "missing.yaml")]) == 1
    assert "data spec not found" in capsys.readouterr().err


def test_empty_and_header_only_files_are_named_errors(tmp_path):
    from features.readers import DataReadError

    spec = _spec(tmp_path, logs="")
    with pytest.raises(DataReadError, match=r"logs.csv: the file is empty"):
        load_dataset(spec)
    spec = _spec(tmp_path, logs="user,ad,ts,clicked,slot\n")
    with pytest.raises(DataValidationError, match=r"logs: the file\(s\) .* hold no data rows"):
        load_dataset(spec)
    spec = _spec(tmp_path, logs=LOGS.replace("u1,", ",").replace("u2,", ",").replace("u3,", ",").replace("u4,", ","))
    with pytest.raises(DataValidationError, match=r"^logs: all 4 rows were skipped$") as err:
        load_dataset(spec)
    assert err.value.report.logs.skipped == {"null_id": 4}


USERS = "uid,country,age\nu1,fr,31\nu2,de,45\nu3,fr,22\n"  # u4 (in LOGS) is missing on purpose


def _users_spec(tmp_path, users=USERS, policy=None, **columns):
    (tmp_path / "users.csv").write_text(users)
    spec = _spec(tmp_path, policy=policy)
    raw = {"name": "t", "logs": {"files": ["logs.csv"]}, "catalog": {"files": ["catalog.csv"]},
           "users": {"files": ["users.csv"]}, "policy": policy or {},
           "columns": {**COLUMNS, "users_user_id": "uid", "user_categoricals": ["country"],
                       "user_numerics": ["age"], **columns}}
    assert spec.root_dir == tmp_path.resolve()
    return spec_from_dict(raw, base_dir=tmp_path)


def test_users_table_is_joined_by_user_id_and_missing_users_are_kept_and_counted(tmp_path):
    data = load_dataset(_users_spec(tmp_path))
    logs = data.logs.set_index("user_id")
    assert logs["country"].to_dict() == {"u1": "fr", "u2": "de", "u3": "fr", "u4": ""}
    assert logs.loc[["u1", "u2", "u3"], "age"].tolist() == [31.0, 45.0, 22.0]
    assert logs.loc["u4", "age"] == pytest.approx((31 + 45 + 22) / 3)  # unknown user: the table's mean
    assert data.report.logs.kept == 4 and data.report.users_missing == 1
    assert data.report.users.read == data.report.users.kept == 3
    assert data.schema.user_categoricals == ("country",) and data.schema.extra["numerics"] == ("age",)
    text = data.report.format()
    assert "  users              3           3         0  users.csv" in text
    assert "1 rows of 1 users, e.g. 'u4'" in text


def test_users_table_columns_are_not_read_from_the_logs(tmp_path):
    # the logs have no `country` / `age` column: with a users table that is fine
    data = load_dataset(_users_spec(tmp_path, users="uid,country,age\nu1,fr,31\nu2,de,45\nu3,fr,22\nu4,it,50\n"))
    assert data.report.users_missing == 0 and "not in the users table" not in data.report.format()
    assert data.logs.set_index("user_id")["country"].to_dict() == {"u1": "fr", "u2": "de", "u3": "fr", "u4": "it"}


# (problem, line of USERS to replace, replacement, exact message, log users then missing from the table)
USER_CASES = [
    ("duplicate_user_id", 4, "u1,es,50",
     "users.csv:4: column 'uid': got 'u1', expected a user id not already in the users table [duplicate_user_id]",
     {"u3", "u4"}),
    ("null_id", 3, ",de,45", "users.csv:3: column 'uid': got None, expected a non-empty user id [null_id]",
     {"u2", "u4"}),
    ("bad_type", 2, "u1,fr,old", "users.csv:2: column 'age': got 'old', expected a number [bad_type]",
     {"u1", "u4"}),
]


@pytest.mark.parametrize("problem,line,new,message,missing", USER_CASES)
def test_users_table_problems_fail_or_skip_like_the_catalog(tmp_path, problem, line, new, message, missing):
    users = _replace_line(USERS, line, new)
    with pytest.raises(DataValidationError) as err:
        load_dataset(_users_spec(tmp_path, users=users, policy={problem: "fail"}))
    assert str(err.value) == message
    data = load_dataset(_users_spec(tmp_path, users=users, policy={problem: "skip"}))
    assert data.report.users.skipped == {problem: 1} and data.report.users.kept == 2
    assert data.report.logs.kept == 4 and data.report.logs.skipped == {}  # log rows are never dropped for it
    assert data.report.users_missing_ids == missing  # a skipped user row makes its user unknown
    if problem == "duplicate_user_id":  # the first row of a user is kept
        assert data.logs.set_index("user_id").loc["u1", "country"] == "fr"
    assert f"e.g. {message}" in data.report.format()


def test_users_table_missing_column_and_no_rows_are_named_errors(tmp_path):
    with pytest.raises(DataValidationError) as err:
        load_dataset(_users_spec(tmp_path, users=USERS.replace("country", "land")))
    assert str(err.value) == ("users.csv:1: missing column(s) 'country' (user_categoricals); found columns "
                              "['uid', 'land', 'age'] [missing_column]")
    with pytest.raises(DataValidationError, match=r"^users: the file\(s\) \['users.csv'\] hold no data rows$"):
        load_dataset(_users_spec(tmp_path, users="uid,country,age\n"))


def test_users_table_spec_errors(tmp_path):
    base = {"logs": {"files": ["x"]}, "catalog": {"files": ["y"]},
            "columns": {"labels": {"click": "c"}, "ad_text": ["t"]}}
    with pytest.raises(DataSpecError, match=r"spec.columns.users_user_id: names a users table column, but "
                                            r"`users.files` names no users table"):
        spec_from_dict({**base, "columns": {**base["columns"], "users_user_id": "id"}})
    with pytest.raises(DataSpecError, match=r"spec.users: a users table is given but columns.user_categoricals"):
        spec_from_dict({**base, "users": {"files": ["u.csv"]}})
    with pytest.raises(DataSpecError, match=r"spec.users.format: expected one of \['auto', 'csv', 'parquet'\]"):
        spec_from_dict({**base, "users": {"files": ["u.csv"], "format": "mind_behaviors"},
                        "columns": {**base["columns"], "user_categoricals": ["g"]}})
    with pytest.raises(DataSpecError, match=r"spec.users: unknown key\(s\) \['file'\]"):
        spec_from_dict({**base, "users": {"file": ["u.csv"]}})


def test_implicit_labels_make_every_row_a_positive(tmp_path):
    logs = "user,ad,ts\nu1,a1,1700000000\nu2,a2,1700000100\nu1,a3,1700000200\n"
    (tmp_path / "logs.csv").write_text(logs)
    (tmp_path / "catalog.csv").write_text(CATALOG)
    columns = {k: v for k, v in COLUMNS.items() if k != "position"}
    raw = {"logs": {"files": ["logs.csv"]}, "catalog": {"files": ["catalog.csv"]},
           "columns": {**columns, "labels": {"implicit": True}}}
    data = load_dataset(spec_from_dict(raw, base_dir=tmp_path))
    assert data.logs["click"].tolist() == [1.0, 1.0, 1.0] and data.logs["click"].dtype == np.float32
    assert "rating" not in data.logs and data.schema.extra["labels"] == "implicit"
    with pytest.raises(DataSpecError, match=r"give exactly one of `click` or `rating` \(\+ `threshold`\), "
                                            r"or `implicit: true`"):
        spec_from_dict({**raw, "columns": {**columns, "labels": {"click": "clicked", "implicit": True}}})
