//! Commands: each request's arguments in, one reply out, with Redis' own error texts.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::db::{Entry, Keyspace, Shard, Value};
use crate::glob::glob_match;
use crate::resp::{Reply, format_double};

/// A connection's state.
#[derive(Debug)]
pub struct Session {
    /// The client id (`CLIENT ID`).
    pub id: u64,
    /// The selected database.
    pub db: usize,
    /// The protocol version (2, or 3 after `HELLO 3`).
    pub proto: u8,
    /// `CLIENT SETNAME`.
    pub name: Option<Bytes>,
    /// Authenticated (always true without a password).
    pub authed: bool,
    /// Its subscriptions, once it subscribed to something.
    pub sub: Option<crate::pubsub::Subscriber>,
    /// Inside MULTI: the commands queued.
    pub multi: Option<Vec<Vec<Bytes>>>,
    /// A command refused while queuing (EXEC then aborts).
    pub multi_failed: bool,
    /// Running EXEC's commands (under the exclusive lock already).
    pub in_exec: bool,
    /// WATCH: set when a watched key is written.
    pub watch: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// WATCH: the keys watched, as `(db, key)`.
    pub watched: Vec<(usize, Bytes)>,
    /// What `CLIENT LIST` shows of it (none for the node's own queries).
    pub meta: Option<std::sync::Arc<crate::clients::ClientMeta>>,
    /// Its worker's slot in the striped counters and lock ([`crate::stripe`]).
    pub worker: usize,
}

impl Session {
    /// A fresh session for connection `id`.
    pub fn new(id: u64, authed: bool) -> Session {
        Session {
            id,
            db: 0,
            proto: 2,
            name: None,
            authed,
            sub: None,
            multi: None,
            multi_failed: false,
            in_exec: false,
            watch: None,
            watched: Vec::new(),
            meta: None,
            worker: crate::stripe::INTERNAL,
        }
    }

    /// Stops watching (EXEC, DISCARD, UNWATCH, the connection's end).
    pub fn unwatch(&mut self, node: &Node) {
        if let Some(flag) = self.watch.take() {
            node.keyspace.watches().unwatch(&self.watched, &flag);
        }
        self.watched.clear();
    }

    fn refused(&mut self) {
        if self.multi.is_some() {
            self.multi_failed = true;
        }
    }
}

impl Session {
    /// Subscribed to at least one channel or pattern.
    pub fn subscribed(&self) -> bool {
        self.sub.as_ref().is_some_and(|s| s.count() > 0)
    }
}

/// What the connection does after the reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Goes on.
    Continue,
    /// Closes (QUIT).
    Close,
    /// Waits for an element of one of these lists (BLPOP/BRPOP found them empty): the
    /// connection answers when one is pushed, or a null array at the deadline.
    Block {
        /// The lists, in order.
        keys: Vec<Bytes>,
        /// From the left (BLPOP).
        left: bool,
        /// When to give up (ms since the epoch; none: never).
        deadline_ms: Option<u64>,
    },
}

