"""The SDK and CLI against real servers (`python -m tokenwire.server`, default model) on loopback.

Three server processes start once for the module, in parallel: replicas with mutual TLS and a
bearer token (the third admits one sequence and queues two, to make requests wait). Tests read
each server's Prometheus endpoint to see what happened on its side.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tokenwire.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    FinishReason,
    HealthStatus,
    InvalidArgumentError,
    ResourceExhaustedError,
    RetryPolicy,
    TLSConfig,
    UnauthenticatedError,
    UnavailableError,
)
from tokenwire.client.cli import EXIT_AUTH, EXIT_OK, main

pytestmark = pytest.mark.slow

TOKEN = "client-test-token"
READY_TIMEOUT_S = 300.0
SHORT = {"max_tokens": 4, "ignore_eos": True, "temperature": 0.0}
LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0.0}
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """One `python -m tokenwire.server` on 127.0.0.1, with its metrics endpoint."""

    name: str
    extra_args: list[str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            sys.executable, "-m", "tokenwire.server", "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port), "--kv-cache-memory", "64MiB",
            "--log-format", "json", "--log-level", "warning", "--grace-period", "1", *self.extra_args,
        ]
        log = (self.log_dir / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "tokenwire_kv_cache_blocks_total" not in self.scrape(quiet=True):
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.log_dir / f"{self.name}.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"server {self.name} did not become ready:\n{tail}")
            time.sleep(0.25)

    def scrape(self, quiet: bool = False) -> dict[str, float]:
        """The metrics endpoint as {'name{labels}': value}."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            if quiet:
                return {}
            raise
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def metric(self, key: str) -> float:
        return self.scrape().get(key, 0.0)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


async def async_wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path]) -> Iterator[dict[str, ServerProcess]]:
    """r1, r2, r3: mTLS and a bearer token; r3 runs one sequence at a time and queues two more."""
    logs = tmp_path_factory.mktemp("server-logs")
    common = ["--auth-token", TOKEN, "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
              "--tls-client-ca", str(certs["ca.pem"])]
    procs = {
        "r1": ServerProcess("r1", common, logs),
        "r2": ServerProcess("r2", common, logs),
        "r3": ServerProcess("r3", [*common, "--max-num-seqs", "1", "--max-queued-requests", "2"], logs),
    }
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def client_tls(certs: dict[str, Path], **overrides: object) -> TLSConfig:
    fields: dict[str, object] = {
        "ca_cert": certs["ca.pem"], "client_cert": certs["client.pem"], "client_key": certs["client.key"],
    }
    fields.update(overrides)
    return TLSConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def options(certs: dict[str, Path]) -> dict[str, object]:
    """Client options that the servers accept: the token and a client certificate."""
    return {"token": TOKEN, "tls": client_tls(certs), "timeout": 120.0}


def test_streaming_matches_complete_and_tokens_match_text(
    servers: dict[str, ServerProcess], options: dict[str, object]
) -> None:
    with Client(servers["r1"].target, **options) as client:  # type: ignore[arg-type]
        info = client.model_info()
        assert info.architecture == "llama" and info.has_chat_template
        assert client.health() is HealthStatus.SERVING
        prompt = "The capital of France is"
        chunks = list(client.generate(prompt, max_tokens=6, temperature=0.0, logprobs=True))
        completion = client.complete(prompt, max_tokens=6, temperature=0.0)
        assert "".join(c.text for c in chunks) == completion.text
        assert [t for c in chunks for t in c.token_ids] == list(completion.token_ids)
        assert len([lp for c in chunks for lp in c.logprobs]) == len(completion.token_ids)
        last = chunks[-1]
        assert last.finished and last.usage is not None
        assert last.usage.completion_tokens == len(completion.token_ids)
        ids = client.tokenize(prompt)
        assert last.usage.prompt_tokens == len(ids)
        assert client.complete(token_ids=ids, max_tokens=6, temperature=0.0).text == completion.text
        chat = client.complete(messages=[{"role": "user", "content": "Say hi."}], **SHORT)
        assert chat.finish_reason is FinishReason.LENGTH and len(chat.token_ids) == 4


