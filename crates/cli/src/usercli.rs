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
    let v = match a.cmd {
        UserCmd::Add { name, scopes } => {
            let body =
                json!({ "name": name, "password": password_from_stdin()?, "scopes": scopes });
            call(
                http,
                "POST",
                "/v1/auth/users",
                Some(Bytes::from(body.to_string())),
            )
            .await?
            .json()?
        }
        UserCmd::List => call(http, "GET", "/v1/auth/users", None).await?.json()?,
        UserCmd::Passwd { name } => {
            let body = json!({ "password": password_from_stdin()? });
            call(
                http,
                "PUT",
                &path(&name),
                Some(Bytes::from(body.to_string())),
            )
            .await?
            .json()?
        }
        UserCmd::Scopes { name, scopes } => {
            let body = json!({ "scopes": scopes });
            call(
                http,
                "PUT",
                &path(&name),
                Some(Bytes::from(body.to_string())),
            )
            .await?
            .json()?
        }
        UserCmd::Rm { name } => {
            let r = call(http, "DELETE", &path(&name), None).await?;
            if r.status >= 400 {
                r.json()?;
            }
            println!("removed {name}");
            return Ok(());
        }
    };
    a.out.print(&v, |v, _| user_table(v));
    Ok(())
}
