"""Config validation, target parsing, channel options and request building (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.client import DEFAULT, ChatMessage, ClientConfig, Completion, FinishReason, KeepaliveConfig, RetryPolicy, TLSConfig
from tokenwire.client.channel import DnsName, Endpoint, call_metadata, channel_options, parse_target
from tokenwire.client.convert import generate_request, split_prompt
from tokenwire.client.types import GenerationChunk, Usage


def make_config(*targets: str, **options: object) -> ClientConfig:
    return ClientConfig(targets=targets or ("127.0.0.1:50051",), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "parsed"),
    [
        ("127.0.0.1:50051", [Endpoint("127.0.0.1:50051")]),
        ("localhost:1", [Endpoint("localhost:1")]),
        ("[::1]:50051", [Endpoint("[::1]:50051")]),
        ("unix:tokenwire.sock", [Endpoint("unix:tokenwire.sock")]),
        ("unix:///run/tokenwire.sock", [Endpoint("unix:///run/tokenwire.sock")]),
        ("dns:///tokenwire.default.svc:50051", [DnsName("tokenwire.default.svc", 50051)]),
        ("ipv4:127.0.0.1:1,127.0.0.2:2", [Endpoint("ipv4:127.0.0.1:1"), Endpoint("ipv4:127.0.0.2:2")]),
        ("ipv6:[::1]:7", [Endpoint("ipv6:[::1]:7")]),
    ],
)
def test_targets_parse_into_servers(target: str, parsed: list[object]) -> None:
    assert parse_target(target) == parsed


@pytest.mark.parametrize(
    "target",
    ["localhost", "host:0", "host:70000", "unix:", "dns:///", "dns:///name", "dns://8.8.8.8/name:1", "http://x:1",
     "a b:1", "ipv4:1.2.3.4"],
)
def test_malformed_targets_are_rejected_by_name(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        parse_target(target)


def test_resolved_dns_addresses_keep_the_name_for_tls_and_authority() -> None:
    name = DnsName("tokenwire.svc", 50051)
    assert name.endpoint("10.0.0.7") == Endpoint("ipv4:10.0.0.7:50051", authority="tokenwire.svc")
    assert name.endpoint("fd00::7").target == "ipv6:[fd00::7]:50051"
    tls_options = dict(channel_options(make_config(tls=TLSConfig()), name.endpoint("10.0.0.7")))
    assert tls_options["grpc.ssl_target_name_override"] == "tokenwire.svc"
    assert tls_options["grpc.default_authority"] == "tokenwire.svc"
    plain = dict(channel_options(make_config(), name.endpoint("10.0.0.7")))
    assert "grpc.ssl_target_name_override" not in plain


def test_client_config_validation() -> None:
    assert make_config("a:1").targets == ("a:1",)
    assert ClientConfig(targets="a:1").targets == ("a:1",)  # type: ignore[arg-type]
    for bad in ({"targets": ()}, {"targets": ("a:1", "a:1")}, {"targets": ("",)}):
        with pytest.raises(ValueError, match="target"):
            ClientConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        make_config(timeout=0)
    with pytest.raises(ValueError, match="token"):
        make_config(token="a\nb")
    with pytest.raises(ValueError, match="streams_per_server"):
        make_config(streams_per_server=0)
    with pytest.raises(TypeError):
        make_config(colour="blue")
    config = make_config(timeout=3.0)
    assert config.resolve_timeout(DEFAULT) == 3.0
    assert config.resolve_timeout(None) is None and config.resolve_timeout(0.5) == 0.5
    with pytest.raises(ValueError, match="timeout"):
        config.resolve_timeout(-1)


def test_keepalive_and_retry_validation() -> None:
    with pytest.raises(ValueError, match="time_s"):
        KeepaliveConfig(time_s=0.5)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="max_backoff_s"):
        RetryPolicy(initial_backoff_s=3, max_backoff_s=1)
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2, jitter=0.2)
    assert all(0.08 <= policy.backoff_s(1) <= 0.12 for _ in range(50))
    assert all(0.16 <= policy.backoff_s(2) <= 0.24 for _ in range(50))
    assert all(0.4 <= policy.backoff_s(20) <= 0.6 for _ in range(50))


def test_keepalive_options_keep_pinging_a_quiet_stream() -> None:
    config = make_config(keepalive=KeepaliveConfig(time_s=20, timeout_s=5))
    options = dict(channel_options(config, Endpoint("a:1")))
    assert options["grpc.keepalive_time_ms"] == 20_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.keepalive_permit_without_calls"] == 0
    off = dict(channel_options(make_config(keepalive=KeepaliveConfig(time_s=0)), Endpoint("a:1")))
    assert "grpc.keepalive_time_ms" not in off


def test_tls_config_reads_files_and_pairs_cert_with_key(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"CA PEM")
    tls = TLSConfig(ca_cert=ca, client_cert=b"CERT", client_key=str(ca), server_name="localhost")
    assert (tls.ca_cert, tls.client_cert, tls.client_key) == (b"CA PEM", b"CERT", b"CA PEM")
    options = dict(channel_options(make_config(tls=tls), Endpoint("127.0.0.1:1")))
    assert options["grpc.ssl_target_name_override"] == "localhost"
    with pytest.raises(ValueError, match="client_key"):
        TLSConfig(client_cert=b"CERT")
    with pytest.raises(ValueError, match="ca_cert"):
        TLSConfig(ca_cert=tmp_path / "missing.pem")


def test_bearer_token_goes_into_metadata() -> None:
    assert call_metadata(make_config(token="s3cret")) == (("authorization", "Bearer s3cret"),)
    assert call_metadata(make_config()) == ()


def test_generate_request_splits_sampling_from_request_fields() -> None:
    request = generate_request(
        "r1",
        prompt="hi",
        sampling={"max_tokens": 5, "temperature": 0.0, "top_p": 0.9, "seed": 7, "stop": ["\n"],
                  "stop_token_ids": (2,), "logprobs": True, "top_logprobs": 3, "top_k": None},
    )
    assert request.request_id == "r1" and request.text == "hi"
    assert request.max_tokens == 5 and request.HasField("max_tokens")
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert not request.sampling.HasField("top_k")
    assert (request.sampling.seed, list(request.stop), list(request.stop_token_ids)) == (7, ["\n"], [2])
    assert request.logprobs and request.top_logprobs == 3


def test_generate_request_rejects_bad_arguments_by_name() -> None:
    with pytest.raises(TypeError, match="temprature"):
        generate_request("r", prompt="x", sampling={"temprature": 1.0})
    with pytest.raises(TypeError, match="max_tokens"):
        generate_request("r", prompt="x", sampling={"max_tokens": "many"})
    with pytest.raises(ValueError, match="max_tokens"):
        generate_request("r", prompt="x", sampling={"max_tokens": -1})
    with pytest.raises(TypeError, match="stop"):
        generate_request("r", prompt="x", sampling={"stop": "\n"})
    with pytest.raises(ValueError, match="exactly one"):
        generate_request("r", sampling={})
    with pytest.raises(ValueError, match="exactly one"):
        generate_request("r", prompt="x", token_ids=[1], sampling={})
    with pytest.raises(ValueError, match="token_ids"):
        generate_request("r", token_ids=[1, -2], sampling={})
    with pytest.raises(ValueError, match="role"):
        generate_request("r", messages=[{"content": "x"}], sampling={})


def test_prompt_kinds() -> None:
    chat = generate_request(
        "r", messages=[ChatMessage("system", "be brief"), {"role": "user", "content": "hi"}], sampling={}
    )
    assert [(m.role, m.content) for m in chat.chat.messages] == [("system", "be brief"), ("user", "hi")]
    assert list(generate_request("r", token_ids=[1, 2], sampling={}).tokens.ids) == [1, 2]
    assert split_prompt("text") == ("text", None, None)
    assert split_prompt([1, 2]) == (None, [1, 2], None)
    assert split_prompt([{"role": "user", "content": "x"}])[2] == [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="empty"):
        split_prompt([])
    with pytest.raises(ValueError, match="role"):
        ChatMessage("", "x")


def test_completion_joins_chunks() -> None:
    chunks = [
        GenerationChunk("r", "Hel", (1,)),
        GenerationChunk("r", "lo", (2, 3)),
        GenerationChunk("r", "", (), finish_reason=FinishReason.STOP, usage=Usage(4, 3)),
    ]
    completion = Completion.from_chunks("r", chunks)
    assert (completion.text, completion.token_ids, completion.finish_reason) == ("Hello", (1, 2, 3), FinishReason.STOP)
    assert completion.usage == Usage(4, 3) and FinishReason.STOP == "stop"
    with pytest.raises(ValueError, match="finished"):
        Completion.from_chunks("r", chunks[:2])
