//! CPU and memory of the processes a bench drives, sampled from `/proc`
//! per phase: CPU seconds (user + system, converted with the kernel's real
//! clock tick), current and peak RSS; plus the whole machine's busy CPU, so
//! load from other processes shows.

use std::sync::OnceLock;
use std::time::Instant;

use serde_json::{Map, Value, json};

use crate::LoadError;

/// `AT_CLKTCK` in the ELF auxiliary vector: the kernel's clock ticks per second.
const AT_CLKTCK: u64 = 17;

/// Clock ticks per second of `/proc`'s CPU times: the kernel's `AT_CLKTCK`
/// from `/proc/self/auxv`, or the usual 100 when it cannot be read.
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|b| auxv_value(&b, AT_CLKTCK))
            .filter(|t| *t > 0)
            .map_or(100.0, |t| t as f64)
    })
}

/// The value of `key` in an auxiliary vector (native-endian word pairs).
fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    const W: usize = std::mem::size_of::<usize>();
    auxv.chunks_exact(2 * W).find_map(|pair| {
        let word = |b: &[u8]| {
            let mut a = [0u8; W];
            a.copy_from_slice(b);
            usize::from_ne_bytes(a) as u64
        };
        (word(&pair[..W]) == key).then(|| word(&pair[W..]))
    })
}

/// CPU seconds (user + system) of `/proc/{pid}` (`self` for this process;
/// `machine` for every busy CPU of the machine, from `/proc/stat`).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    if pid == "machine" {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let f: Vec<f64> = s
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<Vec<f64>>>()?;
        let idle = f.get(3)? + f.get(4)?;
        return Some((f.iter().sum::<f64>() - idle) / clock_ticks());
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clock_ticks())
}

/// A `/proc/{pid}/status` field in KiB (`VmRSS`, `VmHWM`, ...).
pub fn status_kb(pid: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Warns on stderr when the open-file limit cannot hold `needed` connections.
pub fn check_fd_limit(needed: usize) {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < needed + 64
    {
        eprintln!(
            "warning: the open-file limit is {soft} but this run needs about {needed} connections; raise it (ulimit -n) for the generator and the node"
        );
    }
}

/// Processes whose CPU and memory a bench samples per phase (`--pids
/// name=PID,...`, plus the generator itself and the machine).
#[derive(Debug)]
pub struct Procs {
    list: Vec<(String, String)>,
    at: Instant,
    cpu: Vec<Option<f64>>,
    phases: Vec<(String, Value)>,
}

impl Procs {
    /// Parses `NAME=PID` entries and takes the first CPU sample.
    pub fn new(args: &[String]) -> Result<Procs, LoadError> {
        let mut list = Vec::new();
        for a in args.iter().filter(|a| !a.is_empty()) {
            let bad = |m: String| LoadError::Invalid(format!("--pids entry {a:?}: {m}"));
            let (name, pid) = a
                .split_once('=')
                .ok_or_else(|| bad("must be NAME=PID".into()))?;
            pid.parse::<u32>()
                .map_err(|_| bad(format!("{pid:?} is not a PID")))?;
            if cpu_secs(pid).is_none() {
                return Err(bad(format!("no process {pid}")));
            }
            list.push((name.to_string(), pid.to_string()));
        }
        list.push(("generator".into(), "self".into()));
        list.push(("machine".into(), "machine".into()));
        let cpu = list.iter().map(|(_, p)| cpu_secs(p)).collect();
        Ok(Procs {
            list,
            at: Instant::now(),
            cpu,
            phases: Vec::new(),
        })
    }

    /// Starts a new phase now (discarding what happened since the last mark).
    pub fn mark(&mut self) {
        self.at = Instant::now();
        self.cpu = self.list.iter().map(|(_, p)| cpu_secs(p)).collect();
    }

    /// Ends a phase: CPU used by each process since the last mark (percent
    /// of one core), and its current and peak RSS; starts the next phase.
    pub fn end(&mut self, phase: &str) {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let mut m = Map::new();
        let mut cpu = Vec::new();
        for ((name, pid), c0) in self.list.iter().zip(&self.cpu) {
            let c1 = cpu_secs(pid);
            cpu.push(c1);
            let used = match (c0, c1) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            let pct = used.map(|u| (u / wall * 1000.0).round() / 10.0);
            let mib =
                |f: &str| status_kb(pid, f).map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0);
            m.insert(
                name.clone(),
                json!({"cpu_pct": pct, "cpu_s": used,
                       "rss_mib": mib("VmRSS"), "hwm_mib": mib("VmHWM")}),
            );
        }
        self.phases.push((
            phase.to_string(),
            json!({"wall_s": wall, "procs": Value::Object(m)}),
        ));
        self.at = Instant::now();
        self.cpu = cpu;
    }

    /// The phases in order: `[{"phase", "wall_s", "procs": {name: {...}}}]`.
    pub fn json(&self) -> Value {
        Value::Array(
            self.phases
                .iter()
                .map(|(k, v)| {
                    let mut v = v.clone();
                    v["phase"] = json!(k);
                    v
                })
                .collect(),
        )
    }

    /// A table on stdout: one row per phase, CPU % and RSS of each process.
    pub fn print(&self) {
        if self.phases.is_empty() {
            return;
        }
        print!("{:<16} {:>7}", "phase", "wall s");
        for (name, _) in &self.list {
            print!(" {:>22}", format!("{name} cpu%/rss MiB"));
        }
        println!();
        let num = |v: &Value| v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.0}"));
        for (phase, v) in &self.phases {
            print!("{:<16} {:>7.1}", phase, v["wall_s"].as_f64().unwrap_or(0.0));
            for (name, _) in &self.list {
                let p = &v["procs"][name];
                print!(
                    " {:>22}",
                    format!("{}/{}", num(&p["cpu_pct"]), num(&p["rss_mib"]))
                );
            }
            println!();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_clock_tick_is_read_from_the_auxiliary_vector() {
        // Linux puts AT_CLKTCK in every process's auxv (100 on common kernels).
        let auxv = std::fs::read("/proc/self/auxv").unwrap();
        let t = auxv_value(&auxv, AT_CLKTCK).unwrap();
        assert!(t > 0);
        assert_eq!(clock_ticks(), t as f64);
        let w = std::mem::size_of::<usize>();
        let mut fake = Vec::new();
        for (k, v) in [(3usize, 7usize), (17, 250), (0, 0)] {
            fake.extend_from_slice(&k.to_ne_bytes());
            fake.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(fake.len(), 6 * w);
        assert_eq!(auxv_value(&fake, AT_CLKTCK), Some(250));
        assert_eq!(auxv_value(&fake, 99), None);
    }

    #[test]
    fn own_cpu_and_rss_are_readable() {
        assert!(cpu_secs("self").is_some());
        assert!(cpu_secs("machine").is_some());
        assert!(status_kb("self", "VmRSS").unwrap() > 0);
    }

    #[test]
    fn phases_sample_this_process_and_refuse_bad_pids() {
        assert!(Procs::new(&["x".into()]).is_err());
        assert!(Procs::new(&["x=abc".into()]).is_err());
        let mut p = Procs::new(&[format!("me={}", std::process::id())]).unwrap();
        p.mark();
        let spin = Instant::now();
        while spin.elapsed().as_millis() < 20 {}
        p.end("spin");
        let j = p.json();
        assert_eq!(j[0]["phase"], "spin");
        assert!(j[0]["procs"]["me"]["cpu_s"].as_f64().unwrap() >= 0.0);
        assert!(j[0]["procs"]["generator"]["rss_mib"].as_f64().unwrap() > 0.0);
    }
}
