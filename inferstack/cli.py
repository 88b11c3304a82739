"""``inferstack`` console script: run the API, a worker, or the whole stack locally."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="run the OpenAI-compatible API (INFERSTACK_HOST/PORT)")
    sub.add_parser("worker", help="run a worker (INFERSTACK_WORKER_MODELS, INFERSTACK_DEVICE)")
    sub.add_parser("host", help="supervise this host's workers: one per device, or a tensor-parallel group "
                   "(INFERSTACK_HOST_DEVICES, INFERSTACK_HOST_MODE); takes mode changes from the admin API")
    mode = sub.add_parser("mode", help="switch a host between individual workers and a tensor-parallel group "
                          "(admin API: INFERSTACK_API_URL, INFERSTACK_ADMIN_KEY)")
    mode.add_argument("host", help="host id (see `inferstack workers`)")
    mode.add_argument("mode", choices=["individual", "tp"])
    mode.add_argument("--model", help="tp: the model the group serves")
    mode.add_argument("--size", type=int, help="tp: devices in the group (default: the registry's tensor_parallel, "
                      "at least 2)")
    mode.add_argument("--no-wait", action="store_true", help="queue the change and return")
    mode.add_argument("--api", help="API URL (default $INFERSTACK_API_URL or the local API)")
    wk = sub.add_parser("workers", help="hosts and workers with their mode, devices and models (admin API)")
    wk.add_argument("--api", help="API URL (default $INFERSTACK_API_URL or the local API)")
    sub.add_parser("exporter", help="run the metrics exporter (lifecycle events -> ClickHouse, or chDB locally)")
    st = sub.add_parser("stats", help="per model and per tenant stats over a window, from the metrics store")
    st.add_argument("--window", default="1h", help="e.g. 90s, 15m, 1h, 7d (default 1h)")
    st.add_argument("--model", default="", help="only this model")
    st.add_argument("--json", action="store_true", help="print JSON instead of tables")
    up = sub.add_parser("up", help="run Redis (unless REDIS_URL), the API, one worker and the exporter on this machine")
    up.add_argument("--port", type=int, default=None, help="API port (default $PORT or 8000)")
    prep = sub.add_parser("prepare", help="convert/locate model weights now (with progress)")
    prep.add_argument("models", nargs="*", help="registry names (default: the worker's models)")
    hk = sub.add_parser("hash-key", help="print the sha256 form of an API key for the keys file")
    hk.add_argument("key")
    args = parser.parse_args(argv)

    if args.command == "api":
        from api.app import main as api_main

        api_main()
    elif args.command == "worker":
        from gpu_worker.worker import main as worker_main

        worker_main()
    elif args.command == "host":
        from inferstack.host import main as host_main

        host_main()
    elif args.command == "mode":
        from inferstack.admin import change_mode

        sys.exit(change_mode(args.host, args.mode, args.model, args.size, wait=not args.no_wait, url=args.api))
    elif args.command == "workers":
        from inferstack.admin import show_workers

        sys.exit(show_workers(args.api))
    elif args.command == "exporter":
        from metrics.exporter import main as exporter_main

        exporter_main()
    elif args.command == "stats":
        sys.exit(print_stats(args.window, args.model, args.json))
    elif args.command == "up":
        from inferstack.local import run_local

        sys.exit(run_local(port=args.port))
    elif args.command == "prepare":
        from inferstack.local import prepare

        sys.exit(0 if prepare(args.models) else 1)
    elif args.command == "hash-key":
        from api.auth import hash_key

        print(hash_key(args.key))


def print_stats(window: str, model: str, as_json: bool) -> int:
    import json

    from metrics import stats
    from metrics.settings import StoreSettings
    from metrics.store import open_store

    try:
        window_s = stats.parse_window(window)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    settings = StoreSettings()
    if not settings.clickhouse_url and not settings.chdb_dir.exists():
        print(f"no metrics yet: {settings.chdb_dir} does not exist. Start the stack with `make run` (it runs the "
              "exporter), or set INFERSTACK_CLICKHOUSE_URL / INFERSTACK_CHDB_PATH.", file=sys.stderr)
        return 1
    store = open_store(settings)
    try:
        report = stats.stats(store, window_s, model=model)
    finally:
        store.close()
    print(json.dumps(report, indent=2) if as_json else stats.render(report))
    return 0


if __name__ == "__main__":
    main()
