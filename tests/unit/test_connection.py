"""Choosing the Redis deployment: URLs with several hosts, the three modes, the media
jobs' own Redis."""

import pytest
import redis
from pydantic import ValidationError

from broker.connection import RedisMode, RedisTarget, _parse, subscription_groups, sync_client
from inferstack.settings import CommonSettings


def test_a_url_may_name_several_hosts_with_credentials_and_database():
    p = _parse("rediss://app:p%40ss@n1:7000,n2,n3:7002/3", 6379)
    assert p.hosts == [("n1", 7000), ("n2", 6379), ("n3", 7002)]
    assert p.options == {"username": "app", "password": "p@ss", "db": 3, "ssl": True}
    assert _parse("redis://:pw@s1:26379", 26379).options == {"password": "pw"}
    for bad in ("http://n1:6379", "n1:6379", "redis://n1:6379?socket_timeout=1"):
        with pytest.raises(ValueError):
            _parse(bad, 6379)


def test_standalone_is_the_plain_client_from_the_url():
    client = sync_client("redis://127.0.0.1:1/4")
    assert type(client) is redis.Redis and client.connection_pool.connection_kwargs["db"] == 4
    assert subscription_groups(client, ["a", "b"]) == [["a", "b"]]  # one subscription on one Redis


def test_sentinel_mode_asks_the_sentinels_for_the_named_primary():
    client = sync_client(RedisTarget("redis://:pw@127.0.0.1:1,127.0.0.1:2/1", RedisMode.SENTINEL, "queue"))
    pool = client.connection_pool
    assert pool.service_name == "queue" and pool.connection_kwargs["password"] == "pw"
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [1, 2]
    client.close()


def test_the_media_jobs_redis_is_never_a_cluster():
    plain = CommonSettings(redis_url="redis://r:6379/0")
    assert plain.rq_redis == RedisTarget("redis://r:6379/0", RedisMode.STANDALONE, "mymaster")
    sentinel = CommonSettings(redis_url="redis://s:26379", redis_mode="sentinel", redis_sentinel_master="q")
    assert sentinel.rq_redis == sentinel.redis  # shares the Sentinel-managed primary
    cluster = CommonSettings(redis_url="redis://n1,n2", redis_mode="cluster")
    assert cluster.rq_redis is None  # media jobs are refused rather than run on a Cluster
    own = CommonSettings(redis_url="redis://n1,n2", redis_mode="cluster", rq_redis_url="redis://s:26379",
                         rq_redis_mode="sentinel", rq_sentinel_master="media")
    assert own.rq_redis == RedisTarget("redis://s:26379", RedisMode.SENTINEL, "media")
    with pytest.raises(ValidationError, match="rq does not support Redis Cluster"):
        CommonSettings(rq_redis_url="redis://n1", rq_redis_mode="cluster")


def test_a_redis_older_than_7_is_refused_with_what_to_do():
    from broker.connection import check_server

    class Old:
        def info(self, section):
            return {"redis_version": "6.2.14"}

    with pytest.raises(RuntimeError, match="Redis 6.2.14 is too old.*7.0 or later.*upgrade redis-server"):
        check_server(Old())

    class Down:
        def info(self, section):
            raise redis.ConnectionError("refused")

    check_server(Down())  # not known yet: the components wait for it
