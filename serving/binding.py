"""The server's listening port: one owner per port, a port number in range, TLS files checked.

gRPC sets SO_REUSEPORT by default, so a second server on a taken port binds anyway and the
kernel splits connections between the two; the embedded server turns it off (`SO_REUSEPORT_OFF`)
and explains a failed bind with the operating system's own reason. The port is probed before the
models load (a taken port fails at once) but bound only after, as TF Serving does: nothing
accepts connections, not even a TCP readiness probe, before the models can answer. TLS files are
checked as a pair before loading too, so a wrong key is named as such, not as a bind failure.
"""

from __future__ import annotations

import argparse
import errno
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

SO_REUSEPORT_OFF = ("grpc.so_reuseport", 0)
MAX_PEM_BYTES = 1 << 20  # a certificate chain is a few KiB


class TlsError(ValueError):
    """A TLS certificate or key cannot be read, is not PEM, or the two do not form a pair."""


def port_number(text: str) -> int:
    """argparse type for --port: 1..65535, or 0 for any free port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1..65535 (0: any free port)")
    return port


def _read_pem(path: Path, what: str, marker: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_PEM_BYTES:
            raise TlsError(f"TLS {what} {path}: {size} bytes, more than a PEM file's {MAX_PEM_BYTES}")
        data = path.read_bytes()
    except OSError as err:
        raise TlsError(f"TLS {what} {path}: cannot read: {err.strerror or err}") from err
    if marker.encode() not in data:
        raise TlsError(f"TLS {what} {path}: not a PEM {what} (no '{marker}' line)")
    return data


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path

    def credentials(self) -> grpc.ServerCredentials:
        cert_file, key_file = Path(self.cert_file), Path(self.key_file)
        cert = _read_pem(cert_file, "certificate", "-----BEGIN CERTIFICATE-----")
        key = _read_pem(key_file, "key", "PRIVATE KEY-----")
        try:  # OpenSSL checks that the key is the certificate's; gRPC would only fail to bind
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=_no_password)
        except (ssl.SSLError, TlsError) as err:
            reason = getattr(err, "reason", None)
            if reason == "KEY_VALUES_MISMATCH":
                raise TlsError(f"TLS key {key_file} does not match certificate {cert_file}") from err
            raise TlsError(f"TLS certificate {cert_file} / key {key_file}: cannot load: {reason or err}") from err
        return grpc.ssl_server_credentials([(key, cert)])


def _no_password() -> bytes:
    raise TlsError("the key is encrypted; give an unencrypted PEM key")


def check_port(host: str, port: int) -> None:
    """Fail now, before the models load, if `host:port` cannot be bound (port 0: any free port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535 (0: any free port)")
    reason = _bind_error(host, port)
    if reason:
        raise OSError(f"cannot bind {host}:{port}: {reason}")


def bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    """Add the listening port; returns the port bound (the one picked when `port` is 0)."""
    target = f"{host}:{port}"
    try:
        bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    except RuntimeError:  # grpc raises RuntimeError when it cannot bind
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {target}: {_bind_error(host, port) or 'gRPC refused the address'}")
    return bound


def _bind_error(host: str, port: int) -> str | None:
    """The operating system's reason `host:port` cannot be bound, or None (gRPC's own error says
    only that binding failed). SO_REUSEADDR as gRPC sets it: a port in TIME_WAIT is free."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        return f"cannot resolve host {host!r}: {err.strerror}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            return f"port {port} is already in use" if err.errno == errno.EADDRINUSE else (err.strerror or str(err))
    return None
