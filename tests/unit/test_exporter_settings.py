"""How long the exporter lets events wait before an insert, per store."""

import pytest
from pydantic import ValidationError

from metrics.settings import ExporterSettings


def test_chdb_inserts_every_5_s_a_clickhouse_server_every_second(monkeypatch):
    monkeypatch.delenv("INFERSTACK_EXPORTER_FLUSH_S", raising=False)
    monkeypatch.delenv("INFERSTACK_CLICKHOUSE_URL", raising=False)
    assert ExporterSettings().flush_s == 5.0  # each chDB insert opens the embedded database
    assert ExporterSettings(clickhouse_url="http://clickhouse:8123").flush_s == 1.0


def test_a_set_flush_interval_wins_either_way(monkeypatch):
    monkeypatch.setenv("INFERSTACK_EXPORTER_FLUSH_S", "0.2")
    assert ExporterSettings().flush_s == 0.2
    assert ExporterSettings(clickhouse_url="http://clickhouse:8123").flush_s == 0.2
    monkeypatch.setenv("INFERSTACK_EXPORTER_FLUSH_S", "0")
    with pytest.raises(ValidationError):
        ExporterSettings()
