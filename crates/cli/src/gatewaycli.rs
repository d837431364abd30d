//! `meshwork gateway apply | routes | explain`: the gateway's routes through a
//! node's HTTP API (`--http`, default 127.0.0.1:7070).

use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};

use crate::coordcli::Http;
use crate::httpc::{call, call_with_headers, enc};
use crate::output::{OutputArgs, Table, cell, print_json};

/// `meshwork gateway`.
#[derive(Args)]
pub(crate) struct GatewayArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: GatewayCmd,
}

#[derive(Subcommand)]
enum GatewayCmd {
    /// Validate a routes file and publish it to the configuration center; every
    /// gateway node applies it within a second (an invalid set changes nothing).
    Apply {
        /// The routes file (TOML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Publish only if the published version is still this one.
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// The routes in force on the node, in matching order, with live counters.
    Routes,
    /// Which route matches a URL, and why the ones before it did not.
    Explain {
        /// The URL, e.g. http://shop.test/api/orders/7
        url: String,
        /// The method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// A header to match on, `Name: value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
}

pub(crate) async fn run(a: GatewayArgs) -> Result<()> {
    let http = a.http.addr();
    match a.cmd {
        GatewayCmd::Apply { file, if_version } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut path = "/v1/gateway/routes".to_string();
            if let Some(v) = if_version {
                path.push_str(&format!("?if_version={v}"));
            }
            let v = call(http, "PUT", &path, Some(Bytes::from(text)))
                .await?
                .json()?;
            println!(
                "routes version {} ({})",
                v["version"],
                if v["changed"].as_bool() == Some(true) {
                    "published"
                } else {
                    "unchanged"
                }
            );
        }
        GatewayCmd::Routes => {
            let v = call(http, "GET", "/gateway/routes", None).await?.json()?;
            a.out.print(&v, |v, wide| {
                let mut cols = vec![
                    "PRIORITY", "NAME", "ACTION", "REQUESTS", "5XX", "P99 MS", "ACTIVE",
                ];
                if wide {
                    cols.extend(["4XX", "RATE LIMITED", "CLIENT FAULTS", "BREAKERS"]);
                }
                let mut t = Table::new(&cols);
                for r in v["routes"].as_array().into_iter().flatten() {
                    let c = &r["counters"];
                    let p99 = c["p99_ms"]
                        .as_f64()
                        .map_or("-".to_string(), |p| format!("{p:.1}"));
                    let mut row = vec![
                        cell(&r["priority"]),
                        cell(&r["name"]),
                        cell(&r["action"]),
                        cell(&c["requests"]),
                        cell(&c["status_classes"][4]),
                        p99,
                        cell(&c["active"]),
                    ];
                    if wide {
                        let breakers = r["breakers"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|b| format!("{}={}", cell(&b[0]), cell(&b[1])))
                            .collect::<Vec<_>>()
                            .join(",");
                        row.extend([
                            cell(&c["status_classes"][3]),
                            cell(&c["rate_limited"]),
                            cell(&c["client_faults"]),
                            if breakers.is_empty() {
                                "-".to_string()
                            } else {
                                breakers
                            },
                        ]);
                    }
                    t.row(row);
                }
                t.caption(format!("routes version {}", cell(&v["version"])));
                t
            });
        }
        GatewayCmd::Explain {
            url,
            method,
            headers,
        } => {
            let path = format!("/gateway/explain?url={}&method={}", enc(&url), enc(&method));
            let mut extra = Vec::new();
            for h in &headers {
                let (name, value) = h
                    .split_once(':')
                    .with_context(|| format!("--header {h:?}: expected `Name: value`"))?;
                extra.push((
                    format!("x-explain-{}", name.trim()),
                    value.trim().to_string(),
                ));
            }
            let v = call_with_headers(http, "GET", &path, None, &extra)
                .await?
                .json()?;
            print_json(&v);
        }
    }
    Ok(())
}