/// What commands run against: the keyspace and the node's settings and counters.
pub struct Node {
    /// The data.
    pub keyspace: Keyspace,
    /// The password `AUTH` checks (none: no authentication).
    pub password: Option<String>,
    /// Commands processed.
    pub commands: crate::stripe::Striped,
    /// Reads that found their key.
    pub hits: crate::stripe::Striped,
    /// Reads that did not.
    pub misses: crate::stripe::Striped,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// When the node started (ms since the epoch).
    pub started_ms: u64,
    /// The TCP port (`INFO`).
    pub port: u16,
    /// What `CONFIG GET` shows: `(Redis' name, value)`.
    pub settings: Vec<(&'static str, String)>,
    /// Channels and patterns.
    pub pubsub: crate::pubsub::PubSub,
    /// `maxmemory` (0: none), its policy and sample size.
    pub maxmemory: (usize, crate::db::Policy, usize),
    /// Every command holds it shared; EXEC holds it alone, so that a transaction's
    /// commands run with no other command in between, whatever shards they touch.
    pub exec_lock: crate::stripe::StripedLock,
    /// The connections (`CLIENT LIST`).
    pub clients: crate::clients::Clients,
    /// Commands slower than the threshold (`SLOWLOG`).
    pub slowlog: crate::clients::SlowLog,
    /// Commands per second over the last 1.6 s (`instantaneous_ops_per_sec`).
    pub ops_per_sec: AtomicU64,
}

/// Commands that may add memory: past `maxmemory` they evict first, or are refused
/// (Redis' `denyoom` flag).
const DENYOOM: &[&str] = &[
    "ZADD",
    "ZINCRBY",
    "SET",
    "SETNX",
    "SETEX",
    "PSETEX",
    "MSET",
    "MSETNX",
    "INCR",
    "DECR",
    "INCRBY",
    "DECRBY",
    "INCRBYFLOAT",
    "APPEND",
    "GETSET",
    "SETRANGE",
    "HSET",
    "HMSET",
    "HSETNX",
    "HINCRBY",
    "LPUSH",
    "RPUSH",
    "LPUSHX",
    "RPUSHX",
    "LSET",
    "SADD",
];

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Redis' error for a command on a value of another type.
pub(crate) const WRONGTYPE: &str =
    "WRONGTYPE Operation against a key holding the wrong kind of value";
/// Redis' error for an argument that is not a 64-bit integer.
pub(crate) const NOT_INT: &str = "value is not an integer or out of range";

/// Redis' error for a wrong argument count.
pub(crate) fn wrong_args(name: &str) -> Reply {
    Reply::err(format!(
        "wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

fn syntax() -> Reply {
    Reply::err("syntax error")
}

/// An argument as Redis reads a 64-bit integer (no '+', no leading zeros, no spaces).
pub(crate) fn int_of(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    // Redis refuses leading '+', spaces and leading zeros ("01").
    if s.is_empty()
        || s.starts_with('+')
        || (s.len() > 1 && s.starts_with('0'))
        || s.starts_with("-0")
    {
        return None;
    }
    s.parse().ok()
}

pub(crate) fn float_of(b: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.starts_with(char::is_whitespace) || s.ends_with(char::is_whitespace) {
        return None;
    }
    let v: f64 = match s.to_ascii_lowercase().as_str() {
        "inf" | "+inf" | "infinity" | "+infinity" => f64::INFINITY,
        "-inf" | "-infinity" => f64::NEG_INFINITY,
        _ => s.parse().ok()?,
    };
    (!v.is_nan()).then_some(v)
}

pub(crate) fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

/// The commands this node knows, with their arity as Redis gives it (negative: at
/// least that many), for `COMMAND COUNT` and the arity check.
pub const COMMANDS: &[(&str, i32)] = &[
    ("PING", -1),
    ("ECHO", 2),
    ("QUIT", -1),
    ("SELECT", 2),
    ("DBSIZE", 1),
    ("FLUSHDB", -1),
    ("FLUSHALL", -1),
    ("HELLO", -1),
    ("AUTH", -2),
    ("CLIENT", -2),
    ("COMMAND", -1),
    ("INFO", -1),
    ("TIME", 1),
    ("CONFIG", -2),
    ("SLOWLOG", -2),
    ("MULTI", 1),
    ("EXEC", 1),
    ("DISCARD", 1),
    ("WATCH", -2),
    ("UNWATCH", 1),
    ("SUBSCRIBE", -2),
    ("PSUBSCRIBE", -2),
    ("UNSUBSCRIBE", -1),
    ("PUNSUBSCRIBE", -1),
    ("PUBLISH", 3),
    ("BLPOP", -3),
    ("BRPOP", -3),
    ("PUBSUB", -2),
    ("GET", 2),
    ("SET", -3),
    ("SETNX", 3),
    ("SETEX", 4),
    ("PSETEX", 4),
    ("MGET", -2),
    ("MSET", -3),
    ("MSETNX", -3),
    ("INCR", 2),
    ("DECR", 2),
    ("INCRBY", 3),
    ("DECRBY", 3),
    ("INCRBYFLOAT", 3),
    ("APPEND", 3),
    ("STRLEN", 2),
    ("GETDEL", 2),
    ("GETEX", -2),
    ("GETSET", 3),
    ("GETRANGE", 4),
    ("SETRANGE", 4),
    ("DEL", -2),
    ("UNLINK", -2),
    ("EXISTS", -2),
    ("EXPIRE", -3),
    ("PEXPIRE", -3),
    ("EXPIREAT", -3),
    ("PEXPIREAT", -3),
    ("TTL", 2),
    ("PTTL", 2),
    ("EXPIRETIME", 2),
    ("PEXPIRETIME", 2),
    ("PERSIST", 2),
    ("TYPE", 2),
    ("RENAME", 3),
    ("RENAMENX", 3),
    ("KEYS", 2),
    ("RANDOMKEY", 1),
    ("SCAN", -2),
    ("HSCAN", -3),
    ("SSCAN", -3),
    ("ZSCAN", -3),
    ("HSET", -4),
    ("HMSET", -4),
    ("HSETNX", 4),
    ("HGET", 3),
    ("HEXISTS", 3),
    ("HSTRLEN", 3),
    ("HMGET", -3),
    ("HDEL", -3),
    ("HLEN", 2),
    ("HKEYS", 2),
    ("HVALS", 2),
    ("HGETALL", 2),
    ("HINCRBY", 4),
    ("LPUSH", -3),
    ("RPUSH", -3),
    ("LPUSHX", -3),
    ("RPUSHX", -3),
    ("LPOP", -2),
    ("RPOP", -2),
    ("LLEN", 2),
    ("LINDEX", 3),
    ("LRANGE", 4),
    ("LSET", 4),
    ("LREM", 4),
    ("LTRIM", 4),
    ("SADD", -3),
    ("SREM", -3),
    ("SISMEMBER", 3),
    ("SMISMEMBER", -3),
    ("SCARD", 2),
    ("SMEMBERS", 2),
    ("SPOP", -2),
    ("SRANDMEMBER", -2),
    ("ZADD", -4),
    ("ZINCRBY", 4),
    ("ZREM", -3),
    ("ZCARD", 2),
    ("ZSCORE", 3),
    ("ZMSCORE", -3),
    ("ZRANK", 3),
    ("ZREVRANK", 3),
    ("ZCOUNT", 4),
    ("ZLEXCOUNT", 4),
    ("ZRANGE", -4),
    ("ZREVRANGE", -4),
    ("ZRANGEBYSCORE", -4),
    ("ZREVRANGEBYSCORE", -4),
    ("ZRANGEBYLEX", -4),
    ("ZREVRANGEBYLEX", -4),
    ("ZREMRANGEBYRANK", 4),
    ("ZREMRANGEBYSCORE", 4),
    ("ZREMRANGEBYLEX", 4),
    ("ZPOPMIN", -2),
    ("ZPOPMAX", -2),
];

/// Runs one command.
pub fn execute(node: &Node, s: &mut Session, args: &[Bytes]) -> (Reply, Flow) {
    let Some(first) = args.first() else {
        return (Reply::Nil, Flow::Continue);
    };
    // The name upper-cased on the stack (no allocation per command); one longer than
    // any command is unknown.
    let mut upper_name = [0u8; 24];
    let name = match upper_name.get_mut(..first.len()) {
        Some(dst) => {
            for (d, c) in dst.iter_mut().zip(first.iter()) {
                *d = c.to_ascii_uppercase();
            }
            std::str::from_utf8(dst).unwrap_or("")
        }
        None => "",
    };
    node.commands.add(s.worker, 1);
    let found = COMMANDS.iter().position(|(n, _)| *n == name);
    if let (Some(m), Some(i), false) = (&s.meta, found, s.in_exec) {
        m.running(i);
    }
    let Some(&(_, arity)) = found.and_then(|i| COMMANDS.get(i)) else {
        let mut shown = String::new();
        for a in args.iter().skip(1) {
            if shown.len() >= 128 {
                break;
            }
            shown.push_str(&format!(
                "'{}' ",
                String::from_utf8_lossy(&a[..a.len().min(128)])
            ));
        }
        let cmd = String::from_utf8_lossy(&first[..first.len().min(128)]).into_owned();
        s.refused();
        return (
            Reply::err(format!(
                "unknown command '{cmd}', with args beginning with: {shown}"
            )),
            Flow::Continue,
        );
    };
    let n = args.len() as i32;
    if (arity > 0 && n != arity) || (arity < 0 && n < -arity) {
        s.refused();
        return (wrong_args(name), Flow::Continue);
    }
    if !s.authed && !matches!(name, "AUTH" | "HELLO" | "QUIT") {
        return (
            Reply::Error("NOAUTH Authentication required.".into()),
            Flow::Continue,
        );
    }
    if s.proto == 2
        && s.subscribed()
        && !matches!(
            name,
            "SUBSCRIBE" | "UNSUBSCRIBE" | "PSUBSCRIBE" | "PUNSUBSCRIBE" | "PING" | "QUIT"
        )
    {
        return (
            Reply::err(format!(
                "Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                name.to_ascii_lowercase()
            )),
            Flow::Continue,
        );
    }
    // Transactions.
    match name {
        "MULTI" if s.multi.is_some() => {
            return (Reply::err("MULTI calls can not be nested"), Flow::Continue);
        }
        "MULTI" => {
            s.multi = Some(Vec::new());
            s.multi_failed = false;
            return (Reply::Simple("OK"), Flow::Continue);
        }
        "DISCARD" if s.multi.is_none() => {
            return (Reply::err("DISCARD without MULTI"), Flow::Continue);
        }
        "DISCARD" => {
            s.multi = None;
            s.unwatch(node);
            return (Reply::Simple("OK"), Flow::Continue);
        }
        "EXEC" => return (exec(node, s), Flow::Continue),
        "WATCH" if s.multi.is_some() => {
            return (
                Reply::err("WATCH inside MULTI is not allowed"),
                Flow::Continue,
            );
        }
        "WATCH" => {
            let flag = s
                .watch
                .get_or_insert_with(|| {
                    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
                })
                .clone();
            for k in &args[1..] {
                node.keyspace.watches().watch(s.db, k, &flag);
                s.watched.push((s.db, Bytes::copy_from_slice(k)));
            }
            return (Reply::Simple("OK"), Flow::Continue);
        }
        "UNWATCH" => {
            s.unwatch(node);
            return (Reply::Simple("OK"), Flow::Continue);
        }
        "QUIT" => {}
        _ => {
            if let Some(q) = s.multi.as_mut() {
                q.push(args.to_vec());
                return (Reply::Simple("QUEUED"), Flow::Continue);
            }
        }
    }
    let _shared = (!s.in_exec).then(|| node.exec_lock.read(s.worker));
    let (maxmemory, policy, samples) = node.maxmemory;
    if maxmemory > 0
        && DENYOOM.contains(&name)
        && node.keyspace.used_bytes() > maxmemory
        && !node.keyspace.evict_to(maxmemory, policy, samples)
    {
        return (
            Reply::Error("OOM command not allowed when used memory > 'maxmemory'.".into()),
            Flow::Continue,
        );
    }
    let now = now_ms();
    let reply = match name {
        "QUIT" => return (Reply::Simple("OK"), Flow::Close),
        "PING" if s.proto == 2 && s.subscribed() => match args.len() {
            1 | 2 => Reply::Array(vec![
                Reply::bulk("pong"),
                Reply::Bulk(args.get(1).cloned().unwrap_or_default()),
            ]),
            _ => wrong_args(name),
        },
        "PING" => match args.len() {
            1 => Reply::Simple("PONG"),
            2 => Reply::Bulk(args[1].clone()),
            _ => wrong_args(name),
        },
        "SUBSCRIBE" | "PSUBSCRIBE" | "UNSUBSCRIBE" | "PUNSUBSCRIBE" => {
            crate::server::subscriptions(node, s, name, &args[1..])
        }
        "PUBLISH" => Reply::Int(node.pubsub.publish(&args[1], &args[2])),
        "BLPOP" | "BRPOP" => {
            let left = name == "BLPOP";
            let timeout = match std::str::from_utf8(&args[args.len() - 1])
                .ok()
                .and_then(|t| t.parse::<f64>().ok())
                .filter(|t| t.is_finite())
            {
                Some(t) if t < 0.0 => return (Reply::err("timeout is negative"), Flow::Continue),
                Some(t) => t,
                None => {
                    return (
                        Reply::err("timeout is not a float or out of range"),
                        Flow::Continue,
                    );
                }
            };
            let keys = &args[1..args.len() - 1];
            match crate::types::pop_first(db(node, s), keys, left, now_ms()) {
                Ok(Some((k, v))) => Reply::Array(vec![Reply::Bulk(k), Reply::Bulk(v)]),
                Err(e) => e,
                // Inside EXEC nothing may wait: as Redis, a null answer.
                Ok(None) if s.in_exec => Reply::NilArray,
                Ok(None) => {
                    let deadline_ms =
                        (timeout > 0.0).then(|| now_ms() + (timeout * 1000.0).ceil() as u64);
                    return (
                        Reply::Many(Vec::new()),
                        Flow::Block {
                            keys: keys.iter().map(|k| Bytes::copy_from_slice(k)).collect(),
                            left,
                            deadline_ms,
                        },
                    );
                }
            }
        }
        "PUBSUB" => pubsub_cmd(node, args),
        "ECHO" => Reply::Bulk(args[1].clone()),
        "SELECT" => match int_of(&args[1]) {
            Some(i) if (0..crate::db::DATABASES as i64).contains(&i) => {
                s.db = i as usize;
                Reply::Simple("OK")
            }
            Some(_) => Reply::err("DB index is out of range"),
            None => Reply::err(NOT_INT),
        },
        "TIME" => {
            let us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            Reply::Array(vec![
                Reply::bulk((us / 1_000_000).to_string()),
                Reply::bulk((us % 1_000_000).to_string()),
            ])
        }
        "DBSIZE" => Reply::Int(db(node, s).len() as i64),
        "FLUSHDB" | "FLUSHALL" => {
            if args.len() > 2
                || args
                    .get(1)
                    .is_some_and(|a| !matches!(upper(a).as_str(), "ASYNC" | "SYNC"))
            {
                syntax()
            } else {
                let dbs: Vec<&crate::db::Db> = if name == "FLUSHDB" {
                    vec![db(node, s)]
                } else {
                    node.keyspace.dbs().iter().collect()
                };
                for d in dbs {
                    for mut sh in d.lock_all() {
                        sh.clear();
                    }
                }
                Reply::Simple("OK")
            }
        }
        "HELLO" => hello(node, s, args),
        "AUTH" => auth(node, s, &args[1..]),
        "CLIENT" => client(node, s, args),
        "COMMAND" => match args.get(1).map(|a| upper(a)).as_deref() {
            Some("COUNT") if args.len() == 2 => Reply::Int(COMMANDS.len() as i64),
            Some("DOCS") => command_docs(&args[2..]),
            None => Reply::Array(
                COMMANDS
                    .iter()
                    .map(|(n, a)| {
                        Reply::Array(vec![
                            Reply::bulk(n.to_ascii_lowercase()),
                            Reply::Int(i64::from(*a)),
                        ])
                    })
                    .collect(),
            ),
            Some(_) => Reply::err(format!(
                "unknown subcommand '{}'. Try COMMAND HELP.",
                String::from_utf8_lossy(&args[1])
            )),
        },
        "INFO" => Reply::Verbatim(info(node)),
        "CONFIG" => config(node, args),
        "SLOWLOG" => node.slowlog.command(args),
        _ => data(node, s, name, args, now),
    };
    (reply, Flow::Continue)
}

fn db<'a>(node: &'a Node, s: &Session) -> &'a crate::db::Db {
    // `s.db` is only ever set through SELECT's range check.
    node.keyspace
        .db(s.db)
        .unwrap_or_else(|| &node.keyspace.dbs()[0])
}

fn hello(node: &Node, s: &mut Session, args: &[Bytes]) -> Reply {
    let mut proto = s.proto;
    let mut i = 1;
    if let Some(v) = args.get(1) {
        match int_of(v) {
            Some(p @ (2 | 3)) => proto = p as u8,
            Some(_) => return Reply::Error("NOPROTO unsupported protocol version".into()),
            None => return Reply::err("Protocol version is not an integer or out of range"),
        }
        i = 2;
    }
    while i < args.len() {
        match upper(&args[i]).as_str() {
            "AUTH" if i + 2 < args.len() => {
                let r = auth(node, s, &args[i + 1..i + 3]);
                if let Reply::Error(_) = r {
                    return r;
                }
                i += 3;
            }
            "SETNAME" if i + 1 < args.len() => {
                s.name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => {
                return Reply::err(format!(
                    "Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(&args[i])
                ));
            }
        }
    }
    if !s.authed {
        return Reply::Error(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time".into(),
        );
    }
    s.proto = proto;
    let b = Reply::bulk;
    Reply::Map(vec![
        (b("server"), b("redis")),
        (b("version"), b("7.0.0")),
        (b("proto"), Reply::Int(i64::from(proto))),
        (b("id"), Reply::Int(s.id as i64)),
        (b("mode"), b("standalone")),
        (b("role"), b("master")),
        (b("modules"), Reply::Array(Vec::new())),
    ])
}

fn auth(node: &Node, s: &mut Session, creds: &[Bytes]) -> Reply {
    let (user, pass) = match creds {
        [p] => (None, p),
        [u, p] => (Some(u), p),
        _ => return syntax(),
    };
    let Some(want) = &node.password else {
        if user.is_none() {
            return Reply::err(
                "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            );
        }
        // No password: only the default user with any password.
        return if user.is_some_and(|u| &u[..] == b"default") {
            s.authed = true;
            Reply::Simple("OK")
        } else {
            Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
        };
    };
    let user_ok = user.is_none_or(|u| &u[..] == b"default");
    if user_ok && constant_eq(pass, want.as_bytes()) {
        s.authed = true;
        Reply::Simple("OK")
    } else {
        Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
    }
}

/// Compares without an early exit on the first difference.
fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn client(node: &Node, s: &mut Session, args: &[Bytes]) -> Reply {
    match upper(&args[1]).as_str() {
        "ID" if args.len() == 2 => Reply::Int(s.id as i64),
        "LIST" => client_list(node, &args[2..]),
        "GETNAME" if args.len() == 2 => s.name.clone().map_or(Reply::Nil, Reply::Bulk),
        "SETNAME" if args.len() == 3 => {
            if args[2].iter().any(|&c| c <= b' ' || c > b'~') {
                Reply::err("Client names cannot contain spaces, newlines or special characters.")
            } else {
                s.name = (!args[2].is_empty()).then(|| args[2].clone());
                if let Some(m) = &s.meta {
                    m.set_name(s.name.clone());
                }
                Reply::Simple("OK")
            }
        }
        "ID" | "GETNAME" | "SETNAME" => {
            wrong_args(&format!("client|{}", upper(&args[1]).to_ascii_lowercase()))
        }
        _ => Reply::err(format!(
            "unknown subcommand '{}'. Try CLIENT HELP.",
            String::from_utf8_lossy(&args[1])
        )),
    }
}

/// Redis' group of a command (`COMMAND DOCS`).
fn group_of(name: &str) -> &'static str {
    match name {
        "PING" | "ECHO" | "QUIT" | "SELECT" | "HELLO" | "AUTH" | "CLIENT" => "connection",
        "DBSIZE" | "FLUSHDB" | "FLUSHALL" | "COMMAND" | "INFO" | "TIME" | "CONFIG" | "SLOWLOG" => {
            "server"
        }
        "MULTI" | "EXEC" | "DISCARD" | "WATCH" | "UNWATCH" => "transactions",
        "SUBSCRIBE" | "PSUBSCRIBE" | "UNSUBSCRIBE" | "PUNSUBSCRIBE" | "PUBLISH" | "PUBSUB" => {
            "pubsub"
        }
        "DEL" | "UNLINK" | "EXISTS" | "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" | "TTL"
        | "PTTL" | "EXPIRETIME" | "PEXPIRETIME" | "PERSIST" | "TYPE" | "RENAME" | "RENAMENX"
        | "KEYS" | "RANDOMKEY" | "SCAN" => "generic",
        "BLPOP" | "BRPOP" => "list",
        "SADD" | "SREM" | "SISMEMBER" | "SMISMEMBER" | "SCARD" | "SMEMBERS" | "SPOP"
        | "SRANDMEMBER" | "SSCAN" => "set",
        n if n.starts_with('Z') => "sorted-set",
        n if n.starts_with('H') => "hash",
        n if n.starts_with('L') || n.starts_with("RPUSH") || n == "RPOP" => "list",
        _ => "string",
    }
}

/// `COMMAND DOCS [name ...]`: each known command's group (unknown names are left
/// out, as Redis does; summaries and argument lists are not kept here).
fn command_docs(names: &[Bytes]) -> Reply {
    let doc = |n: &str| {
        (
            Reply::bulk(n.to_ascii_lowercase()),
            Reply::Map(vec![(Reply::bulk("group"), Reply::bulk(group_of(n)))]),
        )
    };
    if names.is_empty() {
        return Reply::Map(COMMANDS.iter().map(|(n, _)| doc(n)).collect());
    }
    Reply::Map(
        names
            .iter()
            .filter_map(|a| {
                let u = upper(a);
                COMMANDS.iter().find(|(n, _)| *n == u).map(|(n, _)| doc(n))
            })
            .collect(),
    )
}

/// `CLIENT LIST [TYPE normal|pubsub] [ID id ...]`: one line per connection.
fn client_list(node: &Node, opts: &[Bytes]) -> Reply {
    let mut kind: Option<String> = None;
    let mut ids: Option<Vec<u64>> = None;
    match opts.first().map(|o| upper(o)).as_deref() {
        None => {}
        Some("TYPE") if opts.len() == 2 => {
            let t = upper(&opts[1]).to_ascii_lowercase();
            if !matches!(t.as_str(), "normal" | "pubsub" | "master" | "replica") {
                return Reply::err(format!(
                    "Unknown client type '{}'",
                    String::from_utf8_lossy(&opts[1])
                ));
            }
            kind = Some(t);
        }
        Some("ID") if opts.len() >= 2 => {
            let mut v = Vec::new();
            for o in &opts[1..] {
                match int_of(o) {
                    Some(i) => v.push(i as u64),
                    None => return Reply::err("Invalid client ID"),
                }
            }
            ids = Some(v);
        }
        Some(_) => return syntax(),
    }
    let now = now_ms();
    let mut out = String::new();
    for c in node.clients.all() {
        if ids.as_ref().is_some_and(|ids| !ids.contains(&c.id)) {
            continue;
        }
        let line = c.line(now);
        if let Some(k) = &kind {
            let pubsub = line.contains(" flags=P ");
            if (k == "pubsub") != pubsub || matches!(k.as_str(), "master" | "replica") {
                continue;
            }
        }
        out.push_str(&line);
    }
    Reply::Verbatim(out)
}

/// `EXEC`: the queued commands, alone (no other command runs meanwhile), unless a
/// watched key was written (a null array) or a command was refused while queuing.
fn exec(node: &Node, s: &mut Session) -> Reply {
    let Some(queued) = s.multi.take() else {
        return Reply::err("EXEC without MULTI");
    };
    if std::mem::take(&mut s.multi_failed) {
        s.unwatch(node);
        return Reply::Error("EXECABORT Transaction discarded because of previous errors.".into());
    }
    let _alone = node.exec_lock.write();
    let dirty = s
        .watch
        .as_ref()
        .is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire));
    s.unwatch(node);
    if dirty {
        return Reply::NilArray;
    }
    s.in_exec = true;
    let replies = queued.iter().map(|args| execute(node, s, args).0).collect();
    s.in_exec = false;
    Reply::Array(replies)
}

/// `PUBSUB CHANNELS [pattern]`, `NUMSUB channel...`, `NUMPAT`.
fn pubsub_cmd(node: &Node, args: &[Bytes]) -> Reply {
    match upper(&args[1]).as_str() {
        "CHANNELS" if args.len() <= 3 => Reply::Array(
            node.pubsub
                .channels(args.get(2).map(|p| &p[..]))
                .into_iter()
                .map(Reply::Bulk)
                .collect(),
        ),
        "NUMSUB" => Reply::Array(
            args[2..]
                .iter()
                .flat_map(|c| {
                    [
                        Reply::Bulk(c.clone()),
                        Reply::Int(node.pubsub.numsub(c) as i64),
                    ]
                })
                .collect(),
        ),
        "NUMPAT" if args.len() == 2 => Reply::Int(node.pubsub.numpat() as i64),
        "CHANNELS" | "NUMPAT" => {
            wrong_args(&format!("pubsub|{}", upper(&args[1]).to_ascii_lowercase()))
        }
        _ => Reply::err(format!(
            "unknown subcommand '{}'. Try PUBSUB HELP.",
            String::from_utf8_lossy(&args[1])
        )),
    }
}

/// `CONFIG GET pattern...` (the settings this node has, with Redis' names),
/// `CONFIG SET` of the slow log's two settings (the others are fixed at start) and
/// `CONFIG RESETSTAT`.
fn config(node: &Node, args: &[Bytes]) -> Reply {
    match upper(&args[1]).as_str() {
        "GET" if args.len() >= 3 => {
            let dynamic = [
                (
                    "slowlog-log-slower-than",
                    node.slowlog.slower_than_us().to_string(),
                ),
                ("slowlog-max-len", node.slowlog.max_len().to_string()),
            ];
            Reply::Map(
                node.settings
                    .iter()
                    .cloned()
                    .chain(dynamic)
                    .filter(|(k, _)| {
                        args[2..]
                            .iter()
                            .any(|p| glob_match(&p.to_ascii_lowercase(), k.as_bytes()))
                    })
                    .map(|(k, v)| (Reply::bulk(k), Reply::bulk(v)))
                    .collect(),
            )
        }
        "RESETSTAT" if args.len() == 2 => {
            for c in [&node.commands, &node.hits, &node.misses] {
                c.reset();
            }
            node.connections.store(0, Ordering::Relaxed);
            let t = node.keyspace.totals();
            t.expired.store(0, Ordering::Relaxed);
            t.evicted.store(0, Ordering::Relaxed);
            Reply::Simple("OK")
        }
        "SET" if args.len() >= 4 && args.len().is_multiple_of(2) => config_set(node, &args[2..]),
        "SET" if args.len() >= 4 => syntax(),
        "GET" | "SET" | "RESETSTAT" => {
            wrong_args(&format!("config|{}", upper(&args[1]).to_ascii_lowercase()))
        }
        _ => Reply::err(format!(
            "unknown subcommand '{}'. Try CONFIG HELP.",
            String::from_utf8_lossy(&args[1])
        )),
    }
}

/// `CONFIG SET name value ...`: every pair checked before any applies (as Redis 7).
fn config_set(node: &Node, pairs: &[Bytes]) -> Reply {
    let mut slower: Option<i64> = None;
    let mut max_len: Option<usize> = None;
    for p in pairs.chunks(2) {
        let name = String::from_utf8_lossy(&p[0]).to_ascii_lowercase();
        let failed = |why: &str| {
            Reply::err(format!(
                "CONFIG SET failed (possibly related to argument '{name}') - {why}"
            ))
        };
        match name.as_str() {
            "slowlog-log-slower-than" => match int_of(&p[1]) {
                Some(v) if v >= -1 => slower = Some(v),
                Some(_) => {
                    return failed("argument must be between -1 and 9223372036854775807 inclusive");
                }
                None => return failed("argument couldn't be parsed into an integer"),
            },
            "slowlog-max-len" => match int_of(&p[1]) {
                Some(v) if v >= 0 => max_len = Some(v as usize),
                Some(_) => {
                    return failed("argument must be between 0 and 9223372036854775807 inclusive");
                }
                None => return failed("argument couldn't be parsed into an integer"),
            },
            _ if node.settings.iter().any(|(k, _)| *k == name) => {
                return failed(
                    "the cache's other settings are fixed at start ([cache] in the config file)",
                );
            }
            _ => {
                return Reply::err(format!(
                    "Unknown option or number of arguments for CONFIG SET - '{}'",
                    String::from_utf8_lossy(&p[0])
                ));
            }
        }
    }
    if let Some(v) = slower {
        node.slowlog.set_slower_than_us(v);
    }
    if let Some(v) = max_len {
        node.slowlog.set_max_len(v);
    }
    Reply::Simple("OK")
}

fn info(node: &Node) -> String {
    let uptime = now_ms().saturating_sub(node.started_ms) / 1000;
    let mut out = String::new();
    out.push_str("# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n");
    out.push_str(&format!(
        "process_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{uptime}\r\n\r\n",
        std::process::id(),
        node.port
    ));
    let blocked: usize = node
        .keyspace
        .dbs()
        .iter()
        .map(|d| d.blocked.load(std::sync::atomic::Ordering::Acquire))
        .sum();
    out.push_str(&format!(
        "# Clients\r\nconnected_clients:{}\r\nblocked_clients:{blocked}\r\n\r\n",
        node.clients.all().len()
    ));
    out.push_str(&format!(
        "# Memory\r\nused_memory:{}\r\nmaxmemory:{}\r\nmaxmemory_policy:{}\r\n\r\n",
        node.keyspace.used_bytes(),
        node.maxmemory.0,
        node.maxmemory.1.name()
    ));
    out.push_str(&format!(
        "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\ninstantaneous_ops_per_sec:{}\r\nexpired_keys:{}\r\nevicted_keys:{}\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\n\r\n",
        node.connections.load(Ordering::Relaxed),
        node.commands.get(),
        node.ops_per_sec.load(Ordering::Relaxed),
        node.keyspace.totals().expired.load(Ordering::Relaxed),
        node.keyspace.totals().evicted.load(Ordering::Relaxed),
        node.hits.get(),
        node.misses.get()
    ));
    out.push_str("# Keyspace\r\n");
    // Keys held, as Redis counts them (expired ones not yet removed included): O(1)
    // per shard, never a walk of the keyspace.
    for (i, d) in node.keyspace.dbs().iter().enumerate() {
        let (mut keys, mut expires) = (0, 0);
        for sh in d.lock_all() {
            keys += sh.len();
            expires += sh.expiring();
        }
        if keys > 0 {
            out.push_str(&format!(
                "db{i}:keys={keys},expires={expires},avg_ttl=0\r\n"
            ));
        }
    }
    out
}

/// Reads a string value: `Ok(None)` when absent, `Err` (WRONGTYPE) for another type.
fn read_str(sh: &mut Shard, key: &[u8], now: u64) -> Result<Option<Bytes>, Reply> {
    match sh.get(key, now) {
        None => Ok(None),
        Some(Entry {
            value: Value::Str(b),
            ..
        }) => Ok(Some(b.clone())),
        Some(_) => Err(Reply::Error(WRONGTYPE.into())),
    }
}

/// `EX`/`PX`/`EXAT`/`PXAT` to an absolute time; the error names the command.
fn expiry(unit: &str, v: &[u8], now: u64, cmd: &str) -> Result<u64, Reply> {
    let n = int_of(v).ok_or_else(|| Reply::err(NOT_INT))?;
    let bad = || Reply::err(format!("invalid expire time in '{cmd}' command"));
    if n <= 0 {
        return Err(bad());
    }
    let n = n as u64;
    let at = match unit {
        "EX" => n.checked_mul(1000).and_then(|ms| ms.checked_add(now)),
        "PX" => n.checked_add(now),
        "EXAT" => n.checked_mul(1000),
        _ => Some(n),
    };
    at.filter(|&t| t < (1u64 << 62)).ok_or_else(bad)
}

fn data(node: &Node, s: &mut Session, name: &str, args: &[Bytes], now: u64) -> Reply {
    let d = db(node, s);
    let worker = s.worker;
    let hit = |found: bool| {
        if found {
            node.hits.add(worker, 1);
        } else {
            node.misses.add(worker, 1);
        }
    };
    match name {
        "GET" => {
            let mut sh = d.lock(&args[1]);
            match read_str(&mut sh, &args[1], now) {
                Ok(v) => {
                    hit(v.is_some());
                    v.map_or(Reply::Nil, Reply::Bulk)
                }
                Err(e) => e,
            }
        }
        "SET" => set(d, args, now),
        "SETNX" => {
            let mut sh = d.lock(&args[1]);
            if sh.get(&args[1], now).is_some() {
                Reply::Int(0)
            } else {
                sh.insert(args[1].clone(), str_entry(args[2].clone(), None));
                Reply::Int(1)
            }
        }
        "SETEX" | "PSETEX" => {
            let unit = if name == "SETEX" { "EX" } else { "PX" };
            match expiry(unit, &args[2], now, &name.to_ascii_lowercase()) {
                Ok(at) => {
                    d.lock(&args[1])
                        .insert(args[1].clone(), str_entry(args[3].clone(), Some(at)));
                    Reply::Simple("OK")
                }
                Err(e) => e,
            }
        }
        "GETSET" => {
            let mut sh = d.lock(&args[1]);
            match read_str(&mut sh, &args[1], now) {
                Ok(old) => {
                    sh.insert(args[1].clone(), str_entry(args[2].clone(), None));
                    old.map_or(Reply::Nil, Reply::Bulk)
                }
                Err(e) => e,
            }
        }
        "MGET" => Reply::Array(
            args[1..]
                .iter()
                .map(|k| {
                    let mut sh = d.lock(k);
                    match sh.get(k, now) {
                        Some(Entry {
                            value: Value::Str(b),
                            ..
                        }) => {
                            hit(true);
                            Reply::Bulk(b.clone())
                        }
                        _ => {
                            hit(false);
                            Reply::Nil
                        }
                    }
                })
                .collect(),
        ),
        "MSET" | "MSETNX" => {
            if args.len() % 2 != 1 {
                return wrong_args(name);
            }
            // Each key hashed once for its shard: the shards locked in order, then
            // each pair written under its shard's guard.
            let shards: Vec<usize> = args[1..].iter().step_by(2).map(|k| d.shard_of(k)).collect();
            let mut locked = d.lock_shards(&shards);
            let guard = |i: usize| locked.binary_search_by_key(&i, |(j, _)| *j).ok();
            let at: Vec<Option<usize>> = shards.iter().map(|&i| guard(i)).collect();
            if name == "MSETNX" {
                for (k, p) in args[1..].iter().step_by(2).zip(&at) {
                    if let Some(p) = *p
                        && locked[p].1.get(k, now).is_some()
                    {
                        return Reply::Int(0);
                    }
                }
            }
            for (pair, p) in args[1..].chunks(2).zip(&at) {
                if let Some(p) = *p {
                    locked[p]
                        .1
                        .insert(pair[0].clone(), str_entry(pair[1].clone(), None));
                }
            }
            if name == "MSETNX" {
                Reply::Int(1)
            } else {
                Reply::Simple("OK")
            }
        }
        "INCR" | "DECR" | "INCRBY" | "DECRBY" => {
            let by = match name {
                "INCR" => Some(1),
                "DECR" => Some(-1),
                "INCRBY" => int_of(&args[2]),
                _ => int_of(&args[2]).and_then(i64::checked_neg),
            };
            let Some(by) = by else {
                return Reply::err(NOT_INT);
            };
            let mut sh = d.lock(&args[1]);
            // In place when the key exists: one lookup, one allocation.
            let (old_len, new_len, v) = match sh.get_mut(&args[1], now) {
                None => {
                    sh.insert(
                        args[1].clone(),
                        str_entry(Bytes::from(by.to_string()), None),
                    );
                    return Reply::Int(by);
                }
                Some(Entry {
                    value: Value::Str(b),
                    ..
                }) => {
                    let Some(cur) = int_of(b) else {
                        return Reply::err(NOT_INT);
                    };
                    let Some(v) = cur.checked_add(by) else {
                        return Reply::err("increment or decrement would overflow");
                    };
                    let old_len = b.len();
                    *b = Bytes::from(v.to_string());
                    (old_len, b.len(), v)
                }
                Some(_) => return Reply::Error(WRONGTYPE.into()),
            };
            sh.resized(old_len, new_len);
            Reply::Int(v)
        }
        "INCRBYFLOAT" => {
            let Some(by) = float_of(&args[2]) else {
                return Reply::err("value is not a valid float");
            };
            let mut sh = d.lock(&args[1]);
            let (cur, ttl) = match sh.get(&args[1], now) {
                None => (0.0, None),
                Some(
                    e @ Entry {
                        value: Value::Str(b),
                        ..
                    },
                ) => match float_of(b) {
                    Some(v) => (v, e.expire_at()),
                    None => return Reply::err("value is not a valid float"),
                },
                Some(_) => return Reply::Error(WRONGTYPE.into()),
            };
            let v = cur + by;
            if !v.is_finite() {
                return Reply::err("increment would produce NaN or Infinity");
            }
            let text = format_double(v);
            sh.insert(args[1].clone(), str_entry(Bytes::from(text.clone()), ttl));
            Reply::bulk(text)
        }
        "APPEND" => {
            let mut sh = d.lock(&args[1]);
            let before = sh.weight_of(&args[1]);
            match sh.get_mut(&args[1], now) {
                None => {
                    let n = args[2].len();
                    sh.insert(args[1].clone(), str_entry(args[2].clone(), None));
                    Reply::Int(n as i64)
                }
                Some(Entry {
                    value: Value::Str(b),
                    ..
                }) => {
                    let mut v = Vec::with_capacity(b.len() + args[2].len());
                    v.extend_from_slice(b);
                    v.extend_from_slice(&args[2]);
                    let n = v.len();
                    *b = Bytes::from(v);
                    sh.reweigh(&args[1], before);
                    Reply::Int(n as i64)
                }
                Some(_) => Reply::Error(WRONGTYPE.into()),
            }
        }
        "STRLEN" => {
            let mut sh = d.lock(&args[1]);
            match read_str(&mut sh, &args[1], now) {
                Ok(v) => Reply::Int(v.map_or(0, |b| b.len() as i64)),
                Err(e) => e,
            }
        }
        "GETDEL" => {
            let mut sh = d.lock(&args[1]);
            match read_str(&mut sh, &args[1], now) {
                Ok(Some(v)) => {
                    sh.remove(&args[1]);
                    Reply::Bulk(v)
                }
                Ok(None) => Reply::Nil,
                Err(e) => e,
            }
        }
        "GETEX" => {
            let change = match args.get(2).map(|a| upper(a)).as_deref() {
                None => None,
                Some("PERSIST") if args.len() == 3 => Some(None),
                Some(u @ ("EX" | "PX" | "EXAT" | "PXAT")) if args.len() == 4 => {
                    match expiry(u, &args[3], now, "getex") {
                        Ok(at) => Some(Some(at)),
                        Err(e) => return e,
                    }
                }
                Some(_) => return syntax(),
            };
            let mut sh = d.lock(&args[1]);
            match read_str(&mut sh, &args[1], now) {
                Ok(Some(v)) => {
                    if let Some(at) = change {
                        sh.set_expiry(&args[1], at, now);
                    }
                    Reply::Bulk(v)
                }
                Ok(None) => Reply::Nil,
                Err(e) => e,
            }
        }
        "GETRANGE" => {
            let (Some(start), Some(end)) = (int_of(&args[2]), int_of(&args[3])) else {
                return Reply::err(NOT_INT);
            };
            let mut sh = d.lock(&args[1]);
            match read_str(&mut sh, &args[1], now) {
                Ok(Some(v)) => Reply::Bulk(range_of(&v, start, end)),
                Ok(None) => Reply::bulk(""),
                Err(e) => e,
            }
        }
        "SETRANGE" => {
            let Some(off) = int_of(&args[2]).filter(|&o| o >= 0) else {
                return Reply::err("offset is out of range");
            };
            let off = off as usize;
            if off + args[3].len() > 512 * 1024 * 1024 {
                return Reply::err("string exceeds maximum allowed size (proto-max-bulk-len)");
            }
            let mut sh = d.lock(&args[1]);
            let (mut cur, ttl) = match sh.get(&args[1], now) {
                None => (Vec::new(), None),
                Some(
                    e @ Entry {
                        value: Value::Str(b),
                        ..
                    },
                ) => (b.to_vec(), e.expire_at()),
                Some(_) => return Reply::Error(WRONGTYPE.into()),
            };
            if args[3].is_empty() {
                return Reply::Int(cur.len() as i64);
            }
            if cur.len() < off + args[3].len() {
                cur.resize(off + args[3].len(), 0);
            }
            cur[off..off + args[3].len()].copy_from_slice(&args[3]);
            let n = cur.len();
            sh.insert(args[1].clone(), str_entry(Bytes::from(cur), ttl));
            Reply::Int(n as i64)
        }
        "DEL" | "UNLINK" | "EXISTS" => {
            let mut n = 0;
            for k in &args[1..] {
                let mut sh = d.lock(k);
                if name == "EXISTS" {
                    n += i64::from(sh.get(k, now).is_some());
                } else {
                    let live = sh.get(k, now).is_some();
                    sh.remove(k);
                    n += i64::from(live);
                }
            }
            Reply::Int(n)
        }
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => expire(d, name, args, now),
        "TTL" | "PTTL" | "EXPIRETIME" | "PEXPIRETIME" => {
            let mut sh = d.lock(&args[1]);
            match sh.get(&args[1], now).map(Entry::expire_at) {
                None => Reply::Int(-2),
                Some(None) => Reply::Int(-1),
                Some(Some(t)) => Reply::Int(match name {
                    "TTL" => (t.saturating_sub(now) as i64 + 500) / 1000,
                    "PTTL" => t.saturating_sub(now) as i64,
                    "EXPIRETIME" => t as i64 / 1000,
                    _ => t as i64,
                }),
            }
        }
        "PERSIST" => {
            let mut sh = d.lock(&args[1]);
            match sh.get(&args[1], now).map(Entry::expire_at) {
                Some(Some(_)) => {
                    sh.set_expiry(&args[1], None, now);
                    Reply::Int(1)
                }
                _ => Reply::Int(0),
            }
        }
        "TYPE" => {
            let mut sh = d.lock(&args[1]);
            Reply::Simple(
                sh.get(&args[1], now)
                    .map_or("none", |e| e.value.type_name()),
            )
        }
        "RENAME" | "RENAMENX" => {
            let keys = [&args[1][..], &args[2][..]];
            let mut locked = d.lock_many(&keys);
            let (from, to) = (d.shard_of(&args[1]), d.shard_of(&args[2]));
            let pos = |i: usize| locked.iter().position(|(j, _)| *j == i).unwrap_or(0);
            let (pf, pt) = (pos(from), pos(to));
            let Some(entry) = locked[pf].1.get(&args[1], now).cloned() else {
                return Reply::err("no such key");
            };
            if name == "RENAMENX" && args[1] != args[2] && locked[pt].1.get(&args[2], now).is_some()
            {
                return Reply::Int(0);
            }
            if args[1] != args[2] {
                locked[pf].1.remove(&args[1]);
                locked[pt].1.insert(args[2].clone(), entry);
            }
            if name == "RENAMENX" {
                Reply::Int(i64::from(args[1] != args[2]))
            } else {
                Reply::Simple("OK")
            }
        }
        "KEYS" => {
            let mut out = Vec::new();
            for sh in d.lock_all() {
                out.extend(
                    sh.keys(now)
                        .filter(|k| glob_match(&args[1], k))
                        .map(|k| Reply::Bulk(Bytes::copy_from_slice(k))),
                );
            }
            Reply::Array(out)
        }
        "SCAN" => scan(d, args, now),
        "HSCAN" | "SSCAN" | "ZSCAN" => scan_value(d, name, args, now),
        "RANDOMKEY" => {
            // From a random shard on, one shard at a time: a random live key.
            let n = d.shard_count();
            let first = rand::random_range(0..n.max(1));
            for i in 0..n {
                if let Some(sh) = d.lock_shard((first + i) % n)
                    && let Some(k) = sh.random_key(now)
                {
                    return Reply::Bulk(Bytes::copy_from_slice(k));
                }
            }
            Reply::Nil
        }
        _ => crate::types::run(d, name, args, now, &mut |n| rand::random_range(0..n))
            .or_else(|| crate::zset::run(d, name, args, now))
            .unwrap_or_else(|| Reply::err(format!("unknown command '{name}'"))),
    }
}

/// A string entry holding its own copy of `b` (see [`Shard::insert`]).
/// `SCAN cursor [MATCH pattern] [COUNT n] [TYPE type]`: the cursor is the shard and
/// the positions left in it (plus one; 0 when done), see [`Shard::scan`].
fn scan(d: &crate::db::Db, args: &[Bytes], now: u64) -> Reply {
    let Some(cursor) = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return Reply::err("invalid cursor");
    };
    let (pattern, count, kind) = match scan_options(&args[2..], true) {
        Ok(o) => o,
        Err(e) => return e,
    };
    let shards = d.shard_count();
    let (mut shard, mut pos) = if cursor == 0 {
        (0usize, None)
    } else {
        let c = cursor - 1;
        ((c >> 32) as usize, Some((c & 0xffff_ffff) as usize))
    };
    let mut keys = Vec::new();
    let mut steps = count;
    while shard < shards && steps > 0 {
        let Some(sh) = d.lock_shard(shard) else { break };
        let start = pos.unwrap_or(sh.len());
        let left = sh.scan(start, steps, now, |k, e| {
            if pattern.as_ref().is_none_or(|p| glob_match(p, k))
                && kind.as_deref().is_none_or(|t| t == e.value.type_name())
            {
                keys.push(Reply::Bulk(Bytes::copy_from_slice(k)));
            }
        });
        steps -= (start.min(sh.len()) - left).max(1).min(steps);
        if left == 0 {
            shard += 1;
            pos = None;
        } else {
            pos = Some(left);
        }
    }
    // A shard not started yet is "everything left" (clamped to its length then).
    let next = if shard >= shards {
        0
    } else {
        ((shard as u64) << 32 | pos.map_or(0xffff_ffff, |p| p as u64)) + 1
    };
    Reply::Array(vec![Reply::bulk(next.to_string()), Reply::Array(keys)])
}

