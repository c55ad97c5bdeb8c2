FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sync_protocol sync_protocol
COPY sync_server sync_server
COPY domain domain
COPY conflict conflict
COPY api api
COPY jobs jobs
COPY migrations migrations
RUN pip install --no-cache-dir . && useradd --system galley && mkdir -p /app/var && chown galley /app/var
USER galley
EXPOSE 8000
CMD ["galley", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
