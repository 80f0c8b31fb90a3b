"""`adrec`: one command for every job (data, train, evaluate, serve, recommend, demo, forget).

A user's mistake (bad config, missing file, unreachable server) prints one line and exits 1.
Results go to stdout, logs and progress to stderr (`trainer/progress.py`). Parsing the arguments
imports nothing heavy: each command imports what it needs, and the commands that load TensorFlow
first set the quiet defaults (`trainer/quiet.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """TensorFlow's own log lines are off by default; TF_CPP_MIN_LOG_LEVEL=0 adrec ... shows them.
Results go to stdout; logs and progress to stderr (--quiet: no progress)."""

# Commands that run TensorFlow: quiet defaults are set and TensorFlow imported before they start.
TF_COMMANDS = ("demo", "train", "evaluate", "serve", "continuous")

# A user's mistake: one line on stderr, exit 1. Named (module, class): a class can only be raised
# once its module is imported, so `main` never imports a module just to catch its errors.
USER_ERRORS = (
    ("trainer.config", "ConfigError"), ("trainer.prepare", "DataError"), ("features.spec", "DataSpecError"),
    ("features.readers", "DataReadError"), ("features.validate", "DataValidationError"),
    ("features.schema", "SchemaError"), ("features.text", "EncoderNotFoundError"),
    ("trainer.export", "ExportError"), ("serving.servable", "ServableError"), ("serving.client", "RequestError"),
    ("features.partitions", "PartitionError"), ("trainer.forget", "ForgetError"),
)


def _cmd_demo(args) -> int:
    from trainer.demo import run_demo
    from trainer.task import resolve_config

    run_demo(resolve_config(args), n_users=args.users, k=args.k, progress=not args.quiet)
    return 0


def _cmd_train(args) -> int:
    """stdout holds only the metrics JSON; logs, progress bars and the data report go to stderr."""
    from trainer.demo import format_ranking_metrics
    from trainer.progress import log, stdout_to_stderr
    from trainer.task import resolve_config, train_and_export, write_metrics

    cfg = resolve_config(args)
    with stdout_to_stderr():
        trained, _ = train_and_export(cfg, export=not args.no_export, progress=not args.quiet,
                                      warm_start=args.warm_start)
    if "skipped" not in trained.metrics["ranking"]:
        log("\n".join(format_ranking_metrics(trained.metrics["ranking"])))
    if args.metrics_out:
        write_metrics(args.metrics_out, trained.metrics)
    print(json.dumps(trained.metrics, indent=2))
    return 0


def _cmd_continuous(args) -> int:
    """One JSON line per day on stdout (its decision and both metric sets); logs on stderr."""
    from trainer.continuous import run_loop
    from trainer.progress import stdout_to_stderr
    from trainer.task import resolve_config

    cfg = resolve_config(args)
    if args.warm_start or args.no_export:
        raise ValueError("continuous warm-starts from the served version and exports each candidate itself: "
                         "--warm-start and --no-export do not apply")
    if args.interval < 0 or args.max_iterations < 0:
        raise ValueError("--interval and --max-iterations must be >= 0")
    with stdout_to_stderr():
        records = run_loop(cfg, args.logs_dir, once=args.once, interval=args.interval,
                           max_iterations=args.max_iterations, progress=not args.quiet)
    for record in records:
        print(json.dumps(record))
    return 0


def _cmd_rollback(args) -> int:
    from serving.rollback import rollback

    rolled_back, served = rollback(args.export_dir)
    print(f"version {rolled_back} moved to {Path(args.export_dir) / '.rolled_back'}; version {served} is served")
    return 0


def _cmd_forget(args) -> int:
    """Adds the users to the job's forget list; a JSON summary on stdout, the counts on stderr too."""
    from trainer.forget import forget_users, read_users_file
    from trainer.task import resolve_config

    ids = list(args.user)
    for path in args.users_file:
        ids += read_users_file(path)
    added, already, path = forget_users(resolve_config(args), ids)
    print(json.dumps({"added": added, "already_listed": already, "forget_file": str(path)}))
    return 0


def _cmd_evaluate(args) -> int:
    from trainer.demo import format_ranking_metrics
    from trainer.progress import log
    from trainer.report import load_job, write_report

    trained = load_job(args.model_dir)
    if args.report:
        metrics = write_report(trained, args.report, source=str(args.model_dir))
        log(f"report written to {Path(args.report) / 'index.html'}")
    else:
        from trainer.report import evaluate

        metrics = evaluate(trained).metrics
    log("\n".join(format_ranking_metrics(metrics["ranking"])))
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_serve(args, server_args: list[str]) -> int:
    """The server's own flags are parsed here, not in `build_parser`: defining them imports
    `serving.server`, and with it TensorFlow."""
    from serving import server

    parser = argparse.ArgumentParser(prog="adrec serve", description=SERVE_HELP)
    server.add_arguments(parser)
    return server.run(parser.parse_args(server_args))