def test_early_exit_cancel_deadline_and_task_cancel_free_the_servers_blocks(
    servers: dict[str, ServerProcess], options: dict[str, object]
) -> None:
    r1 = servers["r1"]

    def idle() -> bool:
        samples = r1.scrape()
        return samples["tokenwire_kv_cache_blocks_used"] == 0 and samples["tokenwire_requests_running"] == 0

    def cancelled() -> float:
        return r1.metric('tokenwire_requests_total{finish_reason="cancelled"}')

    wait_for(idle, "r1 to be idle")
    before = cancelled()

    async def main() -> None:
        async with AsyncClient(r1.target, **options) as client:  # type: ignore[arg-type]
            # 1. leave the loop early, while another request on the same stream goes on.
            other = asyncio.ensure_future(client.complete("Count to ten:", **SHORT))
            async for _ in client.generate("Once upon a time", **LONG):
                assert r1.metric("tokenwire_kv_cache_blocks_used") > 0
                break
            gc.collect()
            assert len((await other).token_ids) == 4
            await async_wait_for(idle, "blocks freed after leaving the loop")
            # 2. cancel()
            generation = client.generate("Once upon a time", **LONG)
            await generation.__anext__()
            generation.cancel()
            await async_wait_for(idle, "blocks freed after cancel()")
            # 3. per-request timeout
            with pytest.raises(DeadlineExceededError):
                async for _ in client.generate("Once upon a time", timeout=1.0, **LONG):
                    pass
            await async_wait_for(idle, "blocks freed after the deadline")
            # 4. cancelling the consuming task
            first = asyncio.Event()

            async def consume() -> None:
                async for _ in client.generate("Once upon a time", **LONG):
                    first.set()

            task = asyncio.ensure_future(consume())
            await first.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await async_wait_for(idle, "blocks freed after the task was cancelled")

    asyncio.run(main())
    wait_for(lambda: cancelled() - before == 4, "four cancelled requests on the server", timeout=30)


def test_server_errors_map_to_typed_exceptions(servers: dict[str, ServerProcess], options: dict[str, object]) -> None:
    target = servers["r1"].target
    with Client(target, **options) as client:  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="temperature"):
            client.complete("Hi", temperature=-1.0)
        with pytest.raises(InvalidArgumentError):
            client.complete(token_ids=[1] * (client.model_info().max_context_length + 1), max_tokens=1)
        assert client.complete("Hi", **SHORT).finish_reason is FinishReason.LENGTH  # the stream goes on
    for token in ("wrong", None):
        with Client(target, **{**options, "token": token}) as client:  # type: ignore[arg-type]
            with pytest.raises(UnauthenticatedError):
                client.complete("Hi", **SHORT)
            with pytest.raises(UnauthenticatedError):
                client.model_info()
            assert client.health() is HealthStatus.SERVING  # probes need no token


def test_an_oversized_request_fails_alone_and_its_stream_goes_on(
    servers: dict[str, ServerProcess], options: dict[str, object]
) -> None:
    """Over the message limit, a request is refused before it is sent: sent, it would end the
    Generate stream it shares (every request on it) with RESOURCE_EXHAUSTED, and be retried."""
    huge = "x" * (4 * 1024 * 1024)

    async def main() -> None:
        async with AsyncClient(servers["r1"].target, **options) as client:  # type: ignore[arg-type]
            running = client.generate("Once upon a time", **{**SHORT, "max_tokens": 12})
            chunks = [await running.__anext__()]
            with pytest.raises(InvalidArgumentError, match="message limit"):
                client.generate(huge, **SHORT)
            with pytest.raises(InvalidArgumentError, match="message limit"):
                await client.tokenize(huge)
            chunks += [chunk async for chunk in running]
            assert chunks[-1].finish_reason is FinishReason.LENGTH
            assert sum(len(c.token_ids) for c in chunks) == 12

    asyncio.run(main())


