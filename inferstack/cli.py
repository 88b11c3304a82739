"""``inferstack`` console script: run the API, a worker, or the whole stack locally."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inferstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="run the OpenAI-compatible API (INFERSTACK_HOST/PORT)")
    sub.add_parser("worker", help="run a worker (INFERSTACK_WORKER_MODELS, INFERSTACK_DEVICE)")
    up = sub.add_parser("up", help="run Redis (unless REDIS_URL), the API and one worker on this machine")
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
    elif args.command == "up":
        from inferstack.local import run_local

        sys.exit(run_local(port=args.port))
    elif args.command == "prepare":
        from inferstack.local import prepare

        sys.exit(0 if prepare(args.models) else 1)
    elif args.command == "hash-key":
        from api.auth import hash_key

        print(hash_key(args.key))


if __name__ == "__main__":
    main()
