"""The scrape-time queue-depth gauge (metrics/prom.py)."""

from prometheus_client import CollectorRegistry, generate_latest

from metrics import prom


def test_queue_depth_reads_at_scrape_time():
    depths = {"a": {"high": 1, "normal": 2, "low": 0}}
    registry = CollectorRegistry()
    registry.register(prom.QueueDepth(lambda: depths))
    assert 'inferstack_queue_depth{model="a",tier="normal"} 2.0' in generate_latest(registry).decode()
    depths["a"]["normal"] = 7
    assert 'inferstack_queue_depth{model="a",tier="normal"} 7.0' in generate_latest(registry).decode()


def test_an_unreadable_queue_is_an_absent_series_not_a_zero():
    def down():
        raise ConnectionError("Redis is down")

    registry = CollectorRegistry()
    registry.register(prom.QueueDepth(down))
    assert "inferstack_queue_depth" not in generate_latest(registry).decode()