SERVE_HELP = "serve exported models over TF Serving's gRPC API (adrec serve --help: its flags)"


def _parse_features(pairs: list[str], user: str) -> dict[str, str]:
    """`--feature KEY=VALUE` pairs as text: the client reads each as its input's dtype from the model's
    signature (`region=007` stays "007" for a string input, is 7 for an int64 one; "7.5" is refused)."""
    out = {"user_id": user}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--feature {pair!r} is not KEY=VALUE")
        if key in out:
            raise ValueError(f"--feature {key} is given twice" if key != "user_id" else
                             "--feature user_id: the user is given with --user")
        out[key] = value
    return out


def _cmd_recommend(args) -> int:
    from trainer.quiet import quiet_import

    quiet_import("serving.client")  # should the client load TensorFlow, without its banners
    from serving.client import RecommendationClient, RetryPolicy, ads_frame
    from serving.pseudonym import read_key_file

    features = _parse_features(args.feature, args.user)
    key = read_key_file(args.key_file) if args.key_file else None  # None: $ADREC_PSEUDONYM_KEY when set
    with RecommendationClient(args.address, model_name=args.model, timeout=args.timeout,
                              root_certificates=args.root_cert, server_name=args.server_name,
                              retry=RetryPolicy(max_attempts=args.attempts), pseudonym_key=key) as client:
        ads = client.recommend(features, {}, k=args.k, history=args.history, exclude=args.exclude)
    print(ads_frame(ads).to_string(index=False))
    why = [f"{a.rank:>5}  {a.ad_id}: {a.why()}" for a in ads if a.why()] if args.why else []
    if why:  # after a blank line: the table above reads as without --why
        print("\nwhy:\n" + "\n".join(why))
    return 0


def _cmd_data_synthetic(args) -> int:
    from features.synthetic import generate_world
    from trainer.task import resolve_config

    cfg = resolve_config(args)
    world = generate_world(cfg.data.synthetic)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.by_day:
        from features.partitions import write_partitions

        written = write_partitions(world.catalog, world.logs, out)
        print(f"wrote {len(world.catalog)} ads and {len(world.logs)} impressions in {len(written)} day partitions "
              f"to {out}")
        return 0
    world.catalog.to_parquet(out / "catalog.parquet", index=False)
    world.logs.to_parquet(out / "impressions.parquet", index=False)
    world.users.to_parquet(out / "users.parquet", index=False)
    print(f"wrote {len(world.catalog)} ads, {len(world.logs)} impressions, {len(world.users)} users "
          f"to {out}")
    return 0


def _load_spec_data(args):
    from features.loader import load_dataset
    from features.spec import load_spec

    return load_dataset(load_spec(args.spec, root=args.root))


def _cmd_data_validate(args) -> int:
    print(_load_spec_data(args).report.format())
    return 0


def _cmd_data_describe(args) -> int:
    from features.describe import describe, format_description

    loaded = _load_spec_data(args)
    print(loaded.report.format())
    print(format_description(describe(loaded)))
    return 0


