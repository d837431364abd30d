//! The cache node against Debian's redis-server 7.0 (a peer: skipped when missing,
//! failed under `MESHWORK_REQUIRE_PEERS=1`): the same requests over real sockets to
//! both, the replies compared byte for byte — strings, keys, expiry, errors, RESP3,
//! inline requests, pipelining and protocol errors — and `redis-cli` against ours.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshwork_cache::{CacheConfig, Workers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A redis-server child on a free port, without persistence; killed when dropped.
struct Redis {
    addr: SocketAddr,
    child: Child,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis() -> Option<Redis> {
    let bin = meshwork_testkit::peer::at(
        "redis-server",
        "MESHWORK_REDIS_SERVER",
        "/usr/bin/redis-server",
    )?;
    let port = free_port();
    let child = Command::new(bin)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "redis-server not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(Redis { addr, child })
}

async fn ours(cfg: CacheConfig) -> (SocketAddr, Workers) {
    let w = meshwork_cache::spawn_workers("127.0.0.1:0".parse().unwrap(), cfg, Some(2)).unwrap();
    (w.addr, w)
}

/// Multibulk encoding of one command.
fn cmd(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// The length of the complete reply at the front of `b`, if it is all there.
fn reply_len(b: &[u8]) -> Option<usize> {
    let line_end = b.windows(2).position(|w| w == b"\r\n")?;
    let head = std::str::from_utf8(&b[1..line_end]).ok()?;
    let after = line_end + 2;
    match b.first()? {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' => Some(after),
        b'$' | b'=' => {
            let n: i64 = head.parse().ok()?;
            if n < 0 {
                return Some(after);
            }
            let end = after + n as usize + 2;
            (b.len() >= end).then_some(end)
        }
        b'*' | b'~' | b'%' | b'>' => {
            let n: i64 = head.parse().ok()?;
            let items = if b[0] == b'%' { n * 2 } else { n };
            let mut at = after;
            for _ in 0..items.max(0) {
                at += reply_len(&b[at..])?;
            }
            Some(at)
        }
        _ => None,
    }
}

/// A connection that sends raw bytes and reads whole replies.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).await.unwrap();
    }

