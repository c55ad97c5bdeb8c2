"""The ASGI entry point for uvicorn: ``uvicorn sync_server.asgi:app``.

Creating the app builds no resource: they are created by its lifespan when the server starts.
"""

from .app import create_app

app = create_app()
