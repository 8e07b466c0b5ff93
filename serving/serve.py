"""``clipllama-serve``: the recognizer as a Ray Serve application (``POST /read``, ``GET /healthz``).

Without ``--address`` a local Ray instance is started on this machine; with it the application
is deployed on a running cluster (every node needs clipllama installed). Stops on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from runtime.cli import EXIT_CANNOT_RUN, EXIT_OK
from serving.common import (
    add_recognizer_options,
    check_recognizer,
    missing_serve_extra,
    one_line,
    settings_from_args,
    stop_on_signals,
)

APP_NAME = "clipllama"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipllama-serve",
                                     description="Serve the recognizer over HTTP with Ray Serve: POST images to "
                                                 "/read (raw body or multipart), GET /healthz.")
    add_recognizer_options(parser)
    group = parser.add_argument_group("deployment")
    group.add_argument("--replicas", type=int, default=1, metavar="N", help="replicas (default: 1)")
    group.add_argument("--num-cpus", type=float, default=1.0, metavar="C", help="CPUs per replica (default: 1)")
    group.add_argument("--num-gpus", type=float, default=0.0, metavar="G",
                       help="GPUs per replica (default: 0; with a GPU the backend picks the GPU backends)")
    group.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                       help="requests batched together per replica (default: 8)")
    group.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                       help="longest wait for a batch to fill (default: 5)")
    group.add_argument("--merge", choices=("width", "request"), default="width",
                       help="how batched requests' images are grouped (default: width; see serving.app)")
    group.add_argument("--detect", action="store_true",
                       help="POST /read takes whole photos: find and read their words (per request: ?detect=0|1; "
                            "needs the detect extra)")
    group.add_argument("--address", metavar="ADDR",
                       help="join a running Ray cluster ('auto' or ray://HOST:10001); default: a local instance")
    group = parser.add_argument_group("HTTP")
    group.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1; 0.0.0.0: all)")
    group.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    group.add_argument("--route-prefix", default="/", help="URL prefix of the routes (default: /)")
    group = parser.add_argument_group("limits")
    group.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body (default: 32 MiB)")
    group.add_argument("--max-images", type=int, default=256, help="most images per request (default: 256)")
    group.add_argument("--max-pixels", type=int, default=4_000_000,
                       help="largest image in pixels, checked before decoding (default: 4000000)")
    return parser


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, the bundle or the LLM, before Ray starts (None: nothing)."""
    if args.replicas < 1 or args.num_cpus <= 0 or args.num_gpus < 0:
        return "--replicas must be at least 1, --num-cpus above 0 and --num-gpus at least 0"
    if args.max_images < 1 or args.max_pixels < 1 or args.max_request_mb <= 0:
        return "the limits must be positive"
    if args.max_batch_size < 1 or args.batch_wait_ms < 0:
        return "--max-batch-size must be at least 1 and --batch-wait-ms at least 0"
    if not 0 < args.port < 65536:
        return f"--port {args.port}: must be within 1-65535"
    problem = check_recognizer(args)
    if problem:
        return problem
    if args.detect:
        from runtime.detect.settings import DetectUnavailable, check_available

        try:
            check_available()
        except DetectUnavailable as exc:
            return f"--detect: {exc}"
    return None


def _drop_log_line(logger_name: str, prefix: str) -> None:
    """Drop one logger's lines that start with ``prefix`` (Ray noise a user cannot act on)."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.getMessage()).startswith(prefix)

    logging.getLogger(logger_name).addFilter(Drop())


def deploy(args: argparse.Namespace) -> str:
    """Start Serve (on the Ray instance already initialised) and deploy; the base URL."""
    from ray import serve

    from serving.app import Batching, Limits, build_app

    limits = Limits(int(args.max_request_mb * 1024 * 1024), args.max_images, args.max_pixels)
    batching = Batching(args.max_batch_size, args.batch_wait_ms / 1000.0, args.merge)
    _drop_log_line("ray.serve", "Connecting to existing Serve app")  # serve.run after our own serve.start
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app(settings_from_args(args), limits, batching, args.replicas, args.num_cpus, args.num_gpus,
                    args.detect)
    serve.run(app, name=APP_NAME, route_prefix=args.route_prefix)
    return f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``clipllama-serve``; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)  # --help works without the serve extra
    except SystemExit as exc:
        return int(exc.code or 0)
    message = missing_serve_extra()
    if message:
        print(message, file=sys.stderr)
        return EXIT_CANNOT_RUN
    problem = check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(include_dashboard=False)
    stop_on_signals()  # after ray.init, which installs its own SIGTERM handler
    try:
        url = deploy(args)
        print(f"clipllama-serve: {args.replicas} replica(s) at {url}/read (health: {url}/healthz); "
              "Ctrl-C stops", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # deployment failed inside Ray: its root cause, in one line
        print(f"error: the deployment failed: {one_line(exc)}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    finally:
        if args.address:  # a cluster keeps running: only this application goes
            serve.delete(APP_NAME)
        # a local instance goes whole with ray.shutdown (serve.shutdown first only made the
        # raylet report its controller's own exit as a failed task)
        ray.shutdown()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
