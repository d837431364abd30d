//! `meshwork rollout start | list | status | promote | abort | pause | resume | rm`:
//! progressive delivery through a node's HTTP API (`/v1/rollouts`).

use anyhow::{Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::coordcli::Http;
use crate::httpc::{call, enc};
use crate::output::{OutputArgs, Table, cell, time_ms};

/// `meshwork rollout`.
#[derive(Args)]
pub(crate) struct RolloutArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: RolloutCmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum StrategyArg {
    /// Step by step through `--steps`.
    Canary,
    /// All at once after a health gate; instant rollback.
    Bluegreen,
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// Shift SERVICE's traffic to the instances of a new version, analysing
    /// each step against the stable version (rolls back on failure).
    Start {
        /// The service.
        service: String,
        /// The new version (the instances' `version` field).
        #[arg(long)]
        to_version: String,
        /// `canary` (step by step) or `bluegreen` (at once after a health gate).
        #[arg(long, value_enum, default_value = "canary")]
        strategy: StrategyArg,
        /// Canary weights in percent, ending at 100.
        #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
        steps: Vec<u8>,
        /// How long each step is watched (`30s`, `1m`, `2h`).
        #[arg(long, default_value = "1m", value_parser = parse_ms)]
        interval: u64,
        /// Most the new version's error rate may exceed the stable one's, in
        /// percentage points.
        #[arg(long, default_value_t = 2.0)]
        max_error_increase: f64,
        /// Most the new version's p99 may be as a multiple of the stable one's...
        #[arg(long, default_value_t = 1.5)]
        max_p99_ratio: f64,
        /// ...when it is also this much above it.
        #[arg(long, default_value = "25ms", value_parser = parse_ms)]
        p99_slack: u64,
        /// Requests to the new version a step needs before it is judged.
        #[arg(long, default_value_t = 20)]
        min_requests: u64,
        /// Pause on a failed analysis instead of rolling back.
        #[arg(long)]
        no_auto_rollback: bool,
        /// Healthy instances of the new version the first step waits for
        /// (blue-green: as many as the stable versions have).
        #[arg(long)]
        min_healthy: Option<u32>,
        /// Longest to wait for them before the rollout fails.
        #[arg(long, default_value = "10m", value_parser = parse_ms)]
        deadline: u64,
        /// Requests with this header always reach the new version: NAME=VALUE.
        #[arg(long, conflicts_with = "pin_cookie")]
        pin_header: Option<String>,
        /// Requests with this cookie always reach the new version: NAME=VALUE.
        #[arg(long)]
        pin_cookie: Option<String>,
    },
    /// Every rollout, running or finished.
    List,
    /// One rollout: steps, the live comparison and every decision.
    Status {
        /// The service.
        service: String,
    },
    /// The next step now (`--full`: straight to 100 % and promoted).
    Promote {
        /// The service.
        service: String,
        /// Skip every remaining step.
        #[arg(long)]
        full: bool,
    },
    /// Roll back at once: every request to the stable version.
    Abort {
        /// The service.
        service: String,
    },
    /// Stop deciding; the weights stay.
    Pause {
        /// The service.
        service: String,
    },
    /// Decide again, with a fresh window.
    Resume {
        /// The service.
        service: String,
    },
    /// Forget a finished rollout: traffic goes to every version again.
    Rm {
        /// The service.
        service: String,
        /// Remove even a running rollout.
        #[arg(long)]
        force: bool,
    },
}

/// `1500`, `1500ms`, `30s`, `2m`, `1h` as milliseconds.
fn parse_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: use a number with ms, s, m or h (e.g. 30s)"))?;
    let k = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{s:?}: the unit is one of ms, s, m, h")),
    };
    n.checked_mul(k).ok_or_else(|| format!("{s:?} is too long"))
}

/// `NAME=VALUE` as a pin of `kind`.
fn pin(kind: &str, v: &str) -> Result<Value> {
    let Some((name, value)) = v.split_once('=') else {
        bail!("--pin-{kind} {v:?}: use NAME=VALUE (e.g. x-canary=1)");
    };
    Ok(json!({ "kind": kind, "name": name, "value": value }))
}

fn window(w: &Value) -> String {
    let p99 = w["p99_ms"]
        .as_f64()
        .map_or_else(|| "-".to_string(), |p| format!("{p:.1}ms"));
    format!("{}/{} p99 {p99}", w["failures"], w["requests"])
}

