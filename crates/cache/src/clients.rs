//! What the node knows of its clients and its slow commands: one record per
//! connection for `CLIENT LIST` (each connection's own task writes it after every
//! command, with relaxed stores to memory no other thread writes), and the slow log
//! (`SLOWLOG GET/LEN/RESET`): commands that ran longer than
//! `slowlog-log-slower-than` µs, the newest first, at most `slowlog-max-len`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::resp::Reply;

/// Arguments kept per slow-log entry (Redis' `SLOWLOG_ENTRY_MAX_ARGC`).
const MAX_ARGS: usize = 32;
/// Bytes kept per argument (Redis' `SLOWLOG_ENTRY_MAX_STRING`).
const MAX_ARG_BYTES: usize = 128;
/// No command run yet.
const NO_COMMAND: usize = usize::MAX;

/// One connection, as `CLIENT LIST` shows it.
#[derive(Debug)]
pub struct ClientMeta {
    /// `CLIENT ID`.
    pub id: u64,
    /// The peer's address.
    pub addr: String,
    /// The node's address of the connection.
    pub laddr: String,
    /// The socket's descriptor.
    pub fd: i64,
    /// When it connected (ms since the epoch).
    pub connected_ms: u64,
    last_ms: AtomicU64,
    cmd: AtomicUsize,
    db: AtomicUsize,
    resp: AtomicU8,
    sub: AtomicUsize,
    psub: AtomicUsize,
    multi: AtomicI64,
    name: Mutex<Option<Bytes>>,
}

impl ClientMeta {
    /// A connection that has just connected.
    pub fn new(id: u64, addr: String, laddr: String, fd: i64, now_ms: u64) -> ClientMeta {
        ClientMeta {
            id,
            addr,
            laddr,
            fd,
            connected_ms: now_ms,
            last_ms: AtomicU64::new(now_ms),
            cmd: AtomicUsize::new(NO_COMMAND),
            db: AtomicUsize::new(0),
            resp: AtomicU8::new(2),
            sub: AtomicUsize::new(0),
            psub: AtomicUsize::new(0),
            multi: AtomicI64::new(-1),
            name: Mutex::new(None),
        }
    }

    /// Records the command running (an index in [`crate::cmd::COMMANDS`]).
    pub(crate) fn running(&self, cmd: usize) {
        self.cmd.store(cmd, Ordering::Relaxed);
    }

    /// Records the session's state after a command.
    pub(crate) fn after(&self, s: &crate::cmd::Session, now_ms: u64) {
        self.last_ms.store(now_ms, Ordering::Relaxed);
        self.db.store(s.db, Ordering::Relaxed);
        self.resp.store(s.proto, Ordering::Relaxed);
        let (sub, psub) = s
            .sub
            .as_ref()
            .map_or((0, 0), |x| (x.channels.len(), x.patterns.len()));
        self.sub.store(sub, Ordering::Relaxed);
        self.psub.store(psub, Ordering::Relaxed);
        self.multi.store(
            s.multi.as_ref().map_or(-1, |q| q.len() as i64),
            Ordering::Relaxed,
        );
    }

    /// Sets the name (`CLIENT SETNAME`).
    pub(crate) fn set_name(&self, name: Option<Bytes>) {
        *self.name.lock() = name;
    }

    /// The name, if set.
    pub fn name(&self) -> Option<Bytes> {
        self.name.lock().clone()
    }

    /// Its line of `CLIENT LIST`, with the fields Redis 7 writes (the buffer and
    /// memory fields are 0: this node does not track them per client).
    pub fn line(&self, now_ms: u64) -> String {
        let cmd = crate::cmd::COMMANDS
            .get(self.cmd.load(Ordering::Relaxed))
            .map_or("NULL".to_owned(), |(n, _)| n.to_ascii_lowercase());
        let (sub, psub) = (
            self.sub.load(Ordering::Relaxed),
            self.psub.load(Ordering::Relaxed),
        );
        let multi = self.multi.load(Ordering::Relaxed);
        let flags = match (sub + psub > 0, multi >= 0) {
            (true, _) => "P",
            (false, true) => "x",
            (false, false) => "N",
        };
        format!(
            "id={} addr={} laddr={} fd={} name={} age={} idle={} flags={flags} db={} sub={sub} psub={psub} ssub=0 multi={multi} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={cmd} user=default redir=-1 resp={}\n",
            self.id,
            self.addr,
            self.laddr,
            self.fd,
            self.name()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .unwrap_or_default(),
            now_ms.saturating_sub(self.connected_ms) / 1000,
            now_ms.saturating_sub(self.last_ms.load(Ordering::Relaxed)) / 1000,
            self.db.load(Ordering::Relaxed),
            self.resp.load(Ordering::Relaxed),
        )
    }
}

