"""Server TLS credentials from PEM files, with optional client-certificate checking (mutual TLS)."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path!r} is not a PEM file")
    return data


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS credentials for the gRPC server.

    Args:
        cert: PEM certificate chain of the server (leaf first).
        key: PEM private key of the server.
        client_ca: PEM CA bundle; when given, clients must present a certificate it signed.

    Raises:
        ValueError: a file is missing, unreadable or not PEM (the message names it).
    """
    chain = _read_pem(cert, "tls_cert")
    private_key = _read_pem(key, "tls_key")
    root = _read_pem(client_ca, "tls_client_ca") if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(private_key, chain)],
        root_certificates=root,
        require_client_auth=root is not None,
    )