fn list_table(v: &Value) -> Table {
    let mut t = Table::new(&[
        "SERVICE",
        "TO",
        "STRATEGY",
        "PHASE",
        "WEIGHT",
        "NEW (FAIL/REQ)",
        "STABLE (FAIL/REQ)",
        "STARTED",
    ]);
    let rows: Vec<&Value> = match v["rollouts"].as_array() {
        Some(a) => a.iter().collect(),
        None => vec![v],
    };
    for r in rows {
        let (spec, st) = (&r["spec"], &r["status"]);
        t.row(vec![
            cell(&spec["service"]),
            cell(&spec["to_version"]),
            cell(&spec["strategy"]),
            cell(&st["phase"]),
            format!("{}%", st["weight"]),
            window(&st["canary"]),
            window(&st["stable"]),
            time_ms(&st["started_ms"]),
        ]);
    }
    t
}

fn status_table(v: &Value) -> Table {
    let (spec, st) = (&v["spec"], &v["status"]);
    let mut t = Table::new(&[
        "AT",
        "ACTION",
        "WEIGHT",
        "NEW (FAIL/REQ)",
        "STABLE (FAIL/REQ)",
        "BY",
        "REASON",
    ]);
    t.caption(format!(
        "{} -> version {} ({}, steps {}): {} at {}%; now new {} · stable {}",
        cell(&spec["service"]),
        cell(&spec["to_version"]),
        cell(&spec["strategy"]),
        cell(&spec["steps"]),
        cell(&st["phase"]),
        st["weight"],
        window(&st["canary"]),
        window(&st["stable"]),
    ));
    for d in st["decisions"].as_array().into_iter().flatten() {
        t.row(vec![
            time_ms(&d["at_ms"]),
            cell(&d["action"]),
            format!("{}%", d["weight"]),
            window(&d["canary"]),
            window(&d["stable"]),
            cell(&d["by"]),
            cell(&d["reason"]),
        ]);
    }
    t
}

pub(crate) async fn run(a: RolloutArgs) -> Result<()> {
    let http = a.http.addr();
    let path = |s: &str, tail: &str| format!("/v1/rollouts/{}{tail}", enc(s));
    let (method, target, body, detail) = match a.cmd {
        RolloutCmd::Start {
            service,
            to_version,
            strategy,
            steps,
            interval,
            max_error_increase,
            max_p99_ratio,
            p99_slack,
            min_requests,
            no_auto_rollback,
            min_healthy,
            deadline,
            pin_header,
            pin_cookie,
        } => {
            let pin = match (pin_header, pin_cookie) {
                (Some(h), _) => Some(pin("header", &h)?),
                (_, Some(c)) => Some(pin("cookie", &c)?),
                _ => None,
            };
            let bluegreen = matches!(strategy, StrategyArg::Bluegreen);
            let body = json!({
                "service": service,
                "to_version": to_version,
                "strategy": if bluegreen { "bluegreen" } else { "canary" },
                "steps": if bluegreen { vec![] } else { steps },
                "interval_ms": interval,
                "analysis": {
                    "max_error_rate_increase": max_error_increase / 100.0,
                    "max_p99_ratio": max_p99_ratio,
                    "p99_slack_ms": p99_slack,
                    "min_requests": min_requests,
                },
                "auto_rollback": !no_auto_rollback,
                "min_healthy": min_healthy,
                "deadline_ms": deadline,
                "pin": pin,
            });
            ("POST", "/v1/rollouts".to_string(), Some(body), true)
        }
        RolloutCmd::List => ("GET", "/v1/rollouts".to_string(), None, false),
        RolloutCmd::Status { service } => ("GET", path(&service, ""), None, true),
        RolloutCmd::Promote { service, full } => (
            "POST",
            path(&service, "/promote"),
            Some(json!({ "full": full })),
            true,
        ),
        RolloutCmd::Abort { service } => ("POST", path(&service, "/abort"), None, true),
        RolloutCmd::Pause { service } => ("POST", path(&service, "/pause"), None, true),
        RolloutCmd::Resume { service } => ("POST", path(&service, "/resume"), None, true),
        RolloutCmd::Rm { service, force } => {
            let tail = if force { "?force=true" } else { "" };
            call(http, "DELETE", &path(&service, tail), None)
                .await?
                .json()?;
            println!("removed the rollout of {service}");
            return Ok(());
        }
    };
    // `min_healthy: null` means "the server's default": leave it out.
    let body = body.map(|mut b| {
        if let Some(o) = b.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        Bytes::from(b.to_string())
    });
    let v = call(http, method, &target, body).await?.json()?;
    a.out.print(&v, |v, _| {
        if detail {
            status_table(v)
        } else {
            list_table(v)
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations_and_pins_parse_or_say_what_to_fix() {
        assert_eq!(parse_ms("1m"), Ok(60_000));
        assert_eq!(parse_ms("250ms"), Ok(250));
        assert_eq!(parse_ms("90"), Ok(90));
        assert!(parse_ms("1 week").unwrap_err().contains("unit"));
        assert!(parse_ms("m").unwrap_err().contains("number"));
        assert_eq!(pin("header", "x-canary=1").unwrap()["name"], "x-canary");
        assert!(pin("cookie", "beta").is_err());
    }
}