/// The node's connections, by id.
#[derive(Default)]
pub struct Clients {
    by_id: Mutex<BTreeMap<u64, Arc<ClientMeta>>>,
}

impl Clients {
    /// Adds a connection.
    pub fn add(&self, c: Arc<ClientMeta>) {
        self.by_id.lock().insert(c.id, c);
    }

    /// Removes a connection that ended.
    pub fn remove(&self, id: u64) {
        self.by_id.lock().remove(&id);
    }

    /// Every connection, by id.
    pub fn all(&self) -> Vec<Arc<ClientMeta>> {
        self.by_id.lock().values().cloned().collect()
    }
}

/// One slow command.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SlowEntry {
    /// Its number (unique, increasing).
    pub id: u64,
    /// When it ran (s since the epoch).
    pub at_s: u64,
    /// How long it took, in µs.
    pub micros: u64,
    /// The command and its arguments (at most 32, each cut at 128 bytes; passwords
    /// redacted).
    pub args: Vec<String>,
    /// The client's address.
    pub addr: String,
    /// The client's name.
    pub name: String,
}

impl SlowEntry {
    /// As `SLOWLOG GET` answers it.
    fn reply(&self) -> Reply {
        Reply::Array(vec![
            Reply::Int(self.id as i64),
            Reply::Int(self.at_s as i64),
            Reply::Int(self.micros as i64),
            Reply::Array(self.args.iter().map(|a| Reply::bulk(a.clone())).collect()),
            Reply::bulk(self.addr.clone()),
            Reply::bulk(self.name.clone()),
        ])
    }
}

/// The slow log.
pub struct SlowLog {
    /// Log commands that take at least this many µs (negative: none; 0: every one).
    slower_than_us: AtomicI64,
    /// Entries kept.
    max_len: AtomicUsize,
    next_id: AtomicU64,
    entries: Mutex<VecDeque<SlowEntry>>,
}

impl SlowLog {
    /// A slow log with Redis' settings' meaning.
    pub fn new(slower_than_us: i64, max_len: usize) -> SlowLog {
        SlowLog {
            slower_than_us: AtomicI64::new(slower_than_us),
            max_len: AtomicUsize::new(max_len),
            next_id: AtomicU64::new(0),
            entries: Mutex::new(VecDeque::new()),
        }
    }

    /// `slowlog-log-slower-than`.
    pub fn slower_than_us(&self) -> i64 {
        self.slower_than_us.load(Ordering::Relaxed)
    }

    /// `slowlog-max-len`.
    pub fn max_len(&self) -> usize {
        self.max_len.load(Ordering::Relaxed)
    }

    /// Sets `slowlog-log-slower-than`.
    pub fn set_slower_than_us(&self, v: i64) {
        self.slower_than_us.store(v, Ordering::Relaxed);
    }

    /// Sets `slowlog-max-len` (dropping the oldest entries past it).
    pub fn set_max_len(&self, v: usize) {
        self.max_len.store(v, Ordering::Relaxed);
        self.entries.lock().truncate(v);
    }

