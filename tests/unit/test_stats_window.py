import pytest

from metrics.stats import parse_window


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800),
                                          ("0.5h", 1800), (30, 30)])
def test_parse_window(text, seconds):
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "-5m", "0", "abc"])
def test_bad_windows_say_what_to_use(text):
    with pytest.raises(ValueError):
        parse_window(text)