/// Visits up to `count` positions of a collection of `len` downward from `cursor`
/// (0: from the end), calling `f` with each; the cursor to answer (0: done).
fn walk_down(len: usize, cursor: u64, count: usize, mut f: impl FnMut(usize)) -> u64 {
    let start = if cursor == 0 {
        len
    } else {
        (cursor as usize).min(len)
    };
    let end = start.saturating_sub(count);
    for pos in (end..start).rev() {
        f(pos);
    }
    end as u64
}

/// The options of the `SCAN` family: `MATCH pattern`, `COUNT n` (default 10) and,
/// for `SCAN` alone (`with_type`), `TYPE name`.
type ScanOptions = (Option<Bytes>, usize, Option<String>);

fn scan_options(opts: &[Bytes], with_type: bool) -> Result<ScanOptions, Reply> {
    let (mut pattern, mut count, mut kind) = (None, 10usize, None);
    for pair in opts.chunks(2) {
        let [name, v] = pair else {
            return Err(syntax());
        };
        match upper(name).as_str() {
            "MATCH" => pattern = Some(v.clone()),
            "COUNT" => match int_of(v) {
                Some(n) if n >= 1 => count = n as usize,
                Some(_) => return Err(syntax()),
                None => return Err(Reply::err(NOT_INT)),
            },
            "TYPE" if with_type => kind = Some(String::from_utf8_lossy(v).to_ascii_lowercase()),
            _ => return Err(syntax()),
        }
    }
    Ok((pattern, count, kind))
}