    /// The next reply's bytes; empty when the server closed the connection.
    async fn reply(&mut self) -> Vec<u8> {
        loop {
            if let Some(n) = reply_len(&self.buf) {
                return self.buf.drain(..n).collect();
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .unwrap_or_else(|_| {
                    panic!("no whole reply within 10 s; have {:?}", show(&self.buf))
                })
                .unwrap_or(0);
            if n == 0 {
                return std::mem::take(&mut self.buf);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn call(&mut self, args: &[&str]) -> Vec<u8> {
        self.send(&cmd(args)).await;
        self.reply().await
    }
}

const SCRIPT: &[&[&str]] = &[
    &["SET", "k", "v"],
    &["GET", "k"],
    &["GET", "nokey"],
    &["SET", "k", "v2", "XX", "GET"],
    &["SET", "k2", "x", "NX"],
    &["SET", "k2", "y", "NX"],
    &["SET", "k3", "z", "XX"],
    &["SET", "n", "10"],
    &["INCR", "n"],
    &["INCRBY", "n", "5"],
    &["DECR", "n"],
    &["DECRBY", "n", "3"],
    &["INCR", "k"],
    &["INCRBY", "n", "abc"],
    &["INCRBY", "n", "01"],
    &["SET", "big", "9223372036854775807"],
    &["INCR", "big"],
    &["INCRBYFLOAT", "f", "1.5"],
    &["INCRBYFLOAT", "f", "2"],
    &["INCRBYFLOAT", "f", "x"],
    &["APPEND", "a", "hello"],
    &["APPEND", "a", " world"],
    &["STRLEN", "a"],
    &["STRLEN", "nokey"],
    &["GETRANGE", "a", "0", "4"],
    &["GETRANGE", "a", "-5", "-1"],
    &["GETRANGE", "a", "20", "30"],
    &["SETRANGE", "a", "6", "W"],
    &["SETRANGE", "pad", "3", "x"],
    &["GET", "pad"],
    &["GET", "a"],
    &["MSET", "x", "1", "y", "2"],
    &["MSET", "x", "1", "y"],
    &["MGET", "x", "y", "nokey", "n"],
    &["MSETNX", "x", "3", "z", "4"],
    &["MSETNX", "z", "3", "w", "4"],
    &["EXISTS", "x", "y", "nokey", "x"],
    &["DEL", "x", "nokey"],
    &["TYPE", "y"],
    &["TYPE", "nokey"],
    &["EXPIRE", "y", "100"],
    &["TTL", "y"],
    &["PERSIST", "y"],
    &["PERSIST", "y"],
    &["TTL", "y"],
    &["TTL", "nokey"],
    &["PTTL", "nokey"],
    &["PEXPIRE", "y", "100000", "NX"],
    &["EXPIRE", "y", "50", "GT"],
    &["EXPIRE", "y", "500", "GT"],
    &["EXPIRE", "y", "50", "NX", "XX"],
    &["EXPIRE", "y", "50", "FOO"],
    &["EXPIRE", "y", "x"],
    &["EXPIRE", "nokey", "10"],
    &["RENAME", "y", "y2"],
    &["RENAME", "nokey", "z2"],
    &["RENAMENX", "y2", "a"],
    &["RENAMENX", "y2", "y3"],
    &["GETDEL", "y3"],
    &["GETDEL", "y3"],
    &["GETSET", "gs", "1"],
    &["GETSET", "gs", "2"],
    &["SETNX", "gs", "3"],
    &["SETEX", "s", "0", "v"],
    &["SETEX", "s", "100", "v"],
    &["PSETEX", "s", "-1", "v"],
    &["SET", "s", "v", "EX", "0"],
    &["SET", "s", "v", "EX", "abc"],
    &["SET", "s", "v", "NX", "XX"],
    &["SET", "s", "v", "EX", "10", "PX", "100"],
    &["SET", "s", "v", "KEEPTTL"],
    &["GETEX", "a", "PERSIST"],
    &["GETEX", "a", "EX", "100"],
    &["GETEX", "a", "EX"],
    &["GETEX", "nokey"],
    &["SET", "gone", "1", "PX", "1"],
    &["DBSIZE"],
    &["SELECT", "16"],
    &["SELECT", "x"],
    &["SELECT", "1"],
    &["GET", "k"],
    &["SELECT", "0"],
    &["ECHO", "hi"],
    &["PING"],
    &["PING", "x"],
    &["FOOBAR", "a", "b"],
    &["GET"],
    &["SET", "k"],
    &["HELLO", "4"],
    &["CLIENT", "SETNAME", "my-conn"],
    &["CLIENT", "GETNAME"],
    &["CLIENT", "SETNAME", "bad name"],
    &["AUTH", "x"],
    &["COMMAND", "FOO"],
    &["HSET", "h", "f1", "v1", "f2", "v2"],
    &["HSET", "h", "f1", "x"],
    &["HGET", "h", "f1"],
    &["HGET", "h", "nof"],
    &["HGET", "nokey", "f"],
    &["HMGET", "h", "f1", "nof", "f2"],
    &["HMGET", "nokey", "a", "b"],
    &["HGETALL", "h"],
    &["HKEYS", "h"],
    &["HVALS", "h"],
    &["HLEN", "h"],
    &["HEXISTS", "h", "f2"],
    &["HSTRLEN", "h", "f2"],
    &["HSETNX", "h", "f1", "y"],
    &["HSETNX", "h", "f3", "z"],
    &["HDEL", "h", "f3", "nof"],
    &["HINCRBY", "h", "n", "5"],
    &["HINCRBY", "h", "f1", "1"],
    &["HINCRBY", "h", "n", "x"],
    &["HSET", "h", "a"],
    &["HGETALL", "nokey"],
    &["GET", "h"],
    &["HGET", "k", "f1"],
    &["TYPE", "h"],
    &["HMSET", "h2", "a", "1", "b", "2"],
    &["HGETALL", "h2"],
    &["HDEL", "h2", "a", "b"],
    &["EXISTS", "h2"],
    &["RPUSH", "l", "a", "b", "c"],
    &["LPUSH", "l", "z"],
    &["LRANGE", "l", "0", "-1"],
    &["LRANGE", "l", "1", "2"],
    &["LRANGE", "l", "5", "10"],
    &["LRANGE", "l", "-2", "-1"],
    &["LRANGE", "l", "-100", "100"],
    &["LINDEX", "l", "0"],
    &["LINDEX", "l", "-1"],
    &["LINDEX", "l", "9"],
    &["LLEN", "l"],
    &["LPOP", "l"],
    &["RPOP", "l"],
    &["LPOP", "l", "5"],
    &["LPOP", "l"],
    &["EXISTS", "l"],
    &["LPOP", "nokey", "2"],
    &["RPUSHX", "nokey", "a"],
    &["LPUSH", "l2", "a", "a", "b", "a"],
    &["LREM", "l2", "2", "a"],
    &["LRANGE", "l2", "0", "-1"],
    &["LREM", "l2", "-1", "a"],
    &["LSET", "l2", "0", "q"],
    &["LSET", "l2", "9", "q"],
    &["LSET", "nokey", "0", "q"],
    &["RPUSH", "l2", "x", "y"],
    &["LTRIM", "l2", "1", "-1"],
    &["LRANGE", "l2", "0", "-1"],
    &["TYPE", "l2"],
    &["LPOP", "l2", "-1"],
    &["LLEN", "k"],
    &["SADD", "s", "a", "b", "c", "a"],
    &["SCARD", "s"],
    &["SISMEMBER", "s", "a"],
    &["SISMEMBER", "s", "z"],
    &["SMISMEMBER", "s", "a", "z"],
    &["SREM", "s", "a", "z"],
    &["SCARD", "s"],
    &["SADD", "s1", "only"],
    &["SMEMBERS", "s1"],
    &["SRANDMEMBER", "s1"],
    &["SPOP", "nokey"],
    &["SPOP", "nokey", "2"],
    &["SRANDMEMBER", "nokey", "2"],
    &["SPOP", "s1"],
    &["EXISTS", "s1"],
    &["SMEMBERS", "nokey"],
    &["SPOP", "s", "-1"],
    &["TYPE", "s"],
    &["SADD", "k", "x"],
    &["FLUSHDB"],
    &["DBSIZE"],
    &["KEYS", "*"],
];

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).replace("\r\n", "\\r\\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_match_redis_byte_for_byte() {
    let Some(r) = redis() else { return };
    let (a, _stop) = ours(CacheConfig::default()).await;
    let (mut mine, mut theirs) = (Conn::open(a).await, Conn::open(r.addr).await);
    for args in SCRIPT {
        let (m, t) = (mine.call(args).await, theirs.call(args).await);
        assert_eq!(show(&m), show(&t), "{args:?}");
    }

    // Pipelined: all sent at once, answered in order.
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.extend(cmd(&["SET", &format!("p{i}"), &i.to_string()]));
        batch.extend(cmd(&["INCR", &format!("p{i}")]));
    }
    batch.extend_from_slice(b"GET p7\r\nset q \"a b\\x41\" \r\nGET q\r\n");
    mine.send(&batch).await;
    theirs.send(&batch).await;
    for _ in 0..203 {
        let (m, t) = (mine.reply().await, theirs.reply().await);
        assert_eq!(show(&m), show(&t));
    }

    // RESP3 after HELLO 3 (HELLO's own map differs: server details).
    let (m, t) = (
        mine.call(&["HELLO", "3"]).await,
        theirs.call(&["HELLO", "3"]).await,
    );
    assert_eq!((m[0], t[0]), (b'%', b'%'));
    for args in [
        &["GET", "nokey"][..],
        &["SET", "r3", "1"],
        &["INCRBYFLOAT", "r3", "0.5"],
        &["MGET", "r3", "nokey"],
        &["TTL", "r3"],
        &["GET", "p7"],
        &["SADD", "r3s", "x"],
        &["SMEMBERS", "r3s"],
        &["SPOP", "nokey", "2"],
        &["HSET", "r3h", "a", "1"],
        &["HGETALL", "r3h"],
        &["HGETALL", "nokey"],
        &["LPOP", "nokey", "2"],
        &["HMGET", "r3h", "a", "b"],
    ] {
        let (m, t) = (mine.call(args).await, theirs.call(args).await);
        assert_eq!(show(&m), show(&t), "RESP3 {args:?}");
    }

    // Protocol errors: the same error, then the connection closed.
    for bad in [
        &b"*1\r\n+x\r\n"[..],
        b"*x\r\n",
        b"*1\r\n$-5\r\n",
        b"set \"a\r\n",
    ] {
        let (mut m, mut t) = (Conn::open(a).await, Conn::open(r.addr).await);
        m.send(bad).await;
        t.send(bad).await;
        let (em, et) = (m.reply().await, t.reply().await);
        assert_eq!(show(&em), show(&et), "{:?}", show(bad));
        assert!(m.reply().await.is_empty(), "closed after {:?}", show(bad));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_lazily_and_in_the_background() {
    let (a, _stop) = ours(CacheConfig::default()).await;
    let mut c = Conn::open(a).await;
    for i in 0..2000 {
        c.send(&cmd(&["SET", &format!("e{i}"), "v", "PX", "50"]))
            .await;
    }
    for _ in 0..2000 {
        assert_eq!(c.reply().await, b"+OK\r\n");
    }
    assert_eq!(c.call(&["SET", "keep", "v"]).await, b"+OK\r\n");
    assert_eq!(c.call(&["DBSIZE"]).await, b":2001\r\n");
    // Nobody reads them: the background expiry removes them all.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if c.call(&["DBSIZE"]).await == b":1\r\n" {
            break;
        }
        assert!(Instant::now() < deadline, "expired keys not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.call(&["GET", "e5"]).await, b"$-1\r\n");
    assert_eq!(c.call(&["GET", "keep"]).await, b"$1\r\nv\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_guards_every_command_and_limits_hold() {
    let cfg = CacheConfig {
        password: Some("s3cret".into()),
        max_clients: 3,
        ..CacheConfig::default()
    };
    let (a, _stop) = ours(cfg).await;
    let mut c = Conn::open(a).await;
    assert_eq!(
        c.call(&["GET", "k"]).await,
        b"-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        c.call(&["AUTH", "nope"]).await,
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(c.call(&["AUTH", "default", "s3cret"]).await, b"+OK\r\n");
    assert_eq!(c.call(&["GET", "k"]).await, b"$-1\r\n");
    let mut h = Conn::open(a).await;
    let r = h.call(&["HELLO", "3", "AUTH", "default", "s3cret"]).await;
    assert_eq!(r[0], b'%');
    // Past max_clients: refused with Redis' error, the others unharmed.
    let mut third = Conn::open(a).await;
    assert_eq!(third.call(&["AUTH", "s3cret"]).await, b"+OK\r\n");
    let mut fourth = Conn::open(a).await;
    assert_eq!(
        fourth.reply().await,
        b"-ERR max number of clients reached\r\n"
    );
    assert!(fourth.reply().await.is_empty());
    assert_eq!(c.call(&["PING"]).await, b"+PONG\r\n");
    // A giant declared bulk is refused before anything is allocated for it.
    // QUIT frees the third's slot before its connection closes.
    assert_eq!(third.call(&["QUIT"]).await, b"+OK\r\n");
    assert!(third.reply().await.is_empty());
    let mut g = Conn::open(a).await;
    g.send(b"*2\r\n$3\r\nGET\r\n$9999999999\r\n").await;
    let r = g.reply().await;
    assert!(
        r == b"-ERR Protocol error: invalid bulk length\r\n" || r.is_empty(),
        "{}",
        show(&r)
    );
    assert_eq!(c.call(&["PING"]).await, b"+PONG\r\n");
}

#[test]
fn redis_cli_works_against_the_node() {
    let Some(cli) =
        meshwork_testkit::peer::at("redis-cli", "MESHWORK_REDIS_CLI", "/usr/bin/redis-cli")
    else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, _stop) = rt.block_on(ours(CacheConfig::default()));
    let run = |args: &[&str]| {
        let out = Command::new(&cli)
            .args(["-h", "127.0.0.1", "-p", &a.port().to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&["PING"]), "PONG");
    assert_eq!(run(&["SET", "greeting", "hello world"]), "OK");
    assert_eq!(run(&["GET", "greeting"]), "hello world");
    assert_eq!(run(&["INCRBY", "visits", "41"]), "41");
    assert_eq!(run(&["INCR", "visits"]), "42");
    assert_eq!(run(&["-3", "SET", "r3", "x"]), "OK");
    assert!(run(&["NOSUCH"]).contains("unknown command"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_matches_redis_byte_for_byte() {
    let Some(r) = redis() else { return };
    let (a, _stop) = ours(CacheConfig::default()).await;
    let (mut ms, mut ts) = (Conn::open(a).await, Conn::open(r.addr).await);
    let (mut mp, mut tp) = (Conn::open(a).await, Conn::open(r.addr).await);
    // (connection: 0 subscriber, 1 publisher; command; replies it gets)
    let steps: &[(usize, &[&str], usize)] = &[
        (0, &["SUBSCRIBE", "news", "sports"], 2),
        (0, &["PSUBSCRIBE", "n*"], 1),
        (0, &["SUBSCRIBE", "news"], 1),
        (0, &["GET", "k"], 1),
        (0, &["PING"], 1),
        (0, &["PING", "hi"], 1),
        (1, &["PUBLISH", "news", "hello"], 1),
        (0, &[], 2),
        (1, &["PUBLISH", "nowhere", "x"], 1),
        (1, &["PUBLISH", "nat", "y"], 1),
        // "nowhere" matches n* too.
        (0, &[], 2),
        (1, &["PUBSUB", "NUMSUB", "news", "nowhere"], 1),
        (1, &["PUBSUB", "NUMPAT"], 1),
        (1, &["PUBSUB", "CHANNELS", "n*"], 1),
        (0, &["UNSUBSCRIBE", "news"], 1),
        (0, &["UNSUBSCRIBE"], 1),
        (0, &["PUNSUBSCRIBE"], 1),
        (0, &["UNSUBSCRIBE"], 1),
        (0, &["PUNSUBSCRIBE", "nope"], 1),
        (0, &["GET", "k"], 1),
        (1, &["PUBLISH", "news", "late"], 1),
        (0, &["HELLO", "3"], 1),
        (0, &["SUBSCRIBE", "r3"], 1),
        (0, &["SET", "k", "v"], 1),
        (1, &["PUBLISH", "r3", "pushed"], 1),
        (0, &[], 1),
        (0, &["PING"], 1),
    ];
    for (who, args, replies) in steps {
        let (m, t) = if *who == 0 {
            (&mut ms, &mut ts)
        } else {
            (&mut mp, &mut tp)
        };
        if !args.is_empty() {
            m.send(&cmd(args)).await;
            t.send(&cmd(args)).await;
        }
        for i in 0..*replies {
            let (x, y) = (m.reply().await, t.reply().await);
            if args.first() == Some(&"HELLO") {
                assert_eq!((x[0], y[0]), (b'%', b'%'));
                continue;
            }
            assert_eq!(show(&x), show(&y), "{args:?} reply {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_cut_off_and_others_go_on() {
    let (a, _stop) = ours(CacheConfig::default()).await;
    let mut lazy = Conn::open(a).await;
    lazy.send(&cmd(&["SUBSCRIBE", "firehose"])).await;
    let mut good = Conn::open(a).await;
    assert!(
        good.call(&["SUBSCRIBE", "firehose"])
            .await
            .starts_with(b"*3\r\n")
    );
    let mut p = Conn::open(a).await;
    let payload = "x".repeat(64 * 1024);
    // 64 MiB published; the lazy one reads nothing (past its 32 MiB it is cut off).
    let mut got = 0usize;
    for _ in 0..1024 {
        p.send(&cmd(&["PUBLISH", "firehose", &payload])).await;
        assert!(p.reply().await.starts_with(b":"));
        // The good one keeps up.
        let m = good.reply().await;
        assert!(m.starts_with(b"*3\r\n$7\r\nmessage\r\n"));
        got += 1;
    }
    assert_eq!(got, 1024);
    // The lazy one was disconnected: reading it now ends in EOF after what was sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = lazy.reply().await;
        if r.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lazy subscriber is still connected"
        );
    }
    // The node serves on.
    assert_eq!(p.call(&["PUBLISH", "firehose", "x"]).await, b":1\r\n");
}

/// `INFO`'s `used_memory`.
async fn used_memory(c: &mut Conn) -> usize {
    let info = String::from_utf8(c.call(&["INFO"]).await).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

async fn dbsize(c: &mut Conn) -> usize {
    let r = String::from_utf8(c.call(&["DBSIZE"]).await).unwrap();
    r.trim_start_matches(':').trim().parse().unwrap()
}

fn limited(policy: meshwork_cache::db::Policy) -> CacheConfig {
    CacheConfig {
        maxmemory: 1024 * 1024,
        policy,
        ..CacheConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_maxmemory_noeviction_refuses_writes_and_reads_go_on() {
    let (a, _w) = ours(limited(meshwork_cache::db::Policy::NoEviction)).await;
    let mut c = Conn::open(a).await;
    let value = "v".repeat(200);
    let mut refused = None;
    for i in 0..20_000 {
        let r = c.call(&["SET", &format!("k{i}"), &value]).await;
        if r != b"+OK\r\n" {
            refused = Some((i, r));
            break;
        }
    }
    let (i, r) = refused.expect("writes refused past maxmemory");
    assert_eq!(
        r,
        b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
    );
    assert!(used_memory(&mut c).await <= 1024 * 1024 + 1024);
    assert_eq!(c.call(&["GET", "k0"]).await.len(), 200 + 8, "reads go on");
    assert_eq!(dbsize(&mut c).await, i);
    // Deleting makes room again.
    for j in 0..100 {
        c.call(&["DEL", &format!("k{j}")]).await;
    }
    assert_eq!(c.call(&["SET", "again", "x"]).await, b"+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allkeys_lru_and_lfu_stay_under_maxmemory_and_keep_what_is_used() {
    use meshwork_cache::db::Policy;
    for policy in [Policy::AllKeysLru, Policy::AllKeysLfu] {
        let (a, _w) = ours(limited(policy)).await;
        let mut c = Conn::open(a).await;
        let value = "v".repeat(200);
        for h in 0..20 {
            assert_eq!(
                c.call(&["SET", &format!("hot{h}"), &value]).await,
                b"+OK\r\n"
            );
        }
        for i in 0..20_000 {
            assert_eq!(
                c.call(&["SET", &format!("k{i}"), &value]).await,
                b"+OK\r\n",
                "{policy:?}"
            );
            if i % 50 == 0 {
                // The hot keys are read all along (often, for LFU's counter).
                for h in 0..20 {
                    c.send(&cmd(&["GET", &format!("hot{h}")])).await;
                }
                for _ in 0..20 {
                    c.reply().await;
                }
            }
        }
        let used = used_memory(&mut c).await;
        assert!(used <= 1024 * 1024 + 1024, "{policy:?}: {used}");
        let n = dbsize(&mut c).await;
        assert!((1000..20_020).contains(&n), "{policy:?}: {n} keys");
        let mut kept = 0;
        for h in 0..20 {
            kept += usize::from(c.call(&["EXISTS", &format!("hot{h}")]).await == b":1\r\n");
        }
        assert!(kept >= 18, "{policy:?}: {kept} of 20 hot keys kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_policies_evict_only_keys_with_a_ttl() {
    use meshwork_cache::db::Policy;
    for policy in [Policy::VolatileLru, Policy::VolatileTtl] {
        let (a, _w) = ours(limited(policy)).await;
        let mut c = Conn::open(a).await;
        let value = "v".repeat(200);
        for i in 0..1000 {
            assert_eq!(
                c.call(&["SET", &format!("keep{i}"), &value]).await,
                b"+OK\r\n"
            );
        }
        let mut oom = false;
        for i in 0..20_000 {
            let r = c
                .call(&[
                    "SET",
                    &format!("t{i}"),
                    &value,
                    "EX",
                    &(1000 + i).to_string(),
                ])
                .await;
            if r != b"+OK\r\n" {
                assert_eq!(
                    r,
                    b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
                );
                oom = true;
                break;
            }
        }
        assert!(!oom, "{policy:?}: keys with a TTL make room");
        for i in 0..1000 {
            assert_eq!(
                c.call(&["EXISTS", &format!("keep{i}")]).await,
                b":1\r\n",
                "{policy:?}"
            );
        }
        // Only keys without a TTL left to evict: writes refused.
        c.call(&["FLUSHDB"]).await;
        let mut refused = false;
        for i in 0..20_000 {
            if c.call(&["SET", &format!("p{i}"), &value]).await != b"+OK\r\n" {
                refused = true;
                break;
            }
        }
        assert!(refused, "{policy:?}");
    }
}

/// Every key present from the start to the end of a SCAN is returned, whatever is
/// deleted or added meanwhile; MATCH and TYPE filter; `redis-cli --scan` walks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_returns_every_key_that_stays() {
    let (a, _w) = ours(CacheConfig::default()).await;
    let mut c = Conn::open(a).await;
    for i in 0..2000 {
        c.send(&cmd(&["SET", &format!("k{i}"), "v"])).await;
    }
    for _ in 0..2000 {
        c.reply().await;
    }
    c.call(&["HSET", "h1", "f", "v"]).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor = "0".to_string();
    let mut round = 0;
    loop {
        let raw = c.call(&["SCAN", &cursor, "COUNT", "25"]).await;
        let text = String::from_utf8(raw).unwrap();
        let parts: Vec<&str> = text.split("\r\n").collect();
        // *2, $n, cursor, *m, ($n, key)*
        cursor = parts[2].to_string();
        for k in parts[4..].iter().skip(1).step_by(2) {
            if !k.is_empty() {
                seen.insert(k.to_string());
            }
        }
        // Meanwhile: odd keys deleted, new ones added.
        round += 1;
        if round < 40 {
            for j in 0..25 {
                let n = (round * 25 + j) * 2 + 1;
                c.call(&["DEL", &format!("k{n}")]).await;
                c.call(&["SET", &format!("new{round}-{j}"), "v"]).await;
            }
        }
        if cursor == "0" {
            break;
        }
        assert!(round < 10_000, "SCAN does not end");
    }
    for i in (0..2000).step_by(2) {
        assert!(seen.contains(&format!("k{i}")), "k{i} never returned");
    }
    // Filters.
    let r = String::from_utf8(
        c.call(&["SCAN", "0", "MATCH", "h*", "COUNT", "100000"])
            .await,
    )
    .unwrap();
    assert!(r.ends_with("*1\r\n$2\r\nh1\r\n"), "{r}");
    let r = String::from_utf8(
        c.call(&["SCAN", "0", "TYPE", "hash", "COUNT", "100000"])
            .await,
    )
    .unwrap();
    assert!(r.ends_with("*1\r\n$2\r\nh1\r\n"), "{r}");
    assert_eq!(c.call(&["SCAN", "x"]).await, b"-ERR invalid cursor\r\n");
    assert_eq!(
        c.call(&["SCAN", "0", "COUNT", "0"]).await,
        b"-ERR syntax error\r\n"
    );

    if let Some(cli) =
        meshwork_testkit::peer::at("redis-cli", "MESHWORK_REDIS_CLI", "/usr/bin/redis-cli")
    {
        let out = Command::new(cli)
            .args(["-p", &a.port().to_string(), "--scan", "--pattern", "k1*"])
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        let want = (0..2000)
            .filter(|i| i.to_string().starts_with('1') && (i % 2 == 0 || *i < 2))
            .count();
        assert!(
            listed.lines().count() >= want,
            "{} < {want}",
            listed.lines().count()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_match_redis_byte_for_byte() {
    let Some(r) = redis() else { return };
    let (a, _stop) = ours(CacheConfig::default()).await;
    let mut conns = [
        (Conn::open(a).await, Conn::open(r.addr).await),
        (Conn::open(a).await, Conn::open(r.addr).await),
    ];
    let steps: &[(usize, &[&str])] = &[
        (0, &["MULTI"]),
        (0, &["SET", "a", "1"]),
        (0, &["INCR", "a"]),
        (0, &["GET", "a"]),
        (0, &["EXEC"]),
        (0, &["MULTI"]),
        (0, &["MULTI"]),
        (0, &["DISCARD"]),
        (0, &["DISCARD"]),
        (0, &["EXEC"]),
        (0, &["MULTI"]),
        (0, &["SET", "a"]),
        (0, &["GET", "a"]),
        (0, &["EXEC"]),
        (0, &["MULTI"]),
        (0, &["NOPE", "x"]),
        (0, &["EXEC"]),
        (0, &["SET", "s", "text"]),
        (0, &["MULTI"]),
        (0, &["INCR", "s"]),
        (0, &["SET", "after", "yes"]),
        (0, &["EXEC"]),
        (0, &["GET", "after"]),
        (0, &["WATCH", "w"]),
        (1, &["SET", "w", "2"]),
        (0, &["MULTI"]),
        (0, &["SET", "x", "1"]),
        (0, &["EXEC"]),
        (0, &["GET", "x"]),
        (0, &["WATCH", "w"]),
        (0, &["MULTI"]),
        (0, &["SET", "w", "3"]),
        (0, &["EXEC"]),
        (0, &["WATCH", "w"]),
        (0, &["UNWATCH"]),
        (1, &["SET", "w", "4"]),
        (0, &["MULTI"]),
        (0, &["PING"]),
        (0, &["EXEC"]),
        (0, &["MULTI"]),
        (0, &["WATCH", "w"]),
        (0, &["EXEC"]),
        (0, &["WATCH", "gone"]),
        (1, &["SET", "gone", "1", "PX", "1"]),
        (0, &["MULTI"]),
        (0, &["EXEC"]),
        (0, &["HELLO", "3"]),
        (0, &["WATCH", "w"]),
        (1, &["DEL", "w"]),
        (0, &["MULTI"]),
        (0, &["EXEC"]),
    ];
    for (who, args) in steps {
        let (m, t) = &mut conns[*who];
        let (x, y) = (m.call(args).await, t.call(args).await);
        if args[0] == "HELLO" {
            continue;
        }
        assert_eq!(show(&x), show(&y), "{args:?}");
    }
}

/// A transaction's commands run with nothing in between: concurrent MULTI/INCR/INCR/EXEC
/// blocks on keys in different shards always see their two increments together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_alone_across_shards() {
    let (a, _stop) = ours(CacheConfig::default()).await;
    let mut tasks = Vec::new();
    for t in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(a).await;
            for _ in 0..200 {
                let mut batch = cmd(&["MULTI"]);
                batch.extend(cmd(&["INCR", "left"]));
                batch.extend(cmd(&["INCR", "right"]));
                batch.extend(cmd(&["EXEC"]));
                c.send(&batch).await;
                for _ in 0..3 {
                    c.reply().await;
                }
                let exec = String::from_utf8(c.reply().await).unwrap();
                let n: Vec<i64> = exec
                    .split("\r\n")
                    .filter_map(|l| l.strip_prefix(':'))
                    .map(|v| v.parse().unwrap())
                    .collect();
                assert_eq!(n.len(), 2, "task {t}: {exec}");
                assert_eq!(n[0], n[1], "task {t}: another EXEC ran in between: {exec}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_pops_match_redis() {
    let Some(r) = redis() else { return };
    let (a, _stop) = ours(CacheConfig::default()).await;
    let mut conns = [
        (Conn::open(a).await, Conn::open(r.addr).await),
        (Conn::open(a).await, Conn::open(r.addr).await),
    ];
    // (who, command, wait for the reply now)
    let steps: &[(usize, &[&str], bool)] = &[
        (0, &["RPUSH", "q", "a", "b"], true),
        (0, &["BLPOP", "empty", "q", "1"], true),
        (0, &["BRPOP", "q", "1"], true),
        (0, &["BLPOP", "q", "0.05"], true),
        (0, &["BLPOP", "q", "abc"], true),
        (0, &["BLPOP", "q", "-1"], true),
        (0, &["SET", "str", "x"], true),
        (0, &["BLPOP", "str", "1"], true),
        // Blocked, then woken by the other connection's push.
        (0, &["BRPOP", "w1", "w2", "0"], false),
        (1, &["LPUSH", "w2", "z"], true),
        (0, &[], true),
        (0, &["EXISTS", "w2"], true),
        (0, &["MULTI"], true),
        (0, &["BLPOP", "nothing", "0"], true),
        (0, &["EXEC"], true),
    ];
    for (who, args, now) in steps {
        let (m, t) = &mut conns[*who];
        if !args.is_empty() {
            m.send(&cmd(args)).await;
            t.send(&cmd(args)).await;
        }
        if *now {
            let (x, y) = (m.reply().await, t.reply().await);
            assert_eq!(show(&x), show(&y), "{args:?}");
        } else {
            // Give both servers time to block the client before the push.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A client that goes away while blocked leaves nothing behind, even when
    // the push comes right after its close (before the runtime has told the
    // server of it). Many times over: it is a race. (A BLPOP the server reads
    // only after the push takes the element, in Redis too: so each round
    // waits until INFO shows the client blocked. And a close the server's
    // kernel has not yet taken in cannot count against the server: each
    // round waits until the server's kernel has acknowledged the client's
    // FIN — sent by a half close, so the client's socket can still be asked —
    // before the push, which is then the server's race alone.)
    let mut c = Conn::open(a).await;
    for i in 0..50 {
        let key = format!("gone{i}");
        let mut gone = Conn::open(a).await;
        gone.send(&cmd(&["BLPOP", &key, "0"])).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&c.call(&["INFO", "clients"]).await)
            .contains("blocked_clients:1\r\n")
        {
            assert!(Instant::now() < deadline, "round {i}: never blocked");
            tokio::task::yield_now().await;
        }
        gone.s.shutdown().await.unwrap();
        while !fin_acknowledged(&gone.s) {
            assert!(
                Instant::now() < deadline,
                "round {i}: FIN never acknowledged"
            );
            // (The acknowledgement may be a delayed ACK: poll, do not spin.)
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(c.call(&["RPUSH", &key, "kept"]).await, b":1\r\n");
        drop(gone);
        assert_eq!(
            c.call(&["LPOP", &key]).await,
            b"$4\r\nkept\r\n",
            "round {i}"
        );
    }
}

/// Whether the peer's kernel has taken in the FIN `s` sent: its state by
/// `TCP_INFO` is FIN_WAIT2 (acknowledged), TIME_WAIT (the peer closed too) or
/// CLOSE (the peer reset it after).
fn fin_acknowledged(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    /// Linux's `TCP_FIN_WAIT2`, `TCP_TIME_WAIT` and `TCP_CLOSE` in
    /// `tcp_info.tcpi_state`.
    const FIN_WAIT2: u8 = 5;
    const TIME_WAIT: u8 = 6;
    const CLOSE: u8 = 7;
    #[allow(unsafe_code)]
    // SAFETY: `tcp_info` is plain data the kernel fills up to `len` bytes,
    // on a descriptor the stream owns for the call's duration.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        ) == 0
            && matches!(info.tcpi_state, FIN_WAIT2 | TIME_WAIT | CLOSE)
    }
}

/// Sorted sets, in RESP2 and then RESP3 (scores as doubles, pairs nested).
const ZSCRIPT: &[&[&str]] = &[
    &["ZADD", "z", "1", "a", "2", "b", "3", "c"],
    &["ZADD", "z", "1.1", "d", "-0", "e", "+inf", "f", "-inf", "g"],
    &["ZADD", "z", "nan", "x"],
    &["ZADD", "z", "abc", "x"],
    &["ZADD", "z", "1"],
    &["ZADD", "z", "NX", "XX", "1", "a"],
    &["ZADD", "z", "NX", "GT", "1", "a"],
    &["ZADD", "z", "GT", "LT", "1", "a"],
    &["ZADD", "z", "INCR", "1", "a", "2", "b"],
    &["ZADD", "z", "CH", "5", "a", "2", "b", "9", "new"],
    &[
        "ZADD", "z", "XX", "CH", "GT", "4", "a", "10", "b", "1", "nope",
    ],
    &["ZADD", "z", "INCR", "2.5", "a"],
    &["ZADD", "z", "NX", "INCR", "2.5", "a"],
    &["ZADD", "z", "LT", "INCR", "2.5", "a"],
    &["ZADD", "nokey", "XX", "1", "a"],
    &["ZADD", "nokey", "XX", "INCR", "1", "a"],
    &["ZINCRBY", "z", "0.1", "c"],
    &["ZINCRBY", "z", "x", "c"],
    &["ZINCRBY", "z", "-inf", "f"],
    &["ZSCORE", "z", "c"],
    &["ZSCORE", "z", "f"],
    &["ZSCORE", "z", "none"],
    &["ZSCORE", "nokey", "a"],
    &["ZMSCORE", "z", "a", "none", "e"],
    &["ZMSCORE", "nokey", "a", "b"],
    &["ZCARD", "z"],
    &["ZCARD", "nokey"],
    &["ZRANK", "z", "c"],
    &["ZREVRANK", "z", "c"],
    &["ZRANK", "z", "none"],
    &["ZRANGE", "z", "0", "-1"],
    &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    &["ZRANGE", "z", "-3", "-2", "withscores"],
    &["ZRANGE", "z", "5", "1"],
    &["ZRANGE", "z", "x", "1"],
    &["ZRANGE", "z", "0", "-1", "REV"],
    &["ZRANGE", "z", "0", "1", "LIMIT", "0", "1"],
    &["ZRANGE", "z", "(1", "5", "BYSCORE"],
    &["ZRANGE", "z", "5", "(1", "BYSCORE", "REV", "WITHSCORES"],
    &["ZRANGE", "z", "-inf", "+inf", "BYSCORE", "LIMIT", "1", "2"],
    &["ZRANGE", "z", "-inf", "+inf", "BYSCORE", "LIMIT", "-1", "2"],
    &["ZRANGE", "z", "-inf", "+inf", "BYSCORE", "LIMIT", "2", "0"],
    &["ZRANGE", "z", "x", "+inf", "BYSCORE"],
    &["ZRANGE", "z", "(5", "5", "BYSCORE"],
    &["ZRANGE", "z", "-", "+", "BYLEX", "WITHSCORES"],
    &["ZRANGE", "z", "0", "1", "BYSCORE", "BYLEX"],
    &["ZRANGE", "z", "0", "1", "REV", "REV"],
    &["ZRANGE", "nokey", "0", "-1"],
    &["ZREVRANGE", "z", "0", "2", "WITHSCORES"],
    &["ZREVRANGE", "z", "0", "2", "REV"],
    &[
        "ZRANGEBYSCORE",
        "z",
        "1",
        "3",
        "WITHSCORES",
        "LIMIT",
        "0",
        "2",
    ],
    &["ZRANGEBYSCORE", "z", "1", "3", "BYSCORE"],
    &["ZREVRANGEBYSCORE", "z", "+inf", "-inf"],
    &["ZCOUNT", "z", "(1", "+inf"],
    &["ZCOUNT", "z", "a", "b"],
    &[
        "ZADD", "lex", "0", "a", "0", "b", "0", "c", "0", "dd", "0", "e",
    ],
    &["ZRANGEBYLEX", "lex", "[b", "(dd"],
    &["ZRANGEBYLEX", "lex", "-", "+", "LIMIT", "1", "3"],
    &["ZREVRANGEBYLEX", "lex", "+", "[c"],
    &["ZRANGEBYLEX", "lex", "b", "c"],
    &["ZLEXCOUNT", "lex", "[b", "+"],
    &["ZREMRANGEBYLEX", "lex", "-", "[b"],
    &["ZREMRANGEBYRANK", "lex", "-1", "-1"],
    &["ZRANGE", "lex", "0", "-1"],
    &["ZREMRANGEBYSCORE", "z", "-inf", "(1"],
    &["ZREMRANGEBYSCORE", "z", "x", "1"],
    &["ZREMRANGEBYRANK", "z", "x", "1"],
    &["ZREM", "z", "a", "none"],
    &["ZPOPMIN", "z"],
    &["ZPOPMAX", "z", "2"],
    &["ZPOPMIN", "z", "0"],
    &["ZPOPMIN", "z", "-1"],
    &["ZPOPMIN", "nokey"],
    &["ZPOPMIN", "nokey", "3"],
    &["ZPOPMAX", "z", "100"],
    &["EXISTS", "z"],
    &["SET", "str", "x"],
    &["ZADD", "str", "1", "a"],
    &["ZRANGE", "str", "0", "-1"],
    &["ZSCORE", "str", "a"],
    &["ZADD", "t", "1", "a"],
    &["TYPE", "t"],
    &[
        "ZADD",
        "big",
        "123456789012345678",
        "a",
        "0.0001",
        "b",
        "0.00001",
        "c",
    ],
    &["ZRANGE", "big", "0", "-1", "WITHSCORES"],
    &["ZADD", "inf", "+inf", "a", "-inf", "b"],
    &["ZINCRBY", "inf", "-inf", "a"],
    &["ZADD", "inf", "INCR", "+inf", "b"],
    &["FLUSHDB"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_sets_match_redis_byte_for_byte() {
    let Some(r) = redis() else { return };
    let (a, _stop) = ours(CacheConfig::default()).await;
    for proto in ["2", "3"] {
        let (mut mine, mut theirs) = (Conn::open(a).await, Conn::open(r.addr).await);
        let (m, t) = (
            mine.call(&["HELLO", proto]).await,
            theirs.call(&["HELLO", proto]).await,
        );
        assert_eq!(m[0], t[0]);
        for args in ZSCRIPT {
            let (m, t) = (mine.call(args).await, theirs.call(args).await);
            assert_eq!(show(&m), show(&t), "RESP{proto} {args:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowlog_client_list_and_config_set_answer_as_redis() {
    let Some(r) = redis() else { return };
    let (a, _stop) = ours(CacheConfig::default()).await;
    let (mut mine, mut theirs) = (Conn::open(a).await, Conn::open(r.addr).await);
    for args in [
        &["CONFIG", "SET", "foo", "bar"][..],
        &["CONFIG", "SET", "slowlog-max-len", "x"],
        &["CONFIG", "SET", "slowlog-max-len", "-5"],
        &["CONFIG", "SET", "slowlog-log-slower-than", "-7"],
        &["CONFIG", "SET", "maxclients"],
        &["CONFIG", "SET", "slowlog-max-len", "3", "slowlog-max-len"],
        &["CONFIG", "GET", "slowlog-max-len"],
        &["SLOWLOG", "GET", "-2"],
        &["SLOWLOG", "GET", "x"],
        &["SLOWLOG", "NOPE"],
        &["SLOWLOG", "LEN", "x"],
        &["CLIENT", "LIST", "TYPE", "bogus"],
        &["CLIENT", "LIST", "ID", "x"],
        &["CLIENT", "LIST", "ID", "0"],
        &["CLIENT", "LIST", "foo"],
        &[
            "CONFIG",
            "SET",
            "slowlog-log-slower-than",
            "0",
            "slowlog-max-len",
            "2",
        ],
        &["SLOWLOG", "RESET"],
        &["SLOWLOG", "LEN"],
        &["CONFIG", "GET", "slowlog-log-slower-than"],
    ] {
        let (m, t) = (mine.call(args).await, theirs.call(args).await);
        assert_eq!(show(&m), show(&t), "{args:?}");
    }

    // Every command is logged now: the newest first, passwords redacted, the
    // client's address and name, at most two kept.
    assert_eq!(mine.call(&["CLIENT", "SETNAME", "me"]).await, b"+OK\r\n");
    assert!(
        mine.call(&["AUTH", "user", "secret"])
            .await
            .starts_with(b"-")
    );
    let log = show(&mine.call(&["SLOWLOG", "GET", "5"]).await);
    assert!(log.starts_with("*2\\r\\n*6\\r\\n"), "{log}");
    assert!(
        log.contains("$4\\r\\nAUTH\\r\\n$10\\r\\n(redacted)\\r\\n$10\\r\\n(redacted)\\r\\n"),
        "{log}"
    );
    assert!(log.contains("$2\\r\\nme\\r\\n"), "{log}");
    assert!(!log.contains("secret"), "{log}");
    assert!(log.contains("SETNAME"), "{log}");
    assert_eq!(mine.call(&["SLOWLOG", "LEN"]).await, b":2\r\n");

    // CLIENT LIST: one line per connection, Redis' fields.
    let mut other = Conn::open(a).await;
    assert_eq!(other.call(&["SELECT", "3"]).await, b"+OK\r\n");
    let list = String::from_utf8(mine.call(&["CLIENT", "LIST"]).await).unwrap();
    let body: Vec<&str> = list.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert_eq!(body.len(), 2, "{list}");
    assert!(
        body.iter()
            .any(|l| l.contains(" name=me ") && l.contains(" cmd=client ")),
        "{list}"
    );
    assert!(
        body.iter()
            .any(|l| l.contains(" db=3 ") && l.contains(" cmd=select ")),
        "{list}"
    );
    for l in &body {
        for field in [
            "id=",
            " addr=127.0.0.1:",
            " laddr=127.0.0.1:",
            " flags=N ",
            " resp=2",
        ] {
            assert!(l.contains(field), "{field} in {l}");
        }
    }
    drop(other);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = String::from_utf8(mine.call(&["CLIENT", "LIST"]).await).unwrap();
        if list.lines().filter(|l| l.starts_with("id=")).count() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed connection stays listed: {list}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info = String::from_utf8(mine.call(&["INFO"]).await).unwrap();
    for field in [
        "connected_clients:1\r\n",
        "instantaneous_ops_per_sec:",
        "evicted_keys:0\r\n",
        "expired_keys:0\r\n",
    ] {
        assert!(info.contains(field), "{field} in {info}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hscan_sscan_and_zscan_match_redis_and_walk_big_hashes() {
    let Some(r) = redis() else { return };
    let (a, _stop) = ours(CacheConfig::default()).await;
    let (mut mine, mut theirs) = (Conn::open(a).await, Conn::open(r.addr).await);
    for args in [
        &["HSET", "h", "a", "1", "b", "2", "ab", "3"][..],
        &["HSCAN", "h", "0"],
        &["HSCAN", "h", "0", "MATCH", "a*", "COUNT", "1"],
        &["HSCAN", "h", "x"],
        &["HSCAN", "h", "0", "COUNT", "0"],
        &["HSCAN", "h", "0", "TYPE", "string"],
        &["HSCAN", "h", "0", "MATCH"],
        &["HSCAN", "nokey", "0"],
        &["HSCAN", "h"],
        &["SADD", "s", "only"],
        &["SSCAN", "s", "0"],
        &["SSCAN", "s", "0", "MATCH", "x*"],
        &["ZADD", "z", "2.5", "b", "1", "a", "0.1", "c", "-inf", "d"],
        &["ZSCAN", "z", "0"],
        &["ZSCAN", "z", "0", "MATCH", "[ab]"],
        &["SET", "str", "v"],
        &["HSCAN", "str", "0"],
        &["SSCAN", "h", "0"],
        &["ZSCAN", "s", "0"],
        &["COMMAND", "DOCS", "nosuch"],
    ] {
        let (m, t) = (mine.call(args).await, theirs.call(args).await);
        assert_eq!(show(&m), show(&t), "{args:?}");
    }
    let (m, t) = (
        mine.call(&["HELLO", "3"]).await,
        theirs.call(&["HELLO", "3"]).await,
    );
    assert_eq!((m[0], t[0]), (b'%', b'%'));
    for args in [&["HSCAN", "h", "0"][..], &["ZSCAN", "z", "0"]] {
        let (m, t) = (mine.call(args).await, theirs.call(args).await);
        assert_eq!(show(&m), show(&t), "RESP3 {args:?}");
    }

    // A big hash, walked COUNT fields at a time while fields are removed and
    // added: every field present throughout comes back.
    let mut c = Conn::open(a).await;
    for i in 0..1000 {
        c.send(&cmd(&["HSET", "big", &format!("f{i}"), "v"])).await;
    }
    for _ in 0..1000 {
        assert_eq!(c.reply().await, b":1\r\n");
    }
    let mut seen = std::collections::HashSet::new();
    let mut cursor = "0".to_string();
    let mut calls = 0;
    loop {
        let reply =
            String::from_utf8(c.call(&["HSCAN", "big", &cursor, "COUNT", "50"]).await).unwrap();
        calls += 1;
        let lines: Vec<&str> = reply.split("\r\n").collect();
        cursor = lines[2].to_string();
        // *2, $n, cursor, *2k, then ($len, field, $len, value) per field.
        for l in lines.iter().skip(5).step_by(4) {
            seen.insert(l.to_string());
        }
        // Churn: remove one field of the first hundred, add a new one.
        c.call(&["HDEL", "big", &format!("f{}", (calls * 3) % 100)])
            .await;
        c.call(&["HSET", "big", &format!("new{calls}"), "v"]).await;
        if cursor == "0" {
            break;
        }
        assert!(calls < 100, "the walk ends");
    }
    assert!(calls >= 20, "walked in steps, not at once: {calls}");
    for i in 100..1000 {
        assert!(seen.contains(&format!("f{i}")), "f{i} missed");
    }
}

/// A big set walked `COUNT` members at a time while members are removed and added:
/// every member present throughout comes back; `SPOP` with a count takes distinct
/// members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sscan_walks_big_sets_and_spop_takes_distinct_members() {
    let (a, _stop) = ours(CacheConfig::default()).await;
    let mut c = Conn::open(a).await;
    for i in 0..1000 {
        c.send(&cmd(&["SADD", "bigs", &format!("m{i}")])).await;
    }
    for _ in 0..1000 {
        assert_eq!(c.reply().await, b":1\r\n");
    }
    let (seen, calls) = walk(&mut c, "SSCAN", "bigs", 2, |n| {
        vec![
            vec!["SREM".into(), "bigs".into(), format!("m{}", (n * 3) % 100)],
            vec!["SADD".into(), "bigs".into(), format!("new{n}")],
        ]
    })
    .await;
    assert!(calls >= 20, "walked in steps, not at once: {calls}");
    for i in 100..1000 {
        assert!(seen.contains(&format!("m{i}")), "m{i} missed");
    }
    // SPOP with a count takes distinct members, and all of them at the end.
    let popped = String::from_utf8(c.call(&["SPOP", "bigs", "10000"]).await).unwrap();
    let members: std::collections::HashSet<&str> = popped
        .split("\r\n")
        .filter(|l| l.starts_with('m') || l.starts_with("new"))
        .collect();
    assert_eq!(
        popped.split("\r\n").next(),
        Some(format!("*{}", members.len()).as_str())
    );
    assert_eq!(c.call(&["SCARD", "bigs"]).await, b":0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_docs_names_each_known_commands_group_as_redis() {
    let Some(r) = redis() else { return };
    let (a, _stop) = ours(CacheConfig::default()).await;
    let (mut mine, mut theirs) = (Conn::open(a).await, Conn::open(r.addr).await);
    let names: Vec<String> = {
        let all = String::from_utf8(mine.call(&["COMMAND"]).await).unwrap();
        all.split("\r\n")
            .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
            .map(str::to_owned)
            .collect()
    };
    assert!(names.len() > 100, "{names:?}");
    for n in &names {
        let group = |reply: Vec<u8>| {
            let s = String::from_utf8(reply).unwrap();
            let parts: Vec<&str> = s.split("\r\n").collect();
            parts
                .iter()
                .position(|p| *p == "group")
                .map(|i| parts[i + 2].to_string())
        };
        let (m, t) = (
            mine.call(&["COMMAND", "DOCS", n]).await,
            theirs.call(&["COMMAND", "DOCS", n]).await,
        );
        assert_eq!(group(m), group(t), "{n}");
    }
}

/// Walks `key` with `scan` (`SSCAN`/`ZSCAN`) 50 at a time, running `churn(call)`'s
/// commands after each call; the elements seen (every `stride`-th line of the
/// replies' element arrays) and the number of calls.
async fn walk(
    c: &mut Conn,
    scan: &str,
    key: &str,
    stride: usize,
    churn: impl Fn(usize) -> Vec<Vec<String>>,
) -> (std::collections::HashSet<String>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut cursor = "0".to_string();
    let mut calls = 0;
    loop {
        let reply = String::from_utf8(c.call(&[scan, key, &cursor, "COUNT", "50"]).await).unwrap();
        calls += 1;
        let lines: Vec<&str> = reply.split("\r\n").collect();
        cursor = lines[2].to_string();
        for l in lines.iter().skip(5).step_by(stride) {
            seen.insert(l.to_string());
        }
        for cmd in churn(calls) {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            c.call(&args).await;
        }
        if cursor == "0" {
            return (seen, calls);
        }
        assert!(calls < 100, "the walk ends");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zscan_walks_big_sorted_sets() {
    let (a, _stop) = ours(CacheConfig::default()).await;
    let mut c = Conn::open(a).await;
    for i in 0..1000 {
        c.send(&cmd(&["ZADD", "bigz", &i.to_string(), &format!("m{i}")]))
            .await;
    }
    for _ in 0..1000 {
        assert_eq!(c.reply().await, b":1\r\n");
    }
    // Members and scores alternate: every fourth line is a member.
    let (seen, calls) = walk(&mut c, "ZSCAN", "bigz", 4, |n| {
        vec![
            vec!["ZREM".into(), "bigz".into(), format!("m{}", (n * 3) % 100)],
            vec!["ZADD".into(), "bigz".into(), "-1".into(), format!("new{n}")],
        ]
    })
    .await;
    assert!(calls >= 20, "walked in steps, not at once: {calls}");
    for i in 100..1000 {
        assert!(seen.contains(&format!("m{i}")), "m{i} missed");
    }
    // Each member comes with its own score.
    let first = String::from_utf8(c.call(&["ZSCAN", "bigz", "0", "COUNT", "50"]).await).unwrap();
    let lines: Vec<&str> = first.split("\r\n").collect();
    let pairs: Vec<(&str, &str)> = lines[5..]
        .chunks(4)
        .filter(|p| p.len() == 4)
        .map(|p| (p[0], p[2]))
        .collect();
    assert_eq!(pairs.len(), 50, "{first}");
    for (m, s) in pairs {
        let want = m.strip_prefix('m').unwrap_or("-1");
        assert_eq!(s, want, "{m}");
    }
}

/// Any client can add cache names to `meshwork:caches`: the node's figures list a
/// bounded number of them, so a flood costs the console page nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_reported_cache_names_is_bounded() {
    let (a, w) = ours(CacheConfig::default()).await;
    let mut c = Conn::open(a).await;
    let names: Vec<String> = (0..5000).map(|i| format!("n{i:05}")).collect();
    let mut args = vec!["SADD", "meshwork:caches"];
    args.extend(names.iter().map(String::as_str));
    assert_eq!(c.call(&args).await, b":5000\r\n");
    assert_eq!(
        c.call(&["HINCRBY", "meshwork:cache:n00000:stats", "l1_hits", "7"])
            .await,
        b":7\r\n"
    );
    let st = w.cache().stats(5);
    assert_eq!(st.sdk.len(), meshwork_cache::server::SDK_SHOWN);
    assert_eq!((st.sdk[0].name.as_str(), st.sdk[0].l1_hits), ("n00000", 7));
}
