"""The shipped load-balancer files (deploy/nginx/inferq.conf, deploy/haproxy/haproxy.cfg),
rendered for a test: its replicas, its ports, its certificate. Only the lines the files mark
for tooling are replaced; everything else is tested as shipped."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "deploy" / "nginx" / "inferq.conf"
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"


class ConfError(RuntimeError):
    """A shipped file lost a line that tooling relies on."""


def _sub(pattern: str, repl: str, text: str, *, flags: int = 0, what: str) -> str:
    """``pattern`` replaced by ``repl`` (``\\1`` names a group) exactly once."""
    text, n = re.subn(pattern, lambda m: m.expand(repl), text, flags=flags)
    if n != 1:
        raise ConfError(f"expected one {what}, found {n}")
    return text


def nginx(
    replicas: list[int],
    https_port: int,
    *,
    tls: tuple[Path, Path] | None = None,
    http_port: int | None = None,
) -> str:
    """deploy/nginx/inferq.conf for ``replicas`` (ports on 127.0.0.1). With ``tls``
    (certificate, key): HTTPS on ``https_port`` and the redirect on ``http_port``, as shipped.
    Without: plain HTTP on ``https_port`` (the e2e harness's clients and workers speak HTTP),
    i.e. the TLS lines and the redirect server left out."""
    conf = NGINX_CONF.read_text()
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=2 fail_timeout=5s;\n" for p in replicas)
    conf = _sub(
        r"( *# BEGIN replicas\n).*?( *# END replicas\n)",
        r"\1" + servers + r"\2",
        conf,
        flags=re.S,
        what="'# BEGIN replicas' block",
    )
    if tls is None:
        conf = _sub(
            r"# BEGIN http-redirect\n.*?# END http-redirect\n",
            "",
            conf,
            flags=re.S,
            what="'# BEGIN http-redirect' block",
        )
        conf = _sub(
            r"listen [^;]+;( *# inferq-listen)",
            f"listen 127.0.0.1:{https_port};  # inferq-listen",
            conf,
            what="'# inferq-listen' line",
        )
        return "".join(
            line
            for line in conf.splitlines(keepends=True)
            if not re.search(r"# inferq-tls(-certificate|-key)?$", line.rstrip())
        )
    certificate, key = tls
    assert http_port is not None
    conf = _sub(
        r"listen [^;]+;( *# inferq-listen)",
        f"listen 127.0.0.1:{https_port} ssl;  # inferq-listen",
        conf,
        what="'# inferq-listen' line",
    )
    conf = _sub(
        r"listen [^;]+;( *# inferq-http-listen)",
        f"listen 127.0.0.1:{http_port};  # inferq-http-listen",
        conf,
        what="'# inferq-http-listen' line",
    )
    conf = _sub(
        r"return 301 https://\$host\$request_uri;( *# inferq-https-redirect)",
        f"return 301 https://$host:{https_port}$request_uri;",
        conf,
        what="'# inferq-https-redirect' line",
    )
    conf = _sub(
        r"ssl_certificate [^;]+;( *# inferq-tls-certificate)",
        f"ssl_certificate {certificate};",
        conf,
        what="'# inferq-tls-certificate' line",
    )
    return _sub(
        r"ssl_certificate_key [^;]+;( *# inferq-tls-key)",
        f"ssl_certificate_key {key};",
        conf,
        what="'# inferq-tls-key' line",
    )


def haproxy(replicas: list[int], https_port: int, http_port: int) -> str:
    """deploy/haproxy/haproxy.cfg for ``replicas``, HTTPS on ``https_port`` and the redirect
    on ``http_port``; the certificate comes from INFERQ_TLS_PEM as shipped."""
    cfg = HAPROXY_CFG.read_text()
    servers = "".join(
        f"    server replica{i} 127.0.0.1:{p} check\n" for i, p in enumerate(replicas)
    )
    cfg = _sub(
        r"( *# BEGIN replicas\n).*?( *# END replicas\n)",
        r"\1" + servers + r"\2",
        cfg,
        flags=re.S,
        what="'# BEGIN replicas' block",
    )
    cfg = _sub(
        r"bind :\d+( ssl .*# inferq-listen)",
        f"bind 127.0.0.1:{https_port}\\1",
        cfg,
        what="'# inferq-listen' bind",
    )
    return _sub(
        r"bind :\d+( *# inferq-http-listen)",
        f"bind 127.0.0.1:{http_port}  # inferq-http-listen",
        cfg,
        what="'# inferq-http-listen' bind",
    )
