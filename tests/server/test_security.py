"""Bearer-token auth, TLS and mutual TLS (certificates made here with openssl), and the Unix socket."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tokenwire.client.v1 import generation_pb2 as pb
from tokenwire.client.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

TOKEN = "s3cret-t0ken"
GREEDY = pb.SamplingParams(temperature=0.0)


def model_info(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] | None = None) -> pb.GetModelInfoResponse:
    return pb_grpc.GenerationServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=20)


def rpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def generate_two_tokens(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] | None = None) -> list[int]:
    request = pb.GenerateRequest(request_id="a", text="Hi", max_tokens=2, ignore_eos=True, sampling=GREEDY)
    responses = list(pb_grpc.GenerationServiceStub(channel).Generate(iter([request]), metadata=metadata, timeout=60))
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    return [t for r in responses for t in r.token_ids]


def test_bearer_token_guards_the_service_but_not_health_or_reflection(start_server: Callable[..., Any]) -> None:
    running = start_server(auth_token=TOKEN)
    with grpc.insecure_channel(running.address) as channel:
        assert rpc_code(lambda: model_info(channel)) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(lambda: model_info(channel, (("authorization", "Bearer wrong"),))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert rpc_code(lambda: model_info(channel, (("authorization", TOKEN),))) == grpc.StatusCode.UNAUTHENTICATED
        assert model_info(channel, (("authorization", f"Bearer {TOKEN}"),)).vocab_size > 0
        assert model_info(channel, (("authorization", f"bearer {TOKEN}"),)).vocab_size > 0
        # The bidirectional stream is refused as a stream (the deny handler matches its kind).
        assert rpc_code(lambda: generate_two_tokens(channel)) == grpc.StatusCode.UNAUTHENTICATED
        assert len(generate_two_tokens(channel, (("authorization", f"Bearer {TOKEN}"),))) == 2
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tokenwire.v1.GenerationService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert "tokenwire.v1.GenerationService" in names


def test_a_refused_stream_always_reports_its_status(start_server: Callable[..., Any]) -> None:
    """The client SDK writes its request while the server refuses the stream; the status must win.

    Refusing at once raced with that write: about one call in 30 ended INTERNAL instead of
    UNAUTHENTICATED, so 60 calls caught it almost surely.
    """
    from tokenwire.client import Client
    from tokenwire.client.errors import UnauthenticatedError

    running = start_server(auth_token=TOKEN)
    for _ in range(60):
        with Client(running.address, token="wrong") as client:
            with pytest.raises(UnauthenticatedError):
                client.complete("Hi", max_tokens=2)


def test_token_file(start_server: Callable[..., Any], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    running = start_server(auth_token_file=str(token_file))
    with grpc.insecure_channel(running.address) as channel:
        assert rpc_code(lambda: model_info(channel)) == grpc.StatusCode.UNAUTHENTICATED
        assert model_info(channel, (("authorization", f"Bearer {TOKEN}"),)).vocab_size > 0


def test_tls(start_server: Callable[..., Any], certs: dict[str, Path]) -> None:
    running = start_server(tls_cert=str(certs["server.pem"]), tls_key=str(certs["server.key"]))
    credentials = grpc.ssl_channel_credentials(root_certificates=certs["ca.pem"].read_bytes())
    with grpc.secure_channel(running.address, credentials) as channel:
        assert len(generate_two_tokens(channel)) == 2
    with grpc.insecure_channel(running.address) as channel:
        assert rpc_code(lambda: model_info(channel)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(start_server: Callable[..., Any], certs: dict[str, Path]) -> None:
    running = start_server(
        tls_cert=str(certs["server.pem"]), tls_key=str(certs["server.key"]), tls_client_ca=str(certs["ca.pem"])
    )
    ca = certs["ca.pem"].read_bytes()
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(running.address, anonymous) as channel:
        assert rpc_code(lambda: model_info(channel)) == grpc.StatusCode.UNAVAILABLE
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=certs["client.key"].read_bytes(),
        certificate_chain=certs["client.pem"].read_bytes(),
    )
    with grpc.secure_channel(running.address, with_cert) as channel:
        assert len(generate_two_tokens(channel)) == 2


def test_unix_socket(start_server: Callable[..., Any], tmp_path: Path) -> None:
    running = start_server(unix_socket=str(tmp_path / "tokenwire.sock"))
    with grpc.insecure_channel(running.address) as channel:
        assert model_info(channel).kv_blocks_total > 0


def test_unusable_tls_files_fail_with_their_name(start_server: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="tls_cert"):
        start_server(tls_cert=str(tmp_path / "junk.pem"), tls_key=str(tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="auth_token_file"):
        start_server(auth_token_file=str(tmp_path / "missing"))
