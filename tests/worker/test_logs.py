"""worker.logs: the JSON formatter and configure() (the real logging module, a real stream)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from worker import logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_carry_time_level_logger_message_and_fields(restore_root: None) -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", model="digits", stream=out)
    log = logging.getLogger("certremove.worker")
    log.info("rejected request %s: %s", "r-1", "empty", extra={"request_id": "r-1", "reason": "x"})
    log.debug("not shown")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["level"] == "INFO" and first["logger"] == "certremove.worker"
    assert first["message"] == "rejected request r-1: empty"
    assert first["request_id"] == "r-1" and first["reason"] == "x" and first["model"] == "digits"
    assert first["time"].endswith("+00:00")
    assert lines[1]["level"] == "ERROR" and "ValueError: boom" in lines[1]["exc"]


def test_celery_loggers_and_warnings_come_out_in_the_same_format(restore_root: None) -> None:
    out = io.StringIO()
    logs.configure(logging.INFO, "json", stream=out)
    logging.getLogger("celery.worker.consumer").info("Connected to redis")
    import warnings

    warnings.warn("careful", UserWarning, stacklevel=1)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [x["logger"] for x in lines] == ["celery.worker.consumer", "py.warnings"]
    assert "model" not in lines[0]


def test_text_format_and_one_handler_after_reconfiguring(restore_root: None) -> None:
    out = io.StringIO()
    logs.configure("INFO", "json", stream=io.StringIO())
    logs.configure("WARNING", "text", stream=out)
    marked = [h for h in logging.getLogger().handlers if getattr(h, "_certremove_handler", False)]
    assert len(marked) == 1
    logging.getLogger("x").warning("plain %d", 1)
    assert out.getvalue().rstrip().endswith("] plain 1") and "WARNING" in out.getvalue()


def test_bad_format_or_level() -> None:
    with pytest.raises(ValueError, match="text or json"):
        logs.check_format("xml")
    with pytest.raises(ValueError, match="LOUD"):
        logs.configure("LOUD", "text", stream=io.StringIO())
