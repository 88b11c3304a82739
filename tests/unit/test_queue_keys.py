"""The queue's key table is the one source of its key names: Python builds them from
it, the Lua scripts get them from the prelude rendered from it, and spell none."""

import re
from importlib import resources

from broker.messages import Tier
from scheduler import keys
from scheduler.queue import SCRIPTS


def test_every_key_of_a_model_shares_its_hash_tag_and_is_distinct():
    names = [k("my-model", *(f"<{p}>" for p in k.params)) for k in keys.TABLE]
    assert all(n.startswith("is:{my-model}:") for n in names)
    assert len(set(names)) == len(names)
    assert keys.fixed("m") == [k("m") for k in keys.FIXED] and keys.state in keys.FIXED


def test_the_prelude_names_every_key_field_and_tier_from_the_table():
    prelude = keys.lua_prelude()
    for k in keys.TABLE:
        name = k.lua.upper() if not k.params else k.lua
        assert re.search(rf"\b[KkCc]_{name}\b", prelude), k.lua
    assert 'local F_WAITING = "len"' in prelude and 'return "len:" .. tier' in prelude
    assert 'local TIERS = {"high", "normal", "low"}' in prelude and "high = 2" in prelude
    assert [t.value for t in Tier] == ["high", "normal", "low"]


def test_scripts_spell_no_key_and_read_keys_only_through_the_prelude():
    lua = resources.files("scheduler") / "lua"
    for path in lua.iterdir():
        text = path.read_text()
        assert "KEYS[" not in text, path.name  # the prelude binds KEYS to names
        suffixes = "|".join(k.pattern.split(":")[0] for k in keys.TABLE)
        assert not re.search(rf'":?({suffixes}):|":({suffixes})"', text), path.name  # a key spelt by hand
        assert not re.search(r'"(high|normal|low)"', text) and '"len' not in text, path.name
    for name, source in SCRIPTS.items():
        assert source.startswith("#!lua\n"), name  # Redis 7 then refuses keys outside the declared slot


def test_the_architecture_page_shows_every_queue_key_with_its_owner():
    from inferstack.settings import REPO_ROOT

    page = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = page[page.index("## Redis: who owns which key"):]
    for k in keys.TABLE:
        assert f"`is:{{m}}:{k.pattern.replace('<rid>', '<id>')}`" in table, k.pattern
