# BBO Stream: one asyncio process; runtime deps websockets + numpy.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SSL_CERT_PATH=/app/certs/cert.pem \
    SSL_KEY_PATH=/app/certs/key.pem \
    CACHE_DIR=/app/cache_data \
    LOG_DIR=/app/logs

WORKDIR /app

# Dependencies first: this layer is reused until requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt \
 && (command -v openssl >/dev/null || (apt-get update && apt-get install -y --no-install-recommends openssl && rm -rf /var/lib/apt/lists/*)) \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin bbo \
 && mkdir -p /app/cache_data /app/logs /app/certs \
 && chown bbo:bbo /app/cache_data /app/logs /app/certs

COPY --chown=root:root bbo_stream.py ./
COPY --chown=root:root static/ ./static/

USER bbo
EXPOSE 5000
VOLUME ["/app/cache_data", "/app/logs", "/app/certs"]

# python:3.11-slim has no curl: probe /healthz with the standard library.  The port serves HTTPS
# and plain HTTP side by side; try the configured scheme first, then the other one, so the check
# also passes when USE_SSL=true but no certificate was usable (the server then serves plain HTTP,
# e.g. a certs/ bind mount not writable by uid 10001).  Self-signed: the certificate is not verified.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, ssl, urllib.request as u\nport = os.environ.get('WEB_PORT', '5000')\ntls = os.environ.get('USE_SSL', 'true').strip().lower() in ('1', 'true', 'yes', 'on')\nctx = ssl._create_unverified_context()\nfor scheme in (('https', 'http') if tls else ('http', 'https')):\n    try:\n        if u.urlopen(f'{scheme}://127.0.0.1:{port}/healthz', timeout=2, context=ctx).status == 200:\n            raise SystemExit(0)\n    except OSError:\n        pass\nraise SystemExit(1)"]

STOPSIGNAL SIGTERM
CMD ["python", "bbo_stream.py"]
