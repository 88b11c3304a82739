import pytest

from api.auth import Identity, KeyStore, hash_key
from api.errors import OpenAIError
from broker.messages import Tier


def test_open_mode_uses_body_user():
    ks = KeyStore.load(None)
    assert ks.identify(None, "alice") == Identity(user="alice")
    assert ks.identify(None, None).user == "anonymous"


def test_keys_file_hashed_and_plain(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text(f"""
[keys."{hash_key('sk-gold')}"]
user = "gold"
tier = "high"
weight = 2.0
[keys."sk-plain"]
user = "bob"
tier = "low"
max_queued = 3
""")
    ks = KeyStore.load(f)
    gold = ks.identify("Bearer sk-gold", "ignored")
    assert gold.user == "gold" and gold.tier is Tier.HIGH and gold.weight == 2.0
    bob = ks.identify("Bearer sk-plain", None)
    assert bob.tier is Tier.LOW and bob.max_queued == 3
    with pytest.raises(OpenAIError) as e:
        ks.identify("Bearer nope", None)
    assert e.value.status == 401
    with pytest.raises(OpenAIError):
        ks.identify(None, None)


def test_priority_may_only_go_down():
    ident = Identity(user="u", tier=Tier.NORMAL)
    assert ident.with_priority(None) is Tier.NORMAL
    assert ident.with_priority("low") is Tier.LOW
    with pytest.raises(OpenAIError) as e:
        ident.with_priority("high")
    assert e.value.status == 403
