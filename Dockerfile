# One image for every Herald process (api, worker, beat, flower, migrate); the command
# differs per service in docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the processes need: the packages, and Alembic's config and scripts.
COPY pyproject.toml alembic.ini ./
COPY engine ./engine
COPY api ./api
COPY workers ./workers
COPY migrations ./migrations
RUN pip install . \
    && useradd --system --create-home --uid 10001 herald \
    && mkdir -p /app/var \
    && chown herald /app/var

USER herald
ENV HERALD_VAR_DIR=/app/var

EXPOSE 5000 5555
CMD ["gunicorn", "api:create_app()", "--bind", "0.0.0.0:5000", "--workers", "4"]
