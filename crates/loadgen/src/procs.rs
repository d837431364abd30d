//! CPU and memory of the processes a bench drives, sampled from `/proc`
//! per phase: CPU seconds (user + system, converted with the kernel's real
//! clock tick), current and peak RSS; plus the whole machine's busy CPU, so
//! load from other processes shows.

use std::time::Instant;

use serde_json::{Map, Value, json};

use crate::LoadError;

// The `/proc` readers are shared with the process metrics every node and
// service exports.
pub use meshwork_telemetry::metrics::{clock_ticks, cpu_secs, status_kb};

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
