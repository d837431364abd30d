//! `meshwork snapshot save|restore`: backups in etcd's snapshot format, so
//! that they move between Meshwork and etcd both ways.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use meshwork_etcd::proto::etcdserverpb as pb;
use meshwork_etcd::snapshot::{self, SnapshotKind};
use serde_json::json;
use tokio_stream::StreamExt;

use crate::kv::{Conn, connect};

/// `meshwork snapshot`.
#[derive(Args)]
pub(crate) struct SnapshotArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: SnapshotCommand,
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Stream a snapshot from a node (Meshwork or etcd) into FILE, as
    /// `etcdctl snapshot save` does.
    Save {
        /// Where to write it (must not exist).
        file: PathBuf,
    },
    /// Create a new data directory from FILE: a snapshot from `etcdctl
    /// snapshot save` or `meshwork snapshot save` (against etcd or
    /// Meshwork), or a Meshwork database file. Then start a node on it.
    Restore {
        /// The snapshot.
        file: PathBuf,
        /// The new data directory (must not hold a store).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// Runs `meshwork snapshot ...`.
pub(crate) async fn run(a: SnapshotArgs) -> Result<()> {
    match a.cmd {
        SnapshotCommand::Save { file } => save(&a.conn, &file).await,
        SnapshotCommand::Restore { file, data_dir } => {
            let (f, d) = (file.clone(), data_dir.clone());
            let r = tokio::task::spawn_blocking(move || snapshot::restore(&f, &d))
                .await
                .context("the restore task failed")?
                .with_context(|| format!("restoring {}", file.display()))?;
            let kind = match r.kind {
                SnapshotKind::Etcd => "etcd",
                SnapshotKind::Meshwork => "meshwork",
            };
            if a.conn.json {
                println!(
                    "{}",
                    json!({
                        "format": kind,
                        "hash_checked": r.hash_checked,
                        "revision": r.imported.revision,
                        "compact_revision": r.imported.compact_revision,
                        "changes": r.imported.changes,
                        "leases": r.imported.leases,
                        "data_dir": data_dir,
                    })
                );
            } else {
                println!(
                    "restored {} snapshot {} into {}: revision {}, compacted at {}, {} key revisions, {} leases{}",
                    kind,
                    file.display(),
                    data_dir.display(),
                    r.imported.revision,
                    r.imported.compact_revision,
                    r.imported.changes,
                    r.imported.leases,
                    if r.hash_checked {
                        " (SHA-256 checked)"
                    } else {
                        " (no SHA-256 trailer to check)"
                    }
                );
            }
            Ok(())
        }
    }
}

async fn save(conn: &Conn, file: &Path) -> Result<()> {
    if file.exists() {
        bail!("{} exists: choose a new file", file.display());
    }
    let mut client = connect(conn).await?;
    let mut stream = client
        .maintenance
        .snapshot(pb::SnapshotRequest {})
        .await
        .context("starting the snapshot")?
        .into_inner();
    let part = file.with_extension("part");
    let result = async {
        let mut out =
            std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
        let mut revision = 0;
        let mut bytes = 0u64;
        while let Some(msg) = stream.next().await {
            let msg = msg.context("receiving the snapshot")?;
            if let Some(h) = &msg.header {
                revision = h.revision;
            }
            out.write_all(&msg.blob)?;
            bytes += msg.blob.len() as u64;
        }
        out.sync_all()?;
        std::fs::rename(&part, file)?;
        anyhow::Ok((revision, bytes))
    }
    .await;
    let (revision, bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    if conn.json {
        println!(
            "{}",
            json!({"file": file, "revision": revision, "size_bytes": bytes})
        );
    } else {
        println!(
            "saved snapshot at revision {revision} to {} ({bytes} bytes)",
            file.display()
        );
    }
    Ok(())
}
