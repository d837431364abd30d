//! `meshwork txn start | list | show | abort | retry`: distributed
//! transactions through a node's HTTP API (`--http`, default 127.0.0.1:7070).

use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::coordcli::Http;
use crate::httpc::{call, enc};
use crate::output::{OutputArgs, Table, cell, time_ms};

/// `meshwork txn`.
#[derive(Args)]
pub(crate) struct TxnArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: TxnCmd,
}

#[derive(Subcommand)]
enum TxnCmd {
    /// Start a transaction from a definition file (JSON: mode, branches, ...).
    Start {
        /// The definition.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Its id (makes the start idempotent); generated when absent.
        #[arg(long)]
        id: Option<String>,
    },
    /// Transactions, newest first.
    List {
        /// Only this status (running, committing, aborting, committed, aborted).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One transaction: its branches and timeline.
    Show {
        /// The transaction id.
        id: String,
    },
    /// Abort a transaction that has not decided to commit.
    Abort {
        /// The transaction id.
        id: String,
        /// Why, for the record.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Retry its waiting calls now (and clear the stuck flags).
    Retry {
        /// The transaction id.
        id: String,
    },
}

pub(crate) async fn run(a: TxnArgs) -> Result<()> {
    let http = a.http.addr();
    match a.cmd {
        TxnCmd::Start { file, id } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let spec: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let mut body = json!({ "spec": spec });
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            let v = call(http, "POST", "/v1/txn", Some(Bytes::from(body.to_string())))
                .await?
                .json()?;
            a.out.print(&v, record_table);
        }
        TxnCmd::List { status, limit } => {
            let mut path = format!("/v1/txn?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", enc(&s)));
            }
            let v = call(http, "GET", &path, None).await?.json()?;
            a.out.print(&v, |v, wide| {
                let mut cols = vec!["ID", "MODE", "STATUS", "CREATED", "BRANCHES", "STUCK"];
                if wide {
                    cols.extend(["COORDINATOR", "REASON"]);
                }
                let mut t = Table::new(&cols);
                for x in v["transactions"].as_array().into_iter().flatten() {
                    let mut row = vec![
                        cell(&x["id"]),
                        cell(&x["mode"]),
                        cell(&x["status"]),
                        time_ms(&x["created_ms"]),
                        cell(&x["branches"]),
                        if x["stuck"].as_bool() == Some(true) {
                            "yes".to_owned()
                        } else {
                            "-".to_owned()
                        },
                    ];
                    if wide {
                        row.extend([cell(&x["coordinator"]), cell(&x["reason"])]);
                    }
                    t.row(row);
                }
                t.caption(format!("{} transactions", cell(&v["total"])));
                t
            });
        }
        TxnCmd::Show { id } => {
            let v = call(http, "GET", &format!("/v1/txn/{}", enc(&id)), None)
                .await?
                .json()?;
            a.out.print(&v, record_table);
        }
        TxnCmd::Abort { id, reason } => {
            let body = json!({ "reason": reason.unwrap_or_else(|| "aborted with meshwork txn abort".into()) });
            let v = call(
                http,
                "POST",
                &format!("/v1/txn/{}/abort", enc(&id)),
                Some(Bytes::from(body.to_string())),
            )
            .await?
            .json()?;
            a.out.print(&v, record_table);
        }
        TxnCmd::Retry { id } => {
            let v = call(http, "POST", &format!("/v1/txn/{}/retry", enc(&id)), None)
                .await?
                .json()?;
            a.out.print(&v, record_table);
        }
    }
    Ok(())
}

/// A transaction record as a table of its branches, the timeline with `wide`.
fn record_table(v: &Value, wide: bool) -> Table {
    let mut t = Table::new(&[
        "BRANCH",
        "SERVICE",
        "STAGE",
        "PHASE",
        "CALL",
        "SENT",
        "LAST ERROR",
    ]);
    let specs = v["spec"]["branches"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (i, b) in v["branches"].as_array().into_iter().flatten().enumerate() {
        let s = specs.get(i).cloned().unwrap_or(Value::Null);
        t.row(vec![
            cell(&s["name"]),
            cell(&s["service"]),
            cell(&s["stage"]),
            cell(&b["phase"]),
            format!(
                "{}{}",
                cell(&b["call"]["state"]),
                if b["stuck"].as_bool() == Some(true) {
                    " (stuck)"
                } else {
                    ""
                }
            ),
            cell(&b["sent"]),
            cell(&b["last_error"]),
        ]);
    }
    let mut caption = format!(
        "{} {} {}",
        cell(&v["spec"]["mode"]),
        cell(&v["id"]),
        cell(&v["status"])
    );
    if let Some(r) = v["reason"].as_str() {
        caption.push_str(&format!(": {r}"));
    }
    if wide {
        for h in v["history"].as_array().into_iter().flatten() {
            let branch = h["branch"]
                .as_u64()
                .and_then(|i| specs.get(i as usize))
                .map_or(String::new(), |s| format!(" {}", cell(&s["name"])));
            let phase = h["phase"]
                .as_str()
                .map_or(String::new(), |p| format!(" {p}"));
            let attempt = h["attempt"]
                .as_u64()
                .map_or(String::new(), |a| format!(" #{a}"));
            caption.push_str(&format!(
                "\n  {}{branch}{phase}{attempt}: {}",
                time_ms(&h["at"]),
                cell(&h["what"])
            ));
        }
    }
    t.caption(caption);
    t
}
