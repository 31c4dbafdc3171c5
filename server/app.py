"""Build and run the grpc.aio server: services, health, reflection, auth, TLS, metrics, signal drain."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.client.v1 import generation_pb2_grpc as pb_grpc
from tokenwire.server.auth import BearerTokenInterceptor, load_token
from tokenwire.server.logging import RequestLog, get_logger
from tokenwire.server.metrics import MetricsHTTPServer, ServerMetrics
from tokenwire.server.servicer import GenerationServicer
from tokenwire.server.settings import Settings
from tokenwire.server.tls import server_credentials

if TYPE_CHECKING:
    from tokenwire.engine.async_engine import AsyncEngine

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
# Health names that report readiness: NOT_SERVING until the model is loaded and while draining.
READINESS_SERVICES = ("", GENERATION_SERVICE)
# Health name that reports only that the process answers (Kubernetes liveness): SERVING from start
# to exit, so a slow model load or a drain never gets the pod restarted.
LIVENESS_SERVICE = "liveness"

# Keepalive: the server pings idle connections to find dead peers (and abort their requests), and
# lets clients ping as often as every 10 s without GOAWAY "too_many_pings".
_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)
# Seconds in-flight calls get after the drain, before the server cancels them.
_STOP_GRACE_S = 1.0
# How often the watchdog checks that the engine loop is alive.
_WATCHDOG_INTERVAL_S = 1.0

_log = get_logger("tokenwire.server")
_T = TypeVar("_T")


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """Channel arguments of the gRPC server."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_size),
        ("grpc.max_receive_message_length", settings.max_message_size),
        # NOTE: gRPC sets SO_REUSEPORT by default, which lets a second server bind a busy port
        # and silently take half its connections; fail loudly instead.
        ("grpc.so_reuseport", 0),
        *_KEEPALIVE_OPTIONS,
    ]
    if settings.max_connection_age is not None:
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)))
    if settings.max_connection_age_grace is not None:
        options.append(("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)))
    return options


class TokenwireServer:
    """The gRPC server with its health, reflection, metrics endpoint and engine.

    Typical life: ``await start()`` (listening, health NOT_SERVING), ``await load_engine()``
    (SERVING), then ``await drain()`` and ``await close()``.

    Args:
        settings: validated settings.
        engine: an engine already started on this event loop (tests, embedding); None loads one
            from ``settings`` in `load_engine`. A given engine is not shut down by `close`.
    """

    def __init__(self, settings: Settings, engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self._owns_engine = engine is None
        self._request_log = RequestLog(log_content=settings.log_requests_content)
        # NOTE: the metrics read engine stats through the servicer, which attaches the engine later.
        self.metrics = ServerMetrics(lambda: self.servicer.engine_stats())
        self.servicer = GenerationServicer(self._request_log, self.metrics, max_calls=settings.max_concurrent_rpcs)
        self.health = health.aio.HealthServicer()
        self._pending_engine = engine
        self._server: aio.Server | None = None
        self._metrics_http: MetricsHTTPServer | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def metrics_port(self) -> int | None:
        """The bound Prometheus port, or None when metrics are off."""
        return None if self._metrics_http is None else self._metrics_http.port

    async def start(self) -> None:
        """Listen, with health NOT_SERVING until `load_engine` finishes.

        Raises:
            ValueError: TLS or token files are unusable.
            RuntimeError: the gRPC address cannot be bound.
            OSError: the metrics port cannot be bound.
        """
        settings = self.settings
        token = load_token(settings.auth_token, settings.auth_token_file)
        interceptors = [BearerTokenInterceptor(token)] if token is not None else []
        # NOTE: max_concurrent_rpcs is the servicer's to count (health and reflection stay free).
        server = aio.server(interceptors=interceptors, options=server_options(settings))
        pb_grpc.add_GenerationServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        address = settings.address
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0 and settings.unix_socket is None:
            raise RuntimeError(f"cannot listen on {address}")
        if settings.metrics_port:
            self._metrics_http = MetricsHTTPServer(self.metrics.registry, settings.metrics_host, settings.metrics_port)
        await server.start()
        self._server = server
        self.port = port if settings.unix_socket is None else None
        _log.info(
            "listening",
            address=address if settings.unix_socket is not None else f"{settings.host}:{port}",
            tls=settings.tls_cert is not None,
            mtls=settings.tls_client_ca is not None,
            auth=token is not None,
            metrics_port=self.metrics_port,
        )

    async def load_engine(self) -> None:
        """Load the model (unless an engine was given), start it, and report SERVING."""
        engine = self._pending_engine
        if engine is None:
            from tokenwire.engine.async_engine import AsyncEngine
            from tokenwire.engine.loader import load_model

            args = self.settings.engine_args()
            _log.info("loading model", model=args.model or "default", dtype=args.dtype, device=args.device)
            # NOTE: the weights load in a worker thread (seconds; health keeps answering meanwhile).
            # Building the engine around them (allocating the KV pool) takes well under a second.
            loaded = await _in_daemon_thread(lambda: load_model(args.model, dtype=args.dtype, device=args.device))
            engine = AsyncEngine(args, loaded=loaded)
            await engine.start()
        self._pending_engine = None
        self.servicer.attach_engine(engine)
        info = engine.model_info
        _log.info(
            "model ready",
            model=info.model_name,
            architecture=info.architecture,
            dtype=info.dtype,
            kv_cache_dtype=info.kv_cache_dtype,
            device=info.device,
            kv_blocks_total=info.kv_blocks_total,
            max_context_length=info.max_context_length,
        )
        if not self.servicer.draining:
            await self._set_readiness(health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.create_task(self._watch_engine(engine), name="tokenwire-watchdog")

    async def drain(self, grace_period: float | None = None, interrupt: asyncio.Event | None = None) -> bool:
        """Stop taking work, let open requests finish, then stop the gRPC server.

        Health turns NOT_SERVING and new streams, requests and calls get UNAVAILABLE at once. Open
        requests get ``grace_period`` seconds (the setting by default); whatever is still open
        then ends with an in-band UNAVAILABLE error.

        Args:
            grace_period: seconds to wait for open requests.
            interrupt: end the wait early when set (a second SIGTERM/SIGINT).

        Returns:
            True if every open request finished within the grace period.
        """
        grace = self.settings.grace_period if grace_period is None else grace_period
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        open_requests = self.servicer.num_open_requests
        _log.info("draining", open_requests=open_requests, grace_period_s=grace)
        self.servicer.begin_drain()
        finished = await self.servicer.wait_streams_closed(grace, interrupt)
        if not finished:
            _log.warning("grace period over; aborting open requests", open_requests=self.servicer.num_open_requests)
            self.servicer.abort_all()
            await self.servicer.wait_streams_closed(_STOP_GRACE_S)
        if self._server is not None:
            await self._server.stop(_STOP_GRACE_S)
        return finished

    async def close(self) -> None:
        """Stop everything this server started (the engine only if it loaded it itself)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
        if self._metrics_http is not None:
            self._metrics_http.close()
            self._metrics_http = None
        engine = self.servicer.engine
        if engine is not None and self._owns_engine:
            await engine.shutdown()

    async def _set_readiness(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in READINESS_SERVICES:
            await self.health.set(name, status)

    async def _watch_engine(self, engine: AsyncEngine) -> None:
        """Report NOT_SERVING everywhere, liveness included, if the engine loop dies."""
        while engine.is_running:
            await asyncio.sleep(_WATCHDOG_INTERVAL_S)
        if self._server is None:
            return
        _log.error("engine loop stopped; reporting NOT_SERVING so the process gets replaced")
        await self._set_readiness(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)


async def serve(settings: Settings, on_started: Callable[[TokenwireServer], None] | None = None) -> int:
    """Run a server until SIGTERM or SIGINT, then drain it; the process's exit status.

    A first signal drains (open requests get the grace period); a second one cuts the wait short.
    """
    server = TokenwireServer(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            _log.warning("second signal: aborting open requests now", signal=signal.Signals(signum).name)
            hurry.set()
        else:
            _log.info("signal received: draining", signal=signal.Signals(signum).name)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            await server.start()
        except (ValueError, RuntimeError, OSError) as exc:
            _log.error("cannot start", error=str(exc))
            return 1
        if on_started is not None:
            on_started(server)
        loading = asyncio.create_task(server.load_engine())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            _log.error("cannot load the model", error=str(loading.exception()))
            stopping.cancel()
            return 1
        await stopping
        await server.drain(interrupt=hurry)
        loading.cancel()
        _log.info("stopped")
        return 0
    finally:
        await server.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run(settings: Settings) -> int:
    """Serve in a fresh event loop (the CLI's entry); the process's exit status."""
    return asyncio.run(serve(settings))


async def _in_daemon_thread(fn: Callable[[], _T]) -> _T:
    """Run a blocking call in a daemon thread (a model load must not hold up the process's exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def work() -> None:
        result: _T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:
            pass  # NOTE: the loop closed while loading (the server stopped first); nobody waits.

    threading.Thread(target=work, name="tokenwire-load", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[_T], result: _T | None, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]

