//! `meshwork mq topic create|list|describe`, `mq pub`, `mq sub`, `mq dlq list|redrive`:
//! the message broker through a node's HTTP API (`--http`, default 127.0.0.1:7070).

use std::io::BufRead;

use anyhow::{Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::coordcli::Http;
use crate::httpc::{call, enc};
use crate::output::{OutputArgs, Table, cell, out, time_ms};

/// `meshwork mq`.
#[derive(Args)]
pub(crate) struct MqArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: MqCmd,
}

#[derive(Subcommand)]
enum MqCmd {
    /// Topics: create, list, describe.
    Topic {
        #[command(subcommand)]
        cmd: TopicCmd,
    },
    /// Publish a message (`-` publishes each line of stdin as one message).
    Pub {
        /// The topic.
        topic: String,
        /// The message body, or `-` for one message per line of stdin.
        message: String,
        /// Partitioning key (one key, one partition, in order).
        #[arg(long)]
        key: Option<String>,
        /// Tag groups can filter on.
        #[arg(long)]
        tag: Option<String>,
        /// A positive decimal id: a second publish within the dedup window is not written again.
        #[arg(long)]
        id: Option<String>,
        /// Deliver no earlier than this many milliseconds from now.
        #[arg(long)]
        delay_ms: Option<u64>,
        /// Priority 0 to 9.
        #[arg(long)]
        priority: Option<u8>,
        /// A header, `NAME=VALUE` (repeatable).
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
    },
    /// Consume with a group: print each message body on its own line, then ack it.
    Sub {
        /// The topic.
        topic: String,
        /// The consumer group (created when missing).
        #[arg(long)]
        group: String,
        /// Where a new group starts: earliest, latest, an offset, or an RFC 3339 time.
        #[arg(long, default_value = "latest")]
        from: String,
        /// Stop after this many messages (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Messages taken per request.
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Dead letters: list, redrive.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
}

#[derive(Subcommand)]
enum TopicCmd {
    /// Create a topic (a no-op when it exists with the same settings).
    Create {
        /// The topic.
        name: String,
        /// Partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Delete messages older than this many milliseconds (0 = keep) [default: 7 days].
        #[arg(long)]
        retention_ms: Option<u64>,
        /// Keep each partition below this many bytes (0 = no limit).
        #[arg(long)]
        retention_bytes: Option<u64>,
    },
    /// Topics and their sizes.
    List,
    /// A topic's partitions and its groups' progress.
    Describe {
        /// The topic.
        name: String,
    },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// A group's dead letters not yet redriven, oldest first.
    List {
        /// The topic.
        topic: String,
        /// The group.
        #[arg(long)]
        group: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Publish a group's dead letters to the topic again.
    Redrive {
        /// The topic.
        topic: String,
        /// The group.
        #[arg(long)]
        group: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
}

async fn req(http: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let body = body.map(|b| Bytes::from(b.to_string()));
    call(http, method, path, body).await?.json()
}

/// `--from` as a group's `start`.
fn start_of(from: &str) -> Result<Value> {
    Ok(match from {
        "earliest" | "latest" => json!(from),
        s if s.bytes().all(|b| b.is_ascii_digit()) => json!({ "offset": s.parse::<u64>()? }),
        s => match time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
            Ok(t) => json!({ "time": (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64 }),
            Err(_) => bail!(
                "--from {s:?}: give earliest, latest, an offset or an RFC 3339 time (2026-12-05T10:00:00Z)"
            ),
        },
    })
}

fn topic_path(topic: &str) -> String {
    format!("/v1/mq/topics/{}", enc(topic))
}

fn group_path(topic: &str, group: &str) -> String {
    format!("{}/groups/{}", topic_path(topic), enc(group))
}

fn messages_table(v: &Value, wide: bool) -> Table {
    let mut cols = vec!["PARTITION", "OFFSET", "PUBLISHED", "KEY", "TAG", "BODY"];
    if wide {
        cols.extend(["ID", "HEADERS"]);
    }
    let mut t = Table::new(&cols);
    for m in v["messages"].as_array().into_iter().flatten() {
        let body = m["body"].as_str().map_or_else(
            || format!("(base64) {}", cell(&m["body_base64"])),
            str::to_string,
        );
        let mut row = vec![
            cell(&m["partition"]),
            cell(&m["offset"]),
            time_ms(&m["publish_ms"]),
            cell(&m["key"]),
            cell(&m["tag"]),
            body,
        ];
        if wide {
            row.extend([cell(&m["id"]), m["headers"].to_string()]);
        }
        t.row(row);
    }
    t
}

pub(crate) async fn run(a: MqArgs) -> Result<()> {
    let http = a.http.addr();
    match a.cmd {
        MqCmd::Topic { cmd } => match cmd {
            TopicCmd::Create {
                name,
                partitions,
                retention_ms,
                retention_bytes,
            } => {
                let mut body = json!({ "partitions": partitions });
                if let Some(r) = retention_ms {
                    body["retention_ms"] = json!(r);
                }
                if let Some(r) = retention_bytes {
                    body["retention_bytes"] = json!(r);
                }
                let v = req(http, "PUT", &topic_path(&name), Some(body)).await?;
                a.out.print(&v, topic_table);
            }
            TopicCmd::List => {
                let v = req(http, "GET", "/v1/mq/topics", None).await?;
                a.out.print(&v, |v, wide| {
                    let mut cols = vec!["TOPIC", "PARTITIONS", "MESSAGES", "BYTES", "GROUPS"];
                    if wide {
                        cols.push("INTERNAL");
                    }
                    let mut t = Table::new(&cols);
                    for x in v["topics"].as_array().into_iter().flatten() {
                        if !wide && x["internal"] == true {
                            continue;
                        }
                        let parts = x["partitions"].as_array().cloned().unwrap_or_default();
                        let sum = |f: &str| {
                            parts
                                .iter()
                                .map(|p| p[f].as_u64().unwrap_or(0))
                                .sum::<u64>()
                        };
                        let mut row = vec![
                            cell(&x["name"]),
                            parts.len().to_string(),
                            (sum("end") - sum("start")).to_string(),
                            sum("bytes").to_string(),
                            x["groups"]
                                .as_array()
                                .map(|g| g.iter().map(cell).collect::<Vec<_>>().join(","))
                                .unwrap_or_default(),
                        ];
                        if wide {
                            row.push(cell(&x["internal"]));
                        }
                        t.row(row);
                    }
                    t
                });
            }
            TopicCmd::Describe { name } => {
                let mut v = req(http, "GET", &topic_path(&name), None).await?;
                let mut groups = Vec::new();
                for g in v["groups"].as_array().cloned().unwrap_or_default() {
                    let g = g.as_str().unwrap_or_default().to_string();
                    groups.push(req(http, "GET", &group_path(&name, &g), None).await?);
                }
                v["group_details"] = Value::Array(groups);
                a.out.print(&v, |v, _| {
                    let mut t = topic_table(v, false);
                    for g in v["group_details"].as_array().into_iter().flatten() {
                        t.caption(format!(
                            "group {}: backlog {}, unacked {}, oldest unfinished {}, dead letters {}",
                            cell(&g["group"]),
                            cell(&g["backlog"]),
                            cell(&g["unacked"]),
                            time_ms(&g["oldest_unfinished_ms"]),
                            cell(&g["dead_letters"])
                        ));
                    }
                    t
                });
            }
        },
        MqCmd::Pub {
            topic,
            message,
            key,
            tag,
            id,
            delay_ms,
            priority,
            headers,
        } => {
            let mut hdrs = serde_json::Map::new();
            for h in &headers {
                let Some((k, v)) = h.split_once('=') else {
                    bail!("--header {h:?}: give NAME=VALUE");
                };
                hdrs.insert(k.to_string(), json!(v));
            }
            let one = |body: &str| {
                let mut m = json!({ "body": body });
                if let Some(k) = &key {
                    m["key"] = json!(k);
                }
                if let Some(t) = &tag {
                    m["tag"] = json!(t);
                }
                if let Some(i) = &id {
                    m["id"] = json!(i);
                }
                if let Some(d) = delay_ms {
                    m["delay_ms"] = json!(d);
                }
                if let Some(p) = priority {
                    m["priority"] = json!(p);
                }
                if !hdrs.is_empty() {
                    m["headers"] = Value::Object(hdrs.clone());
                }
                m
            };
            let path = format!("{}/messages", topic_path(&topic));
            if message == "-" {
                // One message per line, in batches of up to 1000.
                let mut batch = Vec::new();
                let mut sent = 0usize;
                for line in std::io::stdin().lock().lines() {
                    batch.push(one(&line?));
                    if batch.len() == 1000 {
                        req(
                            http,
                            "POST",
                            &path,
                            Some(json!({ "messages": std::mem::take(&mut batch) })),
                        )
                        .await?;
                        sent += 1000;
                    }
                }
                if !batch.is_empty() {
                    sent += batch.len();
                    req(http, "POST", &path, Some(json!({ "messages": batch }))).await?;
                }
                eprintln!("published {sent} messages");
            } else {
                let v = req(
                    http,
                    "POST",
                    &path,
                    Some(json!({ "messages": [one(&message)] })),
                )
                .await?;
                a.out.print(&v, |v, _| {
                    let mut t = Table::new(&["PARTITION", "OFFSET", "DUPLICATE"]);
                    for r in v["results"].as_array().into_iter().flatten() {
                        t.row(vec![
                            cell(&r["partition"]),
                            cell(&r["offset"]),
                            cell(&r["duplicate"]),
                        ]);
                    }
                    t
                });
            }
        }
        MqCmd::Sub {
            topic,
            group,
            from,
            count,
            batch,
        } => {
            let gp = group_path(&topic, &group);
            let start = start_of(&from)?;
            let r = call(http, "GET", &gp, None).await?;
            if r.status == 404 {
                req(http, "PUT", &gp, Some(json!({ "start": start }))).await?;
            } else {
                r.json()?;
                if from != "latest" {
                    eprintln!(
                        "group {group:?} exists: it continues where it is (--from applies to a new group)"
                    );
                }
            }
            let mut left = count.unwrap_or(u64::MAX);
            while left > 0 {
                let max = batch
                    .clamp(1, 1000)
                    .min(usize::try_from(left).unwrap_or(1000));
                let v = req(
                    http,
                    "POST",
                    &format!("{gp}/fetch"),
                    Some(json!({ "max": max, "wait_ms": 10_000 })),
                )
                .await?;
                let msgs = v["messages"].as_array().cloned().unwrap_or_default();
                if msgs.is_empty() {
                    continue;
                }
                let mut text = String::new();
                for m in &msgs {
                    match m["body"].as_str() {
                        Some(b) => text.push_str(b),
                        None => text.push_str(&cell(&m["body_base64"])),
                    }
                    text.push('\n');
                }
                out(&text);
                let items: Vec<Value> = msgs
                    .iter()
                    .map(|m| json!({ "partition": m["partition"], "offset": m["offset"] }))
                    .collect();
                req(
                    http,
                    "POST",
                    &format!("{gp}/ack"),
                    Some(json!({ "messages": items })),
                )
                .await?;
                left = left.saturating_sub(msgs.len() as u64);
            }
        }
        MqCmd::Dlq { cmd } => match cmd {
            DlqCmd::List {
                topic,
                group,
                limit,
            } => {
                let v = req(
                    http,
                    "GET",
                    &format!("{}/dlq?limit={limit}", group_path(&topic, &group)),
                    None,
                )
                .await?;
                a.out.print(&v, messages_table);
            }
            DlqCmd::Redrive { topic, group, max } => {
                let v = req(
                    http,
                    "POST",
                    &format!("{}/dlq/redrive", group_path(&topic, &group)),
                    Some(json!({ "max": max })),
                )
                .await?;
                a.out.print(&v, |v, _| {
                    let mut t = Table::new(&["MOVED"]);
                    t.row(vec![cell(&v["moved"])]);
                    t
                });
            }
        },
    }
    Ok(())
}

fn topic_table(v: &Value, _wide: bool) -> Table {
    let mut t = Table::new(&["PARTITION", "START", "END", "BYTES"]);
    for (i, p) in v["partitions"].as_array().into_iter().flatten().enumerate() {
        t.row(vec![
            i.to_string(),
            cell(&p["start"]),
            cell(&p["end"]),
            cell(&p["bytes"]),
        ]);
    }
    t.caption(format!(
        "topic {} ({} partitions)",
        cell(&v["name"]),
        v["partitions"].as_array().map_or(0, Vec::len)
    ));
    t
}
