"""TLS for the gRPC port: server credentials from PEM files, optional mutual TLS, certificate rotation.

With `tls_cert_file` and `tls_key_file` set the gRPC port speaks TLS only (a plaintext client fails in the
handshake). With `tls_client_ca_file` as well, every client must present a certificate signed by that CA
(mutual TLS). The files are re-read when they change on disk (a Kubernetes Secret updated by cert-manager):
gRPC asks for the configuration at each new handshake, and the answer is cached until a file's mtime moves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from service.config import Settings

_log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {what} {path}: {exc}") from exc
    if b"-----BEGIN" not in data:
        raise SystemExit(f"{what} {path} is not a PEM file (expected '-----BEGIN ...')")
    return data


class _RotatingFiles:
    """The PEM files of the port; `fetch` returns a new configuration only when one of them changed."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.paths = [p for p in (cert, key, client_ca) if p is not None]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._mtimes()

    def _mtimes(self) -> tuple[float, ...]:
        out = []
        for p in self.paths:
            try:
                out.append(p.stat().st_mtime)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """Read the files now."""
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=_read(self.client_ca, "client CA") if self.client_ca else None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Return a new configuration if a file changed, else None (gRPC asks before each handshake)."""
        stamp = self._mtimes()
        if stamp == self._stamp:
            return None
        try:
            config = self.configuration()
        except SystemExit as exc:  # half-written Secret update: keep serving with the old files
            _log.warning("TLS files changed but cannot be loaded yet (%s); keeping the previous ones", exc)
            return None
        self._stamp = stamp
        _log.info("TLS certificate files reloaded")
        return config


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Return the gRPC port's credentials, or None for plaintext (no certificate configured)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = _RotatingFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(),
        files.fetch,
        require_client_authentication=settings.tls_client_ca_file is not None,
    )
