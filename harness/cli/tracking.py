"""`mimo registry promote|show` and `mimo tracking replay`: the model registry and offline runs."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone


def register(subparsers) -> None:
    uri_help = (
        "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default sqlite:///mlflow.db)"
    )

    registry = subparsers.add_parser("registry", help="registered models: show versions, promote a champion")
    reg_sub = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    promote = reg_sub.add_parser("promote", help="give VERSION of NAME the `champion` alias")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--tracking-uri", help=uri_help)
    promote.set_defaults(func=_promote)
    show = reg_sub.add_parser("show", help="list the versions of NAME: aliases, val and test PSNR, run")
    show.add_argument("name")
    show.add_argument("--tracking-uri", help=uri_help)
    show.set_defaults(func=_show)

    tracking = subparsers.add_parser("tracking", help="MLflow tracking utilities")
    trk_sub = tracking.add_subparsers(dest="tracking_command", metavar="ACTION", required=True)
    replay = trk_sub.add_parser(
        "replay",
        help="send records a run could not send (RUN_DIR/mlflow-offline.jsonl) to the tracking server",
    )
    replay.add_argument("path", metavar="RUN_DIR|FILE")
    replay.add_argument("--tracking-uri", help=uri_help + "; else the URI recorded in the file")
    replay.set_defaults(func=_replay)


def _promote(args: argparse.Namespace) -> int:
    from harness.tracking import CHAMPION, promote

    promote(args.name, args.version, args.tracking_uri)
    print(f"{args.name} version {args.version} is now @{CHAMPION} (models:/{args.name}@{CHAMPION})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from harness.tracking import PSNR_TAG, TEST_PSNR_TAG, registry_rows

    rows = registry_rows(args.name, args.tracking_uri)
    print(f"{'version':>7}  {'val PSNR':>9}  {'aliases':<12}  {'test PSNR':>9}  {'created (UTC)':<19}  run")
    for row in rows:
        created = datetime.fromtimestamp(row["created"] / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        val, test = (f"{row[k]:.3f}" if row[k] == row[k] else "-" for k in (PSNR_TAG, TEST_PSNR_TAG))
        aliases = ",".join(row["aliases"]) or "-"
        print(f"{row['version']:>7}  {val:>9}  {aliases:<12}  {test:>9}  {created:<19}  {row['run_id'] or '-'}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from harness.tracking import redact, replay

    run_id = replay(args.path, args.tracking_uri)
    import mlflow

    uri = args.tracking_uri or mlflow.get_tracking_uri()
    print(f"replayed into run {run_id} at {redact(uri)}")
    return 0
