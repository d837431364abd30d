//! redb vs fjall, with Meshwork's store access pattern (crates/store/src/store.rs).
//!
//! Usage:
//!   engine-choice run <redb|fjall> <scratch-dir>   # one full run of one engine, prints `metric value` lines
//!   engine-choice scan <redb|fjall> <db-dir>     # (internal) reopen + full scan in a fresh process
//!   engine-choice crash|scan-dirty <engine> <db-dir>  # (internal) unclean exit, then reopen + scan
//!   engine-choice summarize <results-dir>          # medians over results/<engine>-<n>.txt, markdown table
//!
//! Every write is durable before the commit call returns:
//!   redb : WriteTransaction::commit with the default Durability::Immediate (1 fdatasync per commit)
//!   fjall: WriteBatch with durability(Some(PersistMode::SyncData)) (1 fdatasync of the journal per commit)
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

const KV: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("kv");
const VALUE_LEN: usize = 290;
const CACHE_BYTES: usize = 256 * 1024 * 1024; // StoreConfig::default().cache_bytes
const LOAD_RECORDS: u64 = 1_000_000;
const LOAD_BATCH: u64 = 1_000;
const READS: usize = 100_000;
/// (batch size, number of commits)
const COMMIT_PLAN: [(u32, usize); 3] = [(1, 2000), (16, 500), (256, 200)];

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// 290 pseudo-random bytes (incompressible, so fjall's LZ4 gets no free win;
/// real records are 8-byte key + 256-byte value + metadata).
fn value_for(rev: u64, sub: u32) -> Vec<u8> {
    let mut r = Rng(rev.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sub as u64 ^ 0xDEAD_BEEF);
    let mut v = Vec::with_capacity(VALUE_LEN);
    while v.len() < VALUE_LEN {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(VALUE_LEN);
    v
}

fn fkey(rev: u64, sub: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&rev.to_be_bytes());
    k[8..].copy_from_slice(&sub.to_be_bytes());
    k
}

/// (rev, sub) of the i-th loaded record: batches of LOAD_BATCH share a revision.
fn load_key(i: u64) -> (u64, u32) {
    (1 + i / LOAD_BATCH, (i % LOAD_BATCH) as u32)
}

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut alloc) = (0, 0);
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if m.is_dir() {
                let (a, b) = dir_bytes(&e.path());
                apparent += a;
                alloc += b;
            } else {
                apparent += m.len();
                alloc += m.blocks() * 512;
            }
        }
    }
    (apparent, alloc)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

struct Out(Vec<(String, f64)>);
impl Out {
    fn put(&mut self, k: impl Into<String>, v: f64) {
        let k = k.into();
        println!("{k} {v}");
        self.0.push((k, v));
    }
    fn lat(&mut self, name: &str, mut ns: Vec<u64>) {
        ns.sort_unstable();
        self.put(format!("{name}_p50_us"), pct(&ns, 0.50) as f64 / 1e3);
        self.put(format!("{name}_p99_us"), pct(&ns, 0.99) as f64 / 1e3);
    }
    fn phase_end(&mut self, phase: &str) {
        self.put(format!("{phase}_hwm_mib"), status_kb("VmHWM:") as f64 / 1024.0);
    }
}

trait Engine {
    /// Commit `batch` records of revision `rev` durably.
    fn commit(&mut self, rev: u64, subs: std::ops::Range<u32>);
    /// Commit load records [from, to) durably as one batch.
    fn commit_load(&mut self, from: u64, to: u64);
    fn read_fresh(&self, rev: u64, sub: u32) -> usize;
    /// Many reads through one reused read snapshot; returns per-read ns.
    fn read_reused(&self, keys: &[(u64, u32)]) -> Option<Vec<u64>>;
    fn scan(&self) -> (u64, u64);
}

struct Redb(redb::Database);
impl Redb {
    fn open(path: &Path) -> Self {
        let db = redb::Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .expect("redb create");
        let w = db.begin_write().unwrap();
        w.open_table(KV).unwrap();
        w.commit().unwrap();
        Redb(db)
    }
    fn put_all(&mut self, it: impl Iterator<Item = (u64, u32)>) {
        let w = self.0.begin_write().unwrap(); // Durability::Immediate by default
        {
            let mut t = w.open_table(KV).unwrap();
            for (rev, sub) in it {
                t.insert((rev, sub), value_for(rev, sub).as_slice()).unwrap();
            }
        }
        w.commit().unwrap();
    }
}
impl Engine for Redb {
    fn commit(&mut self, rev: u64, subs: std::ops::Range<u32>) {
        self.put_all(subs.map(|s| (rev, s)));
    }
    fn commit_load(&mut self, from: u64, to: u64) {
        self.put_all((from..to).map(load_key));
    }
    fn read_fresh(&self, rev: u64, sub: u32) -> usize {
        // As the store does: a fresh read transaction per point read.
        let r = self.0.begin_read().unwrap();
        let t = r.open_table(KV).unwrap();
        let g = t.get((rev, sub)).unwrap().expect("key exists");
        g.value().len()
    }
    fn read_reused(&self, keys: &[(u64, u32)]) -> Option<Vec<u64>> {
        let r = self.0.begin_read().unwrap();
        let t = r.open_table(KV).unwrap();
        let mut out = Vec::with_capacity(keys.len());
        let mut sink = 0usize;
        for &(rev, sub) in keys {
            let s = Instant::now();
            sink += t.get((rev, sub)).unwrap().expect("key exists").value().len();
            out.push(s.elapsed().as_nanos() as u64);
        }
        assert_eq!(sink, keys.len() * VALUE_LEN);
        Some(out)
    }
    fn scan(&self) -> (u64, u64) {
        let r = self.0.begin_read().unwrap();
        let t = r.open_table(KV).unwrap();
        let (mut n, mut bytes) = (0u64, 0u64);
        for e in t.iter().unwrap() {
            let (k, v) = e.unwrap();
            let _ = k.value();
            n += 1;
            bytes += v.value().len() as u64;
        }
        (n, bytes)
    }
}

