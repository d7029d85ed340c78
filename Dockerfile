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

# python:3.11-slim has no curl: probe /healthz with the standard library, over HTTP or HTTPS
# (the same port serves both; the generated certificate is self-signed, so it is not verified).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,ssl,sys,urllib.request as u; p=os.environ.get('WEB_PORT','5000'); s=os.environ.get('USE_SSL','true').lower() in ('1','true','yes','on'); c=ssl._create_unverified_context(); sys.exit(0 if u.urlopen(('https' if s else 'http')+'://127.0.0.1:'+p+'/healthz', timeout=4, context=c if s else None).status==200 else 1)"]

STOPSIGNAL SIGTERM
CMD ["python", "bbo_stream.py"]