def test_mutual_tls_and_the_cli(
    servers: dict[str, ServerProcess], certs: dict[str, Path], options: dict[str, object],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = servers["r1"].port
    quick = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.05)
    # A dns:/// name: its addresses are dialled, and the certificate is checked against the name.
    with Client(f"dns:///localhost:{port}", **options) as client:  # type: ignore[arg-type]
        assert client.tokenize("Hi")
    for tls in (
        client_tls(certs, client_cert=None, client_key=None),  # no client certificate
        client_tls(certs, ca_cert=certs["other-ca.pem"]),  # the server's certificate is not trusted
        None,  # plaintext to a TLS port
    ):
        with Client(f"127.0.0.1:{port}", **{**options, "tls": tls, "retry": quick}) as client:  # type: ignore[arg-type]
            with pytest.raises(UnavailableError):
                client.complete("Hi", **SHORT)
    flags = ["--target", f"127.0.0.1:{port}", "--tls-ca", str(certs["ca.pem"]), "--tls-cert", str(certs["client.pem"]),
             "--tls-key", str(certs["client.key"])]
    assert main(["generate", "Hi", "--max-tokens", "2", "--token", TOKEN, *flags]) == EXIT_OK
    assert capsys.readouterr().out.strip()
    assert main(["generate", "Hi", "--max-tokens", "2", "--token", "wrong", *flags]) == EXIT_AUTH
    assert main(["health", *flags]) == EXIT_OK


def test_overloaded_server_is_retried_before_the_first_token(
    servers: dict[str, ServerProcess], options: dict[str, object]
) -> None:
    r3 = servers["r3"]

    def rejected() -> float:
        return r3.metric('tokenwire_request_errors_total{code="RESOURCE_EXHAUSTED"}')

    async def main() -> None:
        retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1)
        async with AsyncClient(r3.target, **{**options, "retry": retry}) as client:  # type: ignore[arg-type]
            blocker = client.generate("Once upon a time", **LONG)
            await blocker.__anext__()
            queued = [client.generate("Hi", **SHORT) for _ in range(2)]
            await async_wait_for(lambda: r3.metric("tokenwire_requests_waiting") == 2, "two queued requests")
            before = rejected()
            with pytest.raises(ResourceExhaustedError):
                await client.complete("Hi", **SHORT)
            await async_wait_for(lambda: rejected() - before == retry.max_attempts, "every try refused")
            # A request refused while the server is full succeeds once a slot frees up.
            patient = RetryPolicy(max_attempts=50, initial_backoff_s=0.2, max_backoff_s=0.2)
            async with AsyncClient(r3.target, **{**options, "retry": patient}) as other:  # type: ignore[arg-type]
                late = asyncio.ensure_future(other.complete("Hi", **SHORT))
                await async_wait_for(lambda: rejected() - before > retry.max_attempts, "the late request refused")
                blocker.cancel()
                for generation in queued:
                    generation.cancel()
                assert len((await late).token_ids) == 4

    asyncio.run(main())


def test_replicas_share_load_and_a_killed_replicas_waiting_requests_finish_elsewhere(
    servers: dict[str, ServerProcess], options: dict[str, object]
) -> None:
    r1, r2, r3 = servers["r1"], servers["r2"], servers["r3"]
    replicas = [r1, r2, r3]

    def finished(proc: ServerProcess) -> float:
        return proc.metric('tokenwire_requests_total{finish_reason="length"}')

    async def main() -> None:
        # A client of r3 alone fills r3's only slot, so requests routed there wait without a token.
        async with AsyncClient(r3.target, **options) as r3_only:  # type: ignore[arg-type]
            blocker = r3_only.generate("Once upon a time", **LONG)
            await blocker.__anext__()
            before = [finished(p) for p in replicas]
            target = "ipv4:" + ",".join(p.target for p in replicas)
            async with AsyncClient(target, **options) as client:  # type: ignore[arg-type]
                batch = asyncio.ensure_future(client.complete_many(["Hi"] * 6, **SHORT))
                await async_wait_for(
                    lambda: r3.metric("tokenwire_requests_waiting") == 2
                    and all(finished(p) - b == 2 for p, b in zip(replicas[:2], before)),
                    "two requests done on r1 and on r2, two waiting on r3",
                )
                r3.kill()
                results = await batch
                assert [len(r.token_ids) for r in results] == [4] * 6
                assert [finished(p) - b for p, b in zip(replicas[:2], before)] in ([4, 2], [3, 3], [2, 4])
            with pytest.raises(UnavailableError):
                async for _ in blocker:
                    pass
            # r3 comes back on the same port; the same client reconnects.
            r3.start()
            await asyncio.to_thread(r3.wait_ready)
            assert len((await r3_only.complete("Hi", **SHORT)).token_ids) == 4

    asyncio.run(main())