struct Fjall {
    db: fjall::Database,
    ks: fjall::Keyspace,
}
impl Fjall {
    fn open(path: &Path) -> Self {
        let db = fjall::Database::builder(path)
            .cache_size(CACHE_BYTES as u64)
            .open()
            .expect("fjall open");
        let ks = db
            .keyspace("kv", fjall::KeyspaceCreateOptions::default)
            .expect("keyspace");
        Fjall { db, ks }
    }
    fn put_all(&mut self, it: impl Iterator<Item = (u64, u32)>) {
        let mut b = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        for (rev, sub) in it {
            b.insert(&self.ks, &fkey(rev, sub)[..], &value_for(rev, sub)[..]);
        }
        b.commit().unwrap();
    }
}
impl Engine for Fjall {
    fn commit(&mut self, rev: u64, subs: std::ops::Range<u32>) {
        self.put_all(subs.map(|s| (rev, s)));
    }
    fn commit_load(&mut self, from: u64, to: u64) {
        self.put_all((from..to).map(load_key));
    }
    fn read_fresh(&self, rev: u64, sub: u32) -> usize {
        self.ks.get(fkey(rev, sub)).unwrap().expect("key exists").len()
    }
    fn read_reused(&self, _keys: &[(u64, u32)]) -> Option<Vec<u64>> {
        None // fjall point reads need no transaction; only the "fresh" column applies
    }
    fn scan(&self) -> (u64, u64) {
        let (mut n, mut bytes) = (0u64, 0u64);
        for g in self.ks.iter() {
            let (_k, v) = g.into_inner().unwrap();
            n += 1;
            bytes += v.len() as u64;
        }
        (n, bytes)
    }
}

fn open(engine: &str, dir: &Path) -> Box<dyn Engine> {
    match engine {
        "redb" => Box::new(Redb::open(&dir.join("db.redb"))),
        "fjall" => Box::new(Fjall::open(&dir.join("fjall"))),
        e => panic!("unknown engine {e}"),
    }
}

