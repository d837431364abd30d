//! `meshwork token create | list | revoke`: the HTTP API's bearer tokens,
//! through a node's HTTP API (`--http`), as an administrator (the console
//! login from `MESHWORK_CONSOLE_USER`/`MESHWORK_CONSOLE_PASSWORD`, or an
//! `admin` token in `MESHWORK_TOKEN`).

use anyhow::Result;
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::coordcli::Http;
use crate::httpc::{call, enc};
use crate::output::{OutputArgs, Table, cell, time_ms};

/// `meshwork token`.
#[derive(Args)]
pub(crate) struct TokenArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: TokenCmd,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a token; it is printed once (only its hash is kept).
    Create {
        /// What it may do, repeatable: `admin`, or `AREA:read|write[:RESOURCE]`
        /// with AREA one of services, config, leases, locks, ids, gateway,
        /// queues, txn, traces, console (`services:write:orders`,
        /// `config:read:public`).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime: 30d, 12h, 15m, 90s (default: until revoked).
        #[arg(long)]
        ttl: Option<String>,
        /// Who or what it is for.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Every token (never their secrets).
    List,
    /// Revoke a token: it stops working on every node at once.
    Revoke {
        /// The token's id (`meshwork token list`).
        id: String,
    },
}

pub(crate) async fn run(a: TokenArgs) -> Result<()> {
    let http = a.http.addr();
    match a.cmd {
        TokenCmd::Create {
            scopes,
            ttl,
            description,
        } => {
            let body = json!({ "scopes": scopes, "ttl": ttl, "description": description });
            let v = call(
                http,
                "POST",
                "/v1/auth/tokens",
                Some(Bytes::from(body.to_string())),
            )
            .await?
            .json()?;
            a.out.print(&v, |v, _| {
                let mut t = Table::new(&["TOKEN", "ID", "SCOPES", "EXPIRES"]);
                t.row(vec![
                    cell(&v["token"]),
                    cell(&v["info"]["id"]),
                    cell(&v["info"]["scopes"]),
                    time_ms(&v["info"]["expires_ms"]),
                ]);
                t.caption("keep the token now: it is not shown again".to_string());
                t
            });
        }
        TokenCmd::List => {
            let v = call(http, "GET", "/v1/auth/tokens", None).await?.json()?;
            a.out.print(&v, |v, _| {
                let mut t = Table::new(&["ID", "SCOPES", "CREATED", "EXPIRES", "DESCRIPTION"]);
                for x in v["tokens"].as_array().into_iter().flatten() {
                    t.row(vec![
                        cell(&x["id"]),
                        cell(&x["scopes"]),
                        time_ms(&x["created_ms"]),
                        time_ms(&x["expires_ms"]),
                        cell(&x["description"]),
                    ]);
                }
                t
            });
        }
        TokenCmd::Revoke { id } => {
            let r = call(
                http,
                "DELETE",
                &format!("/v1/auth/tokens/{}", enc(&id)),
                None,
            )
            .await?;
            if r.status >= 400 {
                r.json()?;
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