    /// Records `args` if it took `micros` or more than the threshold.
    pub fn observe(&self, micros: u64, args: &[Bytes], client: Option<&ClientMeta>, now_ms: u64) {
        let t = self.slower_than_us();
        if t < 0 || micros < t as u64 {
            return;
        }
        let max = self.max_len();
        if max == 0 {
            return;
        }
        let e = SlowEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            at_s: now_ms / 1000,
            micros,
            args: shown_args(args),
            addr: client.map(|c| c.addr.clone()).unwrap_or_default(),
            name: client
                .and_then(ClientMeta::name)
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .unwrap_or_default(),
        };
        let mut entries = self.entries.lock();
        entries.push_front(e);
        entries.truncate(max);
    }

    /// The newest `n` entries (all with `None`).
    pub fn newest(&self, n: Option<usize>) -> Vec<SlowEntry> {
        let entries = self.entries.lock();
        entries
            .iter()
            .take(n.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// True when nothing is logged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every entry.
    pub fn reset(&self) {
        self.entries.lock().clear();
    }

    /// `SLOWLOG GET [count]`, `LEN`, `RESET`, `HELP`.
    pub(crate) fn command(&self, args: &[Bytes]) -> Reply {
        let sub = crate::cmd::upper(&args[1]);
        match (sub.as_str(), args.len()) {
            ("GET", 2) => {
                Reply::Array(self.newest(Some(10)).iter().map(SlowEntry::reply).collect())
            }
            ("GET", 3) => match crate::cmd::int_of(&args[2]) {
                Some(-1) => Reply::Array(self.newest(None).iter().map(SlowEntry::reply).collect()),
                Some(n) if n >= 0 => Reply::Array(
                    self.newest(Some(n as usize))
                        .iter()
                        .map(SlowEntry::reply)
                        .collect(),
                ),
                _ => Reply::err("count should be greater than or equal to -1"),
            },
            ("LEN", 2) => Reply::Int(self.len() as i64),
            ("RESET", 2) => {
                self.reset();
                Reply::Simple("OK")
            }
            ("HELP", 2) => Reply::Array(
                [
                    "SLOWLOG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                    "GET [<count>]",
                    "    Return top <count> entries from the slowlog (default: 10, -1 mean all).",
                    "    Entries are made of:",
                    "    id, timestamp, time in microseconds, arguments array, client IP and port,",
                    "    client name",
                    "LEN",
                    "    Return the length of the slowlog.",
                    "RESET",
                    "    Reset the slowlog.",
                    "HELP",
                    "    Prints this help.",
                ]
                .iter()
                .map(|l| Reply::Simple(l))
                .collect(),
            ),
            ("GET" | "LEN" | "RESET" | "HELP", _) => {
                crate::cmd::wrong_args(&format!("slowlog|{}", sub.to_ascii_lowercase()))
            }
            _ => Reply::err(format!(
                "unknown subcommand '{}'. Try SLOWLOG HELP.",
                String::from_utf8_lossy(&args[1])
            )),
        }
    }
}

/// The arguments as the slow log keeps them: at most [`MAX_ARGS`] (the last one
/// saying how many more there were), each cut at [`MAX_ARG_BYTES`], and the
/// passwords of `AUTH` and `HELLO ... AUTH` replaced by `(redacted)`.
fn shown_args(args: &[Bytes]) -> Vec<String> {
    let cmd = args
        .first()
        .map(|a| crate::cmd::upper(a))
        .unwrap_or_default();
    let mut redact_next = 0usize;
    let mut out = Vec::with_capacity(args.len().min(MAX_ARGS));
    for (i, a) in args.iter().enumerate() {
        if out.len() == MAX_ARGS - 1 && args.len() > MAX_ARGS {
            out.push(format!("... ({} more arguments)", args.len() - i));
            break;
        }
        let secret = (cmd == "AUTH" && i > 0) || redact_next > 0;
        redact_next = redact_next.saturating_sub(1);
        if cmd == "HELLO" && crate::cmd::upper(a) == "AUTH" {
            redact_next = 2;
        }
        if secret {
            out.push("(redacted)".to_owned());
        } else if a.len() > MAX_ARG_BYTES {
            out.push(format!(
                "{}... ({} more bytes)",
                String::from_utf8_lossy(&a[..MAX_ARG_BYTES]),
                a.len() - MAX_ARG_BYTES
            ));
        } else {
            out.push(String::from_utf8_lossy(a).into_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<Bytes> {
        v.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn the_slow_log_keeps_the_newest_entries_cut_and_redacted() {
        let log = SlowLog::new(100, 2);
        log.observe(99, &args(&["GET", "fast"]), None, 5_000);
        assert!(log.is_empty(), "under the threshold: not logged");
        log.observe(100, &args(&["AUTH", "user", "secret"]), None, 6_000);
        log.observe(
            150,
            &args(&["HELLO", "3", "AUTH", "u", "p", "SETNAME", "x"]),
            None,
            7_000,
        );
        let long = "x".repeat(200);
        log.observe(300, &args(&["SET", "k", &long]), None, 8_000);
        let got = log.newest(None);
        assert_eq!(got.len(), 2, "max-len 2 keeps the two newest");
        assert_eq!(got[0].id, 2);
        assert_eq!(got[0].at_s, 8);
        assert_eq!(
            got[0].args[2],
            format!("{}... (72 more bytes)", "x".repeat(128))
        );
        assert_eq!(
            got[1].args,
            [
                "HELLO",
                "3",
                "AUTH",
                "(redacted)",
                "(redacted)",
                "SETNAME",
                "x"
            ]
        );
        let many: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let mut v = vec!["DEL"];
        v.extend(many.iter().map(String::as_str));
        log.set_slower_than_us(0);
        log.observe(0, &args(&v), None, 9_000);
        let e = &log.newest(Some(1))[0];
        assert_eq!(e.args.len(), 32);
        assert_eq!(e.args[31], "... (10 more arguments)");
        log.set_slower_than_us(-1);
        log.observe(1_000_000, &args(&["GET", "k"]), None, 9_000);
        assert_eq!(
            log.newest(Some(1))[0].id,
            3,
            "negative threshold: nothing logged"
        );
    }
}
