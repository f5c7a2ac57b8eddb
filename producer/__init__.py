"""certremove producer: enqueue certified-deletion requests for the removal service.

Client teams install this next to their services. It knows the stream key, the Celery task names
and the request status schema (``producer.schema``), and imports neither torch nor ``core``.
"""

from __future__ import annotations

from producer.client import Client

__all__ = ["Client"]