def _add_data_parser(sub) -> None:
    from trainer.task import add_arguments

    data = sub.add_parser("data", help="write the synthetic world; validate or describe real logs")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synthetic = data_sub.add_parser("synthetic", help="write the synthetic world to Parquet files")
    add_arguments(synthetic)
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--by-day", action="store_true", help="catalog.parquet and one YYYY-MM-DD.parquet per "
                           "day of impressions, the layout `adrec continuous --logs-dir` reads")
    synthetic.set_defaults(func=_cmd_data_synthetic)
    for name, func, text in (("validate", _cmd_data_validate, "read and check logs + catalog; report skips"),
                             ("describe", _cmd_data_describe, "counts, cardinalities, label rates, text lengths")):
        cmd = data_sub.add_parser(name, help=text)
        cmd.add_argument("spec", help="data spec (YAML), e.g. configs/data/ml-latest-small.yaml")
        cmd.add_argument("--root", help="data directory, overriding the spec's root")
        cmd.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from trainer.task import add_arguments

    parser = argparse.ArgumentParser(prog="adrec", description="personalized ad recommendation", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="synthetic data -> train -> export -> serve -> recommend")
    add_arguments(demo)
    demo.add_argument("--users", type=int, default=3, help="users to recommend for")
    demo.add_argument("-k", type=int, default=5, help="ads per user")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="train retrieval and ranking, evaluate, export SavedModels; "
                           "prints the metrics JSON on stdout, logs on stderr")
    add_arguments(train)
    train.add_argument("--metrics-out", metavar="FILE", help="also write the metrics JSON to FILE (atomically)")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="re-evaluate a finished job on its held-out split; HTML report")
    evaluate.add_argument("model_dir", help="a job's training.model_dir (config.json, vocabularies.json, "
                          "checkpoints/)")
    evaluate.add_argument("--report", metavar="OUT_DIR", help="write metrics.json, PNG plots and index.html here")
    evaluate.set_defaults(func=_cmd_evaluate)

    # Its flags are the server's (`_cmd_serve` parses them), so `adrec serve --help` goes there too.
    serve = sub.add_parser("serve", help=SERVE_HELP, add_help=False)
    serve.set_defaults(func=_cmd_serve)

    rec = sub.add_parser("recommend", help="ask a running server for a user's ads")
    rec.add_argument("--address", default="127.0.0.1:8500")
    rec.add_argument("--model", default="recommender")
    rec.add_argument("--user", required=True, help="user id")
    rec.add_argument("--feature", action="append", default=[], metavar="KEY=VALUE",
                     help="user or context feature, e.g. device=mobile hour=20 (repeatable)")
    rec.add_argument("-k", type=int, help="ads to return, 1 up to what the model returns (default: all of them, "
                     "its export.recommend_k)")
    rec.add_argument("--history", action="append", default=[], metavar="AD_ID",
                     help="an ad the user recently clicked, most recent first (repeatable)")
    rec.add_argument("--exclude", action="append", default=[], metavar="AD_ID",
                     help="an ad id not to return (already shown, capped; repeatable)")
    rec.add_argument("--why", action="store_true", help="after the table, why each ad: the history ads that raised "
                     "its score ('because you clicked ...') and the feature groups that moved it most")
    rec.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds, retries included")
    rec.add_argument("--attempts", type=int, default=4, help="attempts when the server is UNAVAILABLE")
    rec.add_argument("--root-cert", type=Path, help="CA / server certificate (PEM): connect with TLS")
    rec.add_argument("--server-name", help="name to verify in the server certificate (default: the host)")
    rec.add_argument("--key-file", type=Path, help="the training job's pseudonymisation key (its privacy.key_file): "
                     "the user id is sent as its keyed pseudonym (default: $ADREC_PSEUDONYM_KEY when set, "
                     "else the id as given)")
    rec.set_defaults(func=_cmd_recommend)

    cont = sub.add_parser("continuous", help="train on each new day of logs; publish a version only when it is no "
                          "worse than the served one (docs/training.md#continuous-training)")
    add_arguments(cont)
    cont.add_argument("--logs-dir", required=True, help="catalog.parquet and one YYYY-MM-DD.parquet (or .csv, or "
                      "folder with _SUCCESS) per day")
    cont.add_argument("--once", action="store_true", help="process the partitions there now, then exit")
    cont.add_argument("--interval", type=float, default=60.0, help="seconds between looks at --logs-dir")
    cont.add_argument("--max-iterations", type=int, default=0, help="stop after this many looks (0: never)")
    cont.set_defaults(func=_cmd_continuous)

    back = sub.add_parser("rollback", help="serve the previous version again: the served one is moved to "
                          "EXPORT_DIR/.rolled_back")
    back.add_argument("export_dir", help="the export directory (export.export_dir) holding retrieval/, ranking/, "
                      "recommender/")
    back.set_defaults(func=_cmd_rollback)

    forget = sub.add_parser("forget", help="leave users out of every later training and version "
                            "(docs/data.md#privacy): their keyed pseudonyms go on the job's forget list")
    forget.add_argument("--config", default="configs/demo.yaml", help="job config (YAML): its key and forget list")
    forget.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key, as for train (e.g. privacy.forget_file=...)")
    forget.add_argument("--model-dir", help="override training.model_dir")
    forget.add_argument("--export-dir", help="override export.export_dir")
    forget.add_argument("--user", action="append", default=[], metavar="ID", help="a user id as logged (repeatable)")
    forget.add_argument("--users-file", action="append", default=[], metavar="FILE",
                        help="a file of user ids, one per line (repeatable)")
    forget.set_defaults(func=_cmd_forget, root=None, strategy=None)

    _add_data_parser(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)
    return (*loaded, ValueError, FileNotFoundError)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from trainer.quiet import quiet_environment, quiet_tensorflow

    quiet_environment()  # every command (`recommend` may load TensorFlow through the client)
    if args.command in TF_COMMANDS:
        quiet_tensorflow()
    from trainer.progress import set_progress

    progress = set_progress(not getattr(args, "quiet", False))
    try:
        return args.func(args, extra) if args.command == "serve" else args.func(args)
    except _user_errors() as err:
        validate = sys.modules.get("features.validate")
        if validate and isinstance(err, validate.DataValidationError) and err.report is not None \
                and err.problem is None:
            print(err.report.format(), file=sys.stderr)
        print(f"adrec {args.command}: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        grpc = sys.modules.get("grpc")
        if grpc is None or not isinstance(err, grpc.RpcError):
            raise
        print(f"adrec {args.command}: error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        set_progress(progress)


if __name__ == "__main__":
    sys.exit(main())