/// Hashes of at most this many fields answer `HSCAN` in one reply, in insertion
/// order (Redis' `hash-max-listpack-entries`: what Redis does for small hashes).
const SMALL_HASH: usize = 128;

/// `HSCAN`/`SSCAN`/`ZSCAN key cursor [MATCH pattern] [COUNT count]`. A hash, set or
/// sorted set past [`SMALL_HASH`] elements is walked by position from its end,
/// `COUNT` per call (a removal only moves elements from after the gap into it or
/// down, so one present throughout is never skipped; it may come twice, as Redis
/// allows). Smaller ones answer in one reply with cursor 0 (a sorted set in score
/// order), as Redis does for its small encodings.
fn scan_value(d: &crate::db::Db, name: &str, args: &[Bytes], now: u64) -> Reply {
    let Some(cursor) = std::str::from_utf8(&args[2])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return Reply::err("invalid cursor");
    };
    let (pattern, count, _) = match scan_options(&args[3..], false) {
        Ok(o) => o,
        Err(e) => return e,
    };
    let keep = |m: &[u8]| pattern.as_ref().is_none_or(|p| glob_match(p, m));
    let key = &args[1];
    let mut sh = d.lock(key);
    let Some(e) = sh.get(key, now) else {
        return Reply::Array(vec![Reply::bulk("0"), Reply::Array(Vec::new())]);
    };
    let mut out = Vec::new();
    let mut next = 0u64;
    match (name, &e.value) {
        ("HSCAN", Value::Hash(h)) if h.len() <= SMALL_HASH => {
            for (f, v) in h.iter().filter(|(f, _)| keep(f)) {
                out.push(Reply::Bulk(f.clone()));
                out.push(Reply::Bulk(v.clone()));
            }
        }
        ("HSCAN", Value::Hash(h)) => {
            next = walk_down(h.len(), cursor, count, |pos| {
                if let Some((f, v)) = h.get_index(pos)
                    && keep(f)
                {
                    out.push(Reply::Bulk(f.clone()));
                    out.push(Reply::Bulk(v.clone()));
                }
            });
        }
        ("SSCAN", Value::Set(s)) if s.len() <= SMALL_HASH => {
            out.extend(s.iter().filter(|m| keep(m)).map(|m| Reply::Bulk(m.clone())));
        }
        ("SSCAN", Value::Set(s)) => {
            // By position from the end, as a big hash (a removal moves the last
            // member into the gap: a member present throughout is never skipped).
            next = walk_down(s.len(), cursor, count, |pos| {
                if let Some(m) = s.get_index(pos)
                    && keep(m)
                {
                    out.push(Reply::Bulk(m.clone()));
                }
            });
        }
        ("ZSCAN", Value::ZSet(z)) if z.len() <= SMALL_HASH => {
            for (m, score) in z.iter().filter(|(m, _)| keep(m)) {
                out.push(Reply::Bulk(m.clone()));
                out.push(Reply::bulk(crate::resp::g17(score)));
            }
        }
        ("ZSCAN", Value::ZSet(z)) => {
            next = walk_down(z.len(), cursor, count, |pos| {
                if let Some((m, score)) = z.member_at(pos)
                    && keep(m)
                {
                    out.push(Reply::Bulk(m.clone()));
                    out.push(Reply::bulk(crate::resp::g17(score)));
                }
            });
        }
        _ => return Reply::Error(WRONGTYPE.into()),
    }
    Reply::Array(vec![Reply::bulk(next.to_string()), Reply::Array(out)])
}

