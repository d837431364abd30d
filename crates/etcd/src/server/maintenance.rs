//! The Maintenance service: Status, Snapshot, Alarm, Defragment.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::Stream;
use meshwork_store::{Alarm, AlarmMember, StoreError};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::convert::status;
use crate::proto::etcdserverpb as pb;

pub(crate) struct MaintenanceService(pub(crate) Ctx);

/// Snapshot chunk size, as etcd sends.
const SNAPSHOT_CHUNK_BYTES: usize = 32 * 1024;

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        let c = self.0.caller(&req)?;
        let r = req.into_inner();
        // Listing is open; raising or clearing an alarm is for administrators.
        if r.action != pb::alarm_request::AlarmAction::Get as i32 {
            c.admin()?;
        }
        let kind = match pb::AlarmType::try_from(r.alarm) {
            Ok(pb::AlarmType::None) => None,
            Ok(pb::AlarmType::Nospace) => Some(Alarm::NoSpace),
            Ok(pb::AlarmType::Corrupt) => Some(Alarm::Corrupt),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "etcdserver: invalid alarm type {}",
                    r.alarm
                )));
            }
        };
        let out = |a: AlarmMember| pb::AlarmMember {
            member_id: a.member_id,
            alarm: match a.alarm {
                Alarm::NoSpace => pb::AlarmType::Nospace as i32,
                Alarm::Corrupt => pb::AlarmType::Corrupt as i32,
            },
        };
        let store = &self.0.store;
        // As etcd's applier: GET lists (one type, or all for NONE);
        // ACTIVATE answers the alarm, DEACTIVATE the one it cleared (or
        // nothing if it was not raised).
        let alarms = match pb::alarm_request::AlarmAction::try_from(r.action) {
            Ok(pb::alarm_request::AlarmAction::Get) => store
                .status()
                .alarms
                .into_iter()
                .filter(|a| kind.is_none_or(|k| a.alarm == k))
                .map(out)
                .collect(),
            Ok(pb::alarm_request::AlarmAction::Activate) => match kind {
                None => Vec::new(),
                Some(k) => {
                    store.activate_alarm(r.member_id, k).map_err(status)?;
                    vec![out(AlarmMember {
                        member_id: r.member_id,
                        alarm: k,
                    })]
                }
            },
            Ok(pb::alarm_request::AlarmAction::Deactivate) => match kind {
                None => Vec::new(),
                Some(k) => {
                    let was = store
                        .status()
                        .alarms
                        .iter()
                        .any(|a| a.member_id == r.member_id && a.alarm == k);
                    store.deactivate_alarm(r.member_id, k).map_err(status)?;
                    if was {
                        vec![out(AlarmMember {
                            member_id: r.member_id,
                            alarm: k,
                        })]
                    } else {
                        Vec::new()
                    }
                }
            },
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "etcdserver: invalid alarm action {}",
                    r.action
                )));
            }
        };
        Ok(Response::new(pb::AlarmResponse {
            header: self.0.header.at(store.revision()),
            alarms,
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let st = self.0.store.status();
        let errors = st
            .alarms
            .iter()
            .map(|a| {
                let kind = match a.alarm {
                    Alarm::NoSpace => "NOSPACE",
                    Alarm::Corrupt => "CORRUPT",
                };
                format!("memberID:{} alarm:{kind} ", a.member_id)
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            header: self.0.header.at(st.revision),
            version: self.0.info.version.clone(),
            db_size: st.db_size_bytes as i64,
            leader: self.0.info.member_id,
            raft_index: st.revision as u64,
            raft_term: self.0.header.raft_term,
            raft_applied_index: st.revision as u64,
            errors,
            db_size_in_use: st.db_size_in_use_bytes as i64,
            is_learner: false,
        }))
    }

    async fn defragment(
        &self,
        req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.0.caller(&req)?.admin()?;
        let store = self.0.store.clone();
        tokio::task::spawn_blocking(move || store.defragment())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::DefragmentResponse {
            header: self.0.header.at(self.0.store.revision()),
        }))
    }

    async fn hash(
        &self,
        req: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        self.0.caller(&req)?.admin()?;
        let store = self.0.store.clone();
        let (revision, hash) = tokio::task::spawn_blocking(move || {
            let export = store.export().map_err(status)?;
            let h = crate::snapshot::hash(&export)
                .map_err(|e| Status::internal(format!("hashing the store: {e}")))?;
            Ok::<_, Status>((export.revision(), h))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::HashResponse {
            header: self.0.header.at(revision),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        self.0.caller(&req)?.admin()?;
        let wanted = req.into_inner().revision;
        let store = self.0.store.clone();
        let (current, compact, hash_revision, hash) = tokio::task::spawn_blocking(move || {
            let export = store.export().map_err(status)?;
            let (current, compact) = (export.revision(), export.compact_revision());
            // etcd's checks, in its order (mvcc.HashByRev).
            if wanted > 0 && wanted <= compact {
                return Err(status(StoreError::Compacted {
                    compact_revision: compact,
                }));
            }
            if wanted > current {
                return Err(status(StoreError::FutureRevision));
            }
            let at = if wanted > 0 { wanted } else { current };
            let h = crate::snapshot::hash_kv(&export, at)
                .map_err(|e| Status::internal(format!("hashing the store: {e}")))?;
            Ok((current, compact, at, h))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::HashKvResponse {
            header: self.0.header.at(current),
            hash,
            compact_revision: compact,
            hash_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.0.caller(&req)?.admin()?;
        let store = self.0.store.clone();
        // etcd's own format (a bbolt database in etcd's layout), so that
        // etcdctl and a real etcd can read what we send.
        let snap = tokio::task::spawn_blocking(move || {
            static SNAPSHOTS: AtomicU64 = AtomicU64::new(0);
            let export = store.export().map_err(status)?;
            let path = store.data_dir().join(format!(
                "snapshot-{}-{}-{}.bbolt.tmp",
                export.revision(),
                std::process::id(),
                SNAPSHOTS.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_file(&path);
            match crate::snapshot::write(&export, &path) {
                Ok(w) => Ok((path, w.revision)),
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    Err(Status::internal(format!("writing the snapshot: {e}")))
                }
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let snap = meshwork_store::Snapshot {
            path: snap.0,
            revision: snap.1,
        };
        let header = self.0.header.at(snap.revision);
        let version = self.0.info.version.clone();
        let mut file = tokio::fs::File::open(&snap.path)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        // etcd clients expect the blob padded to 512 bytes, followed by its SHA-256.
        let padded = size.div_ceil(512) * 512;
        let total = padded + 32;
        let path = snap.path.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::SnapshotResponse, Status>>(4);
        tokio::spawn(async move {
            let mut hasher = Sha256::new();
            let mut sent: u64 = 0;
            let mut first = true;
            let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            loop {
                let n = match file.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("reading snapshot: {e}"))))
                            .await;
                        break;
                    }
                };
                let mut chunk = buf[..n].to_vec();
                if n == 0 {
                    // End of file: padding, then the checksum.
                    chunk = vec![0u8; (padded - sent) as usize];
                }
                if !chunk.is_empty() {
                    hasher.update(&chunk);
                    sent += chunk.len() as u64;
                    let msg = pb::SnapshotResponse {
                        header: if first { header } else { None },
                        remaining_bytes: total - sent,
                        blob: chunk.into(),
                        version: version.clone(),
                    };
                    first = false;
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
                if n == 0 {
                    let sum = hasher.finalize().to_vec();
                    let msg = pb::SnapshotResponse {
                        header: None,
                        remaining_bytes: 0,
                        blob: sum.into(),
                        version: version.clone(),
                    };
                    let _ = tx.send(Ok(msg)).await;
                    break;
                }
            }
            let _ = tokio::fs::remove_file(&path).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        self.0.caller(&req)?.admin()?;
        // As a single-member etcd: moving leadership to itself is done at
        // once; to any other id the transfer never completes.
        if req.into_inner().target_id == self.0.info.member_id {
            return Ok(Response::new(pb::MoveLeaderResponse {
                header: self.0.header.at(self.0.store.revision()),
            }));
        }
        Err(Status::deadline_exceeded(
            "etcdserver: request timed out, leader transfer took too long",
        ))
    }
}
