"""certremove worker: the Celery worker that owns a model and serves its deletion stream.

The only package that knows Celery, Redis, Prometheus, checkpoints on disk as a life cycle and the
GPU (docs/design.md "Architecture"). ``worker.cli`` is the single composition root of the
``certremove`` command; ``worker.app`` is the Celery app (``celery -A worker.app worker -P solo``).
"""