fn str_entry(b: Bytes, expire_at: Option<u64>) -> Entry {
    Entry::new(Value::Str(Bytes::copy_from_slice(&b)), expire_at)
}

/// `GETRANGE`'s slice: negative offsets from the end, clamped, inclusive end.
fn range_of(v: &Bytes, start: i64, end: i64) -> Bytes {
    let len = v.len() as i64;
    if len == 0 {
        return Bytes::new();
    }
    let fix = |i: i64| if i < 0 { (len + i).max(0) } else { i };
    let (s, e) = (fix(start), fix(end).min(len - 1));
    if s > e || s >= len {
        return Bytes::new();
    }
    v.slice(s as usize..=e as usize)
}

fn set(d: &crate::db::Db, args: &[Bytes], now: u64) -> Reply {
    let (mut nx, mut xx, mut get, mut keep) = (false, false, false, false);
    let mut at: Option<u64> = None;
    let mut i = 3;
    while i < args.len() {
        let opt = upper(&args[i]);
        match opt.as_str() {
            "NX" if !xx => nx = true,
            "XX" if !nx => xx = true,
            "GET" => get = true,
            "KEEPTTL" if at.is_none() => keep = true,
            "EX" | "PX" | "EXAT" | "PXAT" if at.is_none() && !keep && i + 1 < args.len() => {
                match expiry(&opt, &args[i + 1], now, "set") {
                    Ok(t) => at = Some(t),
                    Err(e) => return e,
                }
                i += 1;
            }
            _ => return syntax(),
        }
        i += 1;
    }
    let mut sh = d.lock(&args[1]);
    let old = if get {
        match read_str(&mut sh, &args[1], now) {
            Ok(v) => Some(v),
            Err(e) => return e,
        }
    } else {
        None
    };
    let existing = sh.get(&args[1], now).map(Entry::expire_at);
    let skip = (nx && existing.is_some()) || (xx && existing.is_none());
    if !skip {
        let ttl = if keep { existing.flatten() } else { at };
        sh.insert(args[1].clone(), str_entry(args[2].clone(), ttl));
    }
    match (get, skip) {
        (true, _) => old.flatten().map_or(Reply::Nil, Reply::Bulk),
        (false, true) => Reply::Nil,
        (false, false) => Reply::Simple("OK"),
    }
}

