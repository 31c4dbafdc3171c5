"""Settings: flags win over TOKENWIRE_* variables, values parse and validate with named errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tokenwire.server.cli import add_serve_arguments, build_parser, run_serve
from tokenwire.server.settings import Settings, environment_variables, parse_bool, parse_kv_cache_memory, parse_size


def settings_from(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return Settings.from_sources(parser.parse_args(argv), env or {})


def test_defaults_without_flags_or_env() -> None:
    s = settings_from([])
    assert s == Settings()
    assert (s.port, s.metrics_port, s.grace_period) == (50051, 9464, 30.0)
    assert s.address == "0.0.0.0:50051"


def test_env_sets_values_and_flags_win() -> None:
    env = {"TOKENWIRE_PORT": "6000", "TOKENWIRE_HOST": "127.0.0.1", "TOKENWIRE_PREFIX_CACHING": "off",
           "TOKENWIRE_KV_CACHE_MEMORY": "256MiB", "TOKENWIRE_GRACE_PERIOD": "2.5"}
    s = settings_from(["--port", "7000"], env)
    assert s.port == 7000  # the flag wins
    assert s.host == "127.0.0.1"
    assert s.enable_prefix_caching is False
    assert s.kv_cache_memory == 256 * 1024 * 1024
    assert s.grace_period == 2.5
    assert settings_from(["--prefix-caching"], env).enable_prefix_caching is True


def test_engine_args_follow_settings() -> None:
    s = settings_from(["--max-num-seqs", "4", "--dtype", "float32", "--max-model-len", "512", "--block-size", "32"])
    args = s.engine_args()
    assert (args.max_num_seqs, args.dtype, args.max_model_len, args.block_size) == (4, "float32", 512, 32)
    assert args.speculative_tokens == 0  # off unless asked for
    spec = settings_from(["--speculative-tokens", "5"], {"TOKENWIRE_SPECULATIVE_MAX_BATCH": "2"}).engine_args()
    assert (spec.speculative_tokens, spec.speculative_max_batch) == (5, 2)
    assert s.engine_args().kv_cache_dtype == "auto"  # the model's dtype unless asked
    assert settings_from(["--kv-cache-dtype", "float16"]).engine_args().kv_cache_dtype == "float16"
    assert settings_from([], {"TOKENWIRE_KV_CACHE_DTYPE": "bfloat16"}).kv_cache_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--port", "70000"], {}, "port"),
        ([], {"TOKENWIRE_PORT": "http"}, "TOKENWIRE_PORT"),
        ([], {"TOKENWIRE_PREFIX_CACHING": "maybe"}, "TOKENWIRE_PREFIX_CACHING"),
        (["--tls-cert", "c.pem"], {}, "tls_key"),
        (["--tls-client-ca", "ca.pem"], {}, "tls_client_ca"),
        (["--auth-token", "a", "--auth-token-file", "f"], {}, "auth_token_file"),
        (["--auth-token", "has space"], {}, "auth_token"),
        (["--log-format", "xml"], {}, "log_format"),
        (["--grace-period", "-1"], {}, "grace_period"),
        (["--max-num-seqs", "0"], {}, "max_num_seqs"),  # checked by EngineArgs, named by it
        (["--speculative-tokens", "-1"], {}, "speculative_tokens"),
        (["--dtype", "int3"], {}, "dtype"),
        (["--kv-cache-dtype", "fp8"], {}, "kv_cache_dtype"),
        (["--max-connection-age", "0"], {}, "max_connection_age"),
    ],
)
def test_bad_values_raise_naming_the_setting(argv: list[str], env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        settings_from(argv, env)


def test_value_parsers() -> None:
    assert parse_bool("Yes") is True and parse_bool("0") is False
    assert parse_size("2G") == 2 * 1024**3
    assert parse_size("1048576") == 1048576
    assert parse_kv_cache_memory("0.8") == 0.8
    assert parse_kv_cache_memory("1GiB") == 1024**3
    with pytest.raises(ValueError):
        parse_size("lots")


def test_unix_socket_address() -> None:
    assert settings_from(["--unix-socket", "/tmp/tw.sock"]).address == "unix:/tmp/tw.sock"


def test_run_serve_reports_bad_settings_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_serve(build_parser().parse_args(["--port", "99999"])) == 2
    assert "port must be in" in capsys.readouterr().err


def test_every_variable_and_flag_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "server.md").read_text()
    for variable, flag in environment_variables().items():
        assert f"`{variable}`" in doc and f"`{flag}" in doc, variable