fn run(engine: &str, base: &Path) {
    let mut out = Out(Vec::new());
    let _ = std::fs::remove_dir_all(base);
    std::fs::create_dir_all(base).unwrap();

    // 1. commit latency, durable, fresh database
    {
        let cdir = base.join("commit");
        std::fs::create_dir_all(&cdir).unwrap();
        let mut e = open(engine, &cdir);
        let mut rev = 1u64;
        for (batch, commits) in COMMIT_PLAN {
            // a few warm-up commits (not measured)
            for _ in 0..10 {
                e.commit(rev, 0..batch);
                rev += 1;
            }
            let mut lat = Vec::with_capacity(commits);
            let t0 = Instant::now();
            for _ in 0..commits {
                let s = Instant::now();
                e.commit(rev, 0..batch);
                lat.push(s.elapsed().as_nanos() as u64);
                rev += 1;
            }
            let secs = t0.elapsed().as_secs_f64();
            out.lat(&format!("commit_b{batch}"), lat);
            out.put(
                format!("commit_b{batch}_records_per_s"),
                (commits as f64 * batch as f64) / secs,
            );
        }
    }
    out.phase_end("commit");

    // 2. sequential load, 1M records in durable batches of 1000
    let ldir = base.join("load");
    std::fs::create_dir_all(&ldir).unwrap();
    {
        let mut e = open(engine, &ldir);
        let t0 = Instant::now();
        let mut i = 0;
        while i < LOAD_RECORDS {
            e.commit_load(i, i + LOAD_BATCH);
            i += LOAD_BATCH;
        }
        out.put("load_s", t0.elapsed().as_secs_f64());
        let (app, alloc) = dir_bytes(&ldir);
        out.put("load_disk_mib_open", alloc as f64 / 1048576.0);
        let _ = app;
        out.phase_end("load");

        // 3. random point reads of existing keys (same process, cache as left by the load)
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        let keys: Vec<(u64, u32)> = (0..READS)
            .map(|_| load_key(rng.next() % LOAD_RECORDS))
            .collect();
            let mut lat = Vec::with_capacity(READS);
        let mut sink = 0;
        for &(rev, sub) in &keys {
            let s = Instant::now();
            sink += e.read_fresh(rev, sub);
            lat.push(s.elapsed().as_nanos() as u64);
        }
        assert_eq!(sink, READS * VALUE_LEN);
        out.lat("read_fresh", lat);
        // `reused` is only measured for redb (fjall has no read transaction to reuse).
        if let Some(lat) = e.read_reused(&keys) {
            out.lat("read_reused", lat);
        }
        out.phase_end("read");
        let t0 = Instant::now();
        drop(e);
        out.put("close_s", t0.elapsed().as_secs_f64());
    }
    let (_, alloc) = dir_bytes(&ldir);
    out.put("load_disk_mib_closed", alloc as f64 / 1048576.0);

    // 4. recovery: reopen + full scan of 1M records, in a fresh child process
    //    (the store's startup path; its VmHWM is that process's own peak).
    //    The OS page cache is NOT dropped (shared machine), so the files are warm.
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["scan", engine, ldir.to_str().unwrap()])
        .output()
        .expect("spawn scan child");
    assert!(child.status.success(), "scan child failed: {}", String::from_utf8_lossy(&child.stderr));
    print!("{}", String::from_utf8_lossy(&child.stdout));

    // 4b. unclean shutdown: a child reopens, commits one durable batch (overwriting 16 loaded
    //     records with identical bytes) and exits without closing; a second child then reopens
    //     (redb: repair of allocator state; fjall: journal replay) and scans.
    for (mode, must) in [("crash", false), ("scan-dirty", true)] {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([mode, engine, ldir.to_str().unwrap()])
            .output()
            .expect("spawn child");
        assert!(!must || child.status.success(), "{mode} child failed: {}", String::from_utf8_lossy(&child.stderr));
        print!("{}", String::from_utf8_lossy(&child.stdout));
    }
    let _ = std::fs::remove_dir_all(base);
}

fn crash(engine: &str, ldir: &Path) {
    let mut e = open(engine, ldir);
    e.commit_load(0, 16);
    // No destructor runs: the database is not closed cleanly.
    std::process::exit(0);
}

fn scan(engine: &str, ldir: &Path, prefix: &str) {
    let mut out = Out(Vec::new());
    let t0 = Instant::now();
    let e = open(engine, ldir);
    let t_open = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let (n, bytes) = e.scan();
    let t_scan = t1.elapsed().as_secs_f64();
    assert_eq!(n, LOAD_RECORDS, "scan count");
    assert_eq!(bytes, LOAD_RECORDS * VALUE_LEN as u64);
    out.put(format!("{prefix}reopen_s"), t_open);
    out.put(format!("{prefix}scan_s"), t_scan);
    out.put(format!("{prefix}reopen_scan_s"), t_open + t_scan);
    out.phase_end(&format!("{prefix}scan"));
}

fn summarize(dir: &Path) {
    // metric -> engine -> values
    let mut m: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    for f in files {
        let name = f.file_stem().unwrap().to_string_lossy().to_string();
        let engine = name.split('-').next().unwrap().to_string();
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let mut it = line.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next()) else { continue };
            let Ok(v) = v.parse::<f64>() else { continue };
            if !order.contains(&k.to_string()) {
                order.push(k.to_string());
            }
            m.entry(k.into()).or_default().entry(engine.clone()).or_default().push(v);
        }
    }
    let med = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!("| metric | redb (median) | fjall (median) | fjall/redb | runs (redb; fjall) |");
    println!("|---|---:|---:|---:|---|");
    for k in order {
        let e = &m[&k];
        let fmt = |x: f64| {
            if x >= 100.0 { format!("{x:.0}") } else if x >= 10.0 { format!("{x:.1}") } else { format!("{x:.2}") }
        };
        let r = e.get("redb").map(med);
        let f = e.get("fjall").map(med);
        let ratio = match (r, f) {
            (Some(r), Some(f)) if r > 0.0 => format!("{:.2}", f / r),
            _ => "-".into(),
        };
        let runs = |n: &str| {
            e.get(n)
                .map(|v| v.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "| {k} | {} | {} | {ratio} | {}; {} |",
            r.map(fmt).unwrap_or("-".into()),
            f.map(fmt).unwrap_or("-".into()),
            runs("redb"),
            runs("fjall")
        );
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("run") => run(&a[2], Path::new(&a[3])),
        Some("scan") => scan(&a[2], Path::new(&a[3]), ""),
        Some("scan-dirty") => scan(&a[2], Path::new(&a[3]), "dirty_"),
        Some("crash") => crash(&a[2], Path::new(&a[3])),
        Some("summarize") => summarize(Path::new(&a[2])),
        _ => eprintln!("usage: engine-choice run <redb|fjall> <dir> | summarize <results-dir>"),
    }
}