fn expire(d: &crate::db::Db, name: &str, args: &[Bytes], now: u64) -> Reply {
    let Some(n) = int_of(&args[2]) else {
        return Reply::err(NOT_INT);
    };
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for a in &args[3..] {
        match upper(a).as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GT" => gt = true,
            "LT" => lt = true,
            other => return Reply::err(format!("Unsupported option {other}")),
        }
    }
    if nx && (xx || gt || lt) {
        return Reply::err("NX and XX, GT or LT options at the same time are not compatible");
    }
    if gt && lt {
        return Reply::err("GT and LT options at the same time are not compatible");
    }
    let at = match name {
        "EXPIRE" => n
            .checked_mul(1000)
            .and_then(|ms| ms.checked_add(now as i64)),
        "PEXPIRE" => n.checked_add(now as i64),
        "EXPIREAT" => n.checked_mul(1000),
        _ => Some(n),
    };
    let Some(at) = at else {
        return Reply::err(format!(
            "invalid expire time in '{}' command",
            name.to_ascii_lowercase()
        ));
    };
    let mut sh = d.lock(&args[1]);
    let Some(cur) = sh.get(&args[1], now).map(Entry::expire_at) else {
        return Reply::Int(0);
    };
    let ok = match cur {
        None => !(xx || gt),
        Some(t) => !nx && (!gt || at > t as i64) && (!lt || at < t as i64),
    };
    if !ok {
        return Reply::Int(0);
    }
    if at <= now as i64 {
        sh.remove(&args[1]);
    } else {
        sh.set_expiry(&args[1], Some(at as u64), now);
    }
    Reply::Int(1)
}
