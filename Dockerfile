# router: the help-desk mail daemon as a small image that runs `router serve`.
#
#   docker build -t router .
#   docker run -d --name router -p 127.0.0.1:2525:2525 \
#       -v router-etc:/etc/router -v router-data:/var/lib/router \
#       -e ROUTER_RELAY=mail.example.com:25 router
#
# /etc/router     router.toml and templates/; a fresh named volume is seeded with the
#                 repository's example, a bind mount brings your own.
# /var/lib/router the SQLite database (migrated on start). For PostgreSQL set
#                 ROUTER_DATABASE_URL and run `router db upgrade` once per release
#                 (config/compose.postgres.yml does both).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/router

# The pinned dependencies first, read from pyproject.toml alone, so that a code change
# rebuilds only the small layers below.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY . ./
# Editable, because router/db.py finds migrations/ beside the package and a regular install
# would leave that directory out.
RUN pip install --no-deps -e . \
 && groupadd --system --gid 10001 router \
 && useradd --system --uid 10001 --gid router --home-dir /var/lib/router \
        --shell /usr/sbin/nologin router \
 && install -d -m 0755 /etc/router \
 && install -d -o router -g router -m 0750 /var/lib/router \
 && cp router.toml /etc/router/router.toml \
 && if [ -d templates ]; then cp -r templates /etc/router/templates; fi

ENV ROUTER_CONFIG=/etc/router/router.toml \
    ROUTER_DATABASE_URL=sqlite:////var/lib/router/router.db \
    ROUTER_SMTP_LISTEN=0.0.0.0:2525

VOLUME ["/etc/router", "/var/lib/router"]
EXPOSE 2525

# Numeric, so that orchestrators enforcing "run as non-root" can verify it.
USER 10001:10001
WORKDIR /var/lib/router
ENTRYPOINT ["router"]
CMD ["serve"]
