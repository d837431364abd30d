//! `meshwork user add | list | passwd | scopes | rm`: the console's users
//! kept in the store, through a node's HTTP API (`--http`), as an
//! administrator (like `meshwork token`). Passwords are read from standard
//! input, never from the command line (where `ps` would show them).

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::coordcli::Http;
use crate::httpc::{call, enc};
use crate::output::{OutputArgs, Table, cell, time_ms};

/// `meshwork user`.
#[derive(Args)]
pub(crate) struct UserArgs {
    #[command(flatten)]
    http: Http,
    #[command(flatten)]
    out: OutputArgs,
    #[command(subcommand)]
    cmd: UserCmd,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user; its password is read from standard input (one line).
    Add {
        /// The name it signs in with.
        name: String,
        /// What it may do, repeatable: `admin`, or `AREA:read|write[:RESOURCE]`
        /// (as for tokens: `config:write:public`, `services:read`).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// Every user (never a password or its hash).
    List,
    /// Give a user a new password, read from standard input; its sessions end.
    Passwd {
        /// The user.
        name: String,
    },
    /// Replace a user's scopes; its sessions end.
    Scopes {
        /// The user.
        name: String,
        /// Its new scopes, repeatable.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// Remove a user: its sessions end on every node.
    Rm {
        /// The user.
        name: String,
    },
}

/// One line of standard input, without its line end.
fn password_from_stdin() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        bail!("no password on standard input: echo 'a long passphrase' | meshwork user ...");
    }
    Ok(p)
}

fn user_table(v: &serde_json::Value) -> Table {
    let mut t = Table::new(&["NAME", "SCOPES", "CREATED", "CHANGED"]);
    let rows: Vec<&serde_json::Value> = match v["users"].as_array() {
        Some(a) => a.iter().collect(),
        None => vec![v],
    };
    for x in rows {
        t.row(vec![
            cell(&x["name"]),
            cell(&x["scopes"]),
            time_ms(&x["created_ms"]),
            time_ms(&x["updated_ms"]),
        ]);
    }
    t
}

pub(crate) async fn run(a: UserArgs) -> Result<()> {
    let http = a.http.addr();
    let path = |name: &str| format!("/v1/auth/users/{}", enc(name));
    // Every command but rm sends one JSON body (or none) and prints users.
    let (method, target, body) = match a.cmd {
        UserCmd::Add { name, scopes } => (
            "POST",
            "/v1/auth/users".to_string(),
            Some(json!({ "name": name, "password": password_from_stdin()?, "scopes": scopes })),
        ),
        UserCmd::List => ("GET", "/v1/auth/users".to_string(), None),
        UserCmd::Passwd { name } => (
            "PUT",
            path(&name),
            Some(json!({ "password": password_from_stdin()? })),
        ),
        UserCmd::Scopes { name, scopes } => ("PUT", path(&name), Some(json!({ "scopes": scopes }))),
        UserCmd::Rm { name } => {
            let r = call(http, "DELETE", &path(&name), None).await?;
            if r.status >= 400 {
                r.json()?;
            }
            println!("removed {name}");
            return Ok(());
        }
    };
    let v = call(
        http,
        method,
        &target,
        body.map(|b| Bytes::from(b.to_string())),
    )
    .await?
    .json()?;
    a.out.print(&v, |v, _| user_table(v));
    Ok(())
}
