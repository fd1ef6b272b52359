"""`meshproxy proxy|control-plane|runtime|demo|check-config`; bad config exits 64 before any port is bound."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import yaml

from meshproxy.config import EXIT_CONFIG, ConfigError, load_file, load_text, read_file

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshproxy", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("proxy", help="run the proxy")
    p.add_argument("-c", "--config", required=True, help="YAML bootstrap file")
    p.add_argument("--workers", type=_positive, metavar="N",
                   help="processes sharing the listeners (SO_REUSEPORT); default one per core")

    p = sub.add_parser("control-plane", help="run the control plane (ADS server, discovery)")
    p.add_argument("-c", "--config", required=True, help="YAML ControlPlaneConfig file")

    p = sub.add_parser("check-config", help="validate a proxy config file (exit 0 or 64)")
    p.add_argument("file")

    runtime_parser = p = sub.add_parser("runtime", help="run the devtools KServe v2 runtime")
    from meshproxy.devtools import options as runtime_options
    runtime_options.add_arguments(p)

    p = sub.add_parser("demo", help="three runtimes and a proxy, a few requests, a table")
    p.add_argument("--once", action="store_true", help="exit after printing the table")
    p.add_argument("--control-plane", action="store_true",
                   help="with a control plane: discovery, a model loaded live")

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "proxy":
        return _proxy(args.config, args.workers)
    if args.command == "control-plane":
        return _control_plane(args.config)
    if args.command == "runtime":
        from meshproxy.devtools import runtime as devruntime
        return _run(devruntime.serve(runtime_options.options_from_args(args, runtime_parser)))
    if args.control_plane:
        from meshproxy.control import demo as cp_demo
        return _run(cp_demo.run(once=args.once))
    from meshproxy.devtools import demo
    return _run(demo.run(once=args.once))


def _check_config(path: str) -> int:
    """Validate a proxy bootstrap, or a control-plane config when its top-level keys say so."""
    from meshproxy.control import config as cp_config
    try:
        text = read_file(path)
        if _is_control_plane(text):
            settings = cp_config.load_text(text, source=path)
            print(f"{path}: ok (control plane: {len(settings.runtimes)} runtimes, "
                  f"{len(settings.routes)} routes, {len(settings.discovered)} discovered)")
            return 0
        config = load_text(text, source=path)
    except ConfigError as e:
        print(f"meshproxy: invalid config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok ({len(config.runtimes)} runtimes, {len(config.routes)} routes)")
    return 0


def _is_control_plane(text: str) -> bool:
    """Whether every top-level key is a ControlPlaneConfig field and some key is not a
    Bootstrap field (so a file that fits neither is checked, and reported, as a proxy's)."""
    from meshproxy._proto.meshproxy.v1 import bootstrap_pb2, control_plane_pb2
    from meshproxy.config import load_yaml
    try:
        data = load_yaml(text)
    except (yaml.YAMLError, RecursionError):
        return False
    if not isinstance(data, dict) or not data:
        return False

    def names(message) -> set[str]:
        return {n for f in message.DESCRIPTOR.fields for n in (f.name, f.json_name)}

    keys = set(map(str, data))
    return keys <= names(control_plane_pb2.ControlPlaneConfig) and \
        not keys <= names(bootstrap_pb2.Bootstrap)


def _proxy(path: str, workers: int | None = None) -> int:
    # Held from here until the stop handlers are installed (serve_proxy, or the workers'
    # parent): a SIGTERM that comes while the proxy starts waits for them, then stops it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        config = load_file(path)
    except ConfigError as e:
        print(f"meshproxy: invalid config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from meshproxy import workers as worker_procs
    count = workers or worker_procs.default_count()
    if count > 1:
        return worker_procs.supervise(path, config, count)
    return _run(serve_proxy(config, path))


async def serve_proxy(config, path: str, reuse_port: bool = False, announce=None) -> None:
    """One proxy process until SIGTERM/SIGINT; its ready line goes to `announce` (stdout).

    A signal while it starts stops it as soon as it has started, without a ready line."""
    stop = _stop_event()
    from meshproxy.app import ProxyApp
    app = ProxyApp(config, config_path=path)
    app.reuse_port = reuse_port
    try:
        await app.start()
    except OSError as e:
        raise SystemExit(f"meshproxy: cannot listen: {e}") from None
    try:
        grpc_at = (f"{config.grpc_address.host}:{app.grpc_port}"
                   if config.grpc_address is not None else "disabled")
        ports = (f"rest={config.http_address.host}:{app.http_port} "
                 f"admin={config.admin_address.host}:{app.admin_port} grpc={grpc_at}")
        if announce is not None:  # the workers' parent spawns the others on these ports
            print(f"meshproxy bound {ports}", file=announce, flush=True)
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait((stopped, app.opened), return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            try:
                app.opened.result()  # listening, with a table or after initial_fetch_timeout
            except OSError as e:
                raise SystemExit(f"meshproxy: cannot listen: {e}") from None
            print(f"meshproxy ready {ports}", file=announce or sys.stdout, flush=True)
            await stopped
        stopped.cancel()
    finally:
        await app.stop()


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _control_plane(path: str) -> int:
    from meshproxy.control import config as cp_config
    try:
        settings = cp_config.load_file(path)
    except ConfigError as e:
        print(f"meshproxy: invalid control-plane config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from meshproxy.control.app import ControlPlaneApp

    async def serve() -> None:
        stop = _stop_event()
        app = ControlPlaneApp(settings, path)
        try:
            await app.start()
        except OSError as e:
            raise SystemExit(f"meshproxy: cannot listen: {e}") from None
        try:
            if not stop.is_set():
                print(f"meshproxy control-plane ready grpc={settings.grpc_address.host}:"
                      f"{app.grpc_port} admin={settings.admin_address.host}:{app.admin_port}",
                      flush=True)
                await stop.wait()
        finally:
            await app.stop()

    return _run(serve())


def on_stop_signals(callback) -> None:
    """`callback(signo)` on SIGTERM or SIGINT from now on; one held back while the process
    started (`_proxy` blocks them; workers.py starts workers with them blocked) comes now."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _stop_event() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets, from now on."""
    stop = asyncio.Event()
    on_stop_signals(lambda _sig: stop.set())
    return stop


def _run(coro) -> int:
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep asyncio as a fallback
        runner = asyncio.run
    try:
        runner(coro)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
