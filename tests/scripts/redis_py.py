"""redis-py (Debian's python3-redis) against a Meshwork cache node: what an
application written in Python does with it. Run by tests/tests/cache.rs with the
node's port; prints "ok" when every check held."""
import sys
import time

import redis

port = int(sys.argv[1])
r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
assert r.ping()
r.flushall()
assert r.set("a", "1", ex=100) is True
assert r.get("a") == "1"
assert r.ttl("a") in (99, 100)
assert r.incrby("n", 5) == 5
assert r.mset({"x": "1", "y": "2"}) and r.mget("x", "y", "z") == ["1", "2", None]
p = r.pipeline(transaction=True)
p.set("t", "v").incr("n").get("t")
assert p.execute() == [True, 6, "v"], "multi/exec pipeline"
p = r.pipeline(transaction=False)
for i in range(100): p.set(f"k{i}", i)
assert all(p.execute())
assert len(list(r.scan_iter(match="k*", count=7))) == 100
r.hset("h", mapping={f"f{i}": i for i in range(300)})
assert len(dict(r.hscan_iter("h", count=10))) == 300
assert r.hgetall("h")["f7"] == "7"
r.sadd("s", *range(500))
assert len(set(r.sscan_iter("s", count=20))) == 500
assert r.scard("s") == 500
r.zadd("z", {"a": 1, "b": 2.5, "c": -1})
assert r.zrange("z", 0, -1, withscores=True) == [("c", -1.0), ("a", 1.0), ("b", 2.5)]
assert r.zscan("z")[1] == [("c", -1.0), ("a", 1.0), ("b", 2.5)]
assert r.zrangebyscore("z", "(1", "+inf") == ["b"]
assert r.zpopmin("z") == [("c", -1.0)]
assert r.zincrby("z", 2, "a") == 3.0
r.rpush("l", *"abc")
assert r.lrange("l", 0, -1) == ["a", "b", "c"]
assert r.blpop(["l"], timeout=1) == ("l", "a")
assert r.blpop(["empty"], timeout=0.2) is None
# An optimistic transaction: WATCH, read, MULTI, write, EXEC.
with r.pipeline() as p:
    p.watch("n")
    v = int(p.get("n"))
    p.multi()
    p.set("n", v + 1)
    assert p.execute() == [True]
# pubsub
ps = r.pubsub()
ps.subscribe("ch")
ps.psubscribe("c*")
# Both subscriptions confirmed before anything is published.
confirmed = 0
deadline = time.time() + 5
while confirmed < 2 and time.time() < deadline:
    m = ps.get_message(timeout=1)
    if m and m["type"] in ("subscribe", "psubscribe"):
        confirmed += 1
assert confirmed == 2
assert r.publish("ch", "hi") == 2
msgs = []
deadline = time.time() + 5
while len(msgs) < 2 and time.time() < deadline:
    m = ps.get_message(timeout=1)
    if m and m["type"] in ("message", "pmessage"): msgs.append(m["data"])
assert msgs == ["hi", "hi"], msgs
ps.close()
info = r.info()
assert "used_memory" in info and "keyspace_hits" in info and info["connected_clients"] >= 1
assert r.info("keyspace")["db0"]["keys"] > 0
assert r.config_get("maxmemory") == {"maxmemory": "0"}
assert r.client_setname("py") and r.client_getname() == "py"
assert any(c.get("name") == "py" for c in r.client_list())
assert r.dbsize() > 0
assert r.type("h") == "hash" and r.type("nope") == "none"
assert r.randomkey() is not None
r.config_set("slowlog-log-slower-than", 0)
r.get("a")
log = r.slowlog_get(2)
assert log[0]["command"] == b"GET a", log
assert r.slowlog_len() >= 1
r.slowlog_reset()
assert r.command_count() > 100
try:
    r.execute_command("NOSUCH")
    assert False
except redis.ResponseError as e:
    assert "unknown command" in str(e)
try:
    r.lpush("a", "x")
    assert False
except redis.ResponseError as e:
    assert str(e).startswith("WRONGTYPE"), e
print("ok")
