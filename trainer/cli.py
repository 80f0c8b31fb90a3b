"""`adrec`: one command for every job (data, train, evaluate, serve, recommend, demo).

A user's mistake (bad config, missing file, unreachable server) prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from trainer.demo import run_demo
    from trainer.task import resolve_config

    run_demo(resolve_config(args), n_users=args.users, k=args.k, progress=not args.quiet)
    return 0


def _cmd_train(args) -> int:
    """stdout holds only the metrics JSON; logs, progress bars and the data report go to stderr."""
    from trainer.demo import format_ranking_metrics
    from trainer.progress import stdout_to_stderr
    from trainer.task import resolve_config, train_and_export, write_metrics

    cfg = resolve_config(args)
    with stdout_to_stderr():
        trained, _ = train_and_export(cfg, export=not args.no_export, progress=not args.quiet,
                                      warm_start=args.warm_start)
    print("\n".join(format_ranking_metrics(trained.metrics["ranking"])), file=sys.stderr)
    if args.metrics_out:
        write_metrics(args.metrics_out, trained.metrics)
    print(json.dumps(trained.metrics, indent=2))
    return 0


def _cmd_evaluate(args) -> int:
    from trainer.report import load_job, write_report

    trained = load_job(args.model_dir)
    if args.report:
        metrics = write_report(trained, args.report, source=str(args.model_dir))
        print(f"report written to {Path(args.report) / 'index.html'}", file=sys.stderr)
    else:
        from trainer.report import evaluate

        metrics = evaluate(trained).metrics
    from trainer.demo import format_ranking_metrics

    print("\n".join(format_ranking_metrics(metrics["ranking"])), file=sys.stderr)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_serve(args) -> int:
    from serving import server

    return server.run(args)


def _parse_features(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"feature {pair!r} is not KEY=VALUE")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _cmd_recommend(args) -> int:
    from serving.client import RecommendationClient

    features = _parse_features(args.feature)
    features["user_id"] = args.user
    from serving.client import RetryPolicy

    with RecommendationClient(args.address, model_name=args.model, timeout=args.timeout,
                              root_certificates=args.root_cert, server_name=args.server_name,
                              retry=RetryPolicy(max_attempts=args.attempts)) as client:
        frame = client.recommend_df(features, {}, k=args.k, history=args.history, exclude=args.exclude)
    print(frame.to_string(index=False))
    return 0


def _cmd_data_synthetic(args) -> int:
    from features.synthetic import generate_world
    from trainer.task import resolve_config

    cfg = resolve_config(args)
    world = generate_world(cfg.data.synthetic)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    synthetic.set_defaults(func=_cmd_data_synthetic)
    for name, func, text in (("validate", _cmd_data_validate, "read and check logs + catalog; report skips"),
                             ("describe", _cmd_data_describe, "counts, cardinalities, label rates, text lengths")):
        cmd = data_sub.add_parser(name, help=text)
        cmd.add_argument("spec", help="data spec (YAML), e.g. configs/data/ml-latest-small.yaml")
        cmd.add_argument("--root", help="data directory, overriding the spec's root")
        cmd.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from trainer.task import add_arguments

    parser = argparse.ArgumentParser(prog="adrec", description="personalized ad recommendation")
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

    from serving.server import add_arguments as add_server_arguments

    serve = sub.add_parser("serve", help="serve exported models over TF Serving's gRPC API")
    add_server_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    rec = sub.add_parser("recommend", help="ask a running server for a user's ads")
    rec.add_argument("--address", default="127.0.0.1:8500")
    rec.add_argument("--model", default="recommender")
    rec.add_argument("--user", required=True, help="user id")
    rec.add_argument("--feature", action="append", default=[], metavar="KEY=VALUE",
                     help="user or context feature, e.g. device=mobile hour=20 (repeatable)")
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--history", action="append", default=[], metavar="AD_ID",
                     help="an ad the user recently clicked, most recent first (repeatable)")
    rec.add_argument("--exclude", action="append", default=[], metavar="AD_ID",
                     help="an ad id not to return (already shown, capped; repeatable)")
    rec.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds, retries included")
    rec.add_argument("--attempts", type=int, default=4, help="attempts when the server is UNAVAILABLE")
    rec.add_argument("--root-cert", type=Path, help="CA / server certificate (PEM): connect with TLS")
    rec.add_argument("--server-name", help="name to verify in the server certificate (default: the host)")
    rec.set_defaults(func=_cmd_recommend)

    _add_data_parser(sub)
    return parser


def main(argv=None) -> int:
    import grpc

    from features.readers import DataReadError
    from features.schema import SchemaError
    from features.spec import DataSpecError
    from features.text import EncoderNotFoundError
    from features.validate import DataValidationError
    from serving.client import RequestError
    from serving.servable import ServableError
    from trainer.config import ConfigError
    from trainer.export import ExportError
    from trainer.prepare import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, DataSpecError, DataReadError, DataValidationError, SchemaError,
            EncoderNotFoundError, ExportError, ServableError,
            RequestError, ValueError, FileNotFoundError) as err:
        if isinstance(err, DataValidationError) and err.report is not None and err.problem is None:
            print(err.report.format(), file=sys.stderr)
        print(f"adrec {args.command}: error: {err}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"adrec {args.command}: error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
