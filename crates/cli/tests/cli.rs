//! The binary as users and scripts drive it: config precedence (file < env < flag),
//! printed addresses, health endpoints, `meshwork kv` / `status`, graceful SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

fn kv(ep: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(common::bin())
        .args(["kv", "--endpoints", ep])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kv_commands_status_health_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = common::start(dir.path(), &[], &[]);
    assert_eq!(common::http_get(&s.http, "/healthz").unwrap().0, 200);
    let (code, metrics) = common::http_get(&s.http, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("meshwork_store_keys"));

    let (ok, out, _) = kv(&s.etcd, &["put", "greeting", "hello"]);
    assert!(ok);
    assert!(out.contains("revision 2"), "{out}");
    kv(&s.etcd, &["put", "greeting2", "world"]);
    let (_, out, _) = kv(&s.etcd, &["get", "greeting", "--prefix"]);
    assert_eq!(out, "greeting\nhello\ngreeting2\nworld\n");
    let (_, out, _) = kv(&s.etcd, &["--json", "get", "greeting"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["kvs"][0]["value"], "hello");
    assert_eq!(v["kvs"][0]["mod_revision"], 2);
    let (_, out, _) = kv(
        &s.etcd,
        &[
            "watch", "greeting", "--rev", "2", "--count", "2", "--prefix",
        ],
    );
    assert_eq!(out, "PUT\ngreeting\nhello\nPUT\ngreeting2\nworld\n");
    let (_, out, _) = kv(&s.etcd, &["del", "greeting", "--prefix"]);
    assert_eq!(out.trim(), "2");
    let st = Command::new(common::bin())
        .args(["status", "--json", "--endpoints", &s.etcd])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["revision"], 4);
    // Bad input: a clear error and a non-zero exit.
    let (ok, _, err) = kv(&s.etcd, &["put", "k", "v", "--lease", "zz"]);
    assert!(!ok);
    assert!(err.contains("lease \"zz\""), "{err}");

    assert_eq!(s.terminate(), Some(0), "SIGTERM exits 0");
    // Data survived the clean shutdown.
    let s2 = common::start(dir.path(), &[], &[]);
    let (_, out, _) = kv(&s2.etcd, &["--json", "get", "x"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["revision"], 4);
}

#[test]
fn config_file_env_and_flags_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("meshwork.toml");
    std::fs::write(
        &cfg,
        "[server]\nname = \"from-file\"\n[store]\nmax_txn_ops = 3\nmax_key_bytes = 10\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let cfg_s = cfg.to_str().unwrap();
    // The env var overrides the file's name; the flag overrides the env's.
    let s = common::start(
        &data,
        &["--config", cfg_s, "--name", "from-flag"],
        &[("MESHWORK_NAME", "from-env")],
    );
    let st = Command::new(common::bin())
        .args(["status", "--json", "--endpoints", &s.etcd])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["members"][0]["name"], "from-flag");
    drop(s);
    let s = common::start(
        &data,
        &["--config", cfg_s],
        &[("MESHWORK_NAME", "from-env")],
    );
    let st = Command::new(common::bin())
        .args(["status", "--json", "--endpoints", &s.etcd])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["members"][0]["name"], "from-env");
    // The file's store limit is in force.
    let (ok, _, err) = kv(&s.etcd, &["put", "a-key-longer-than-ten", "v"]);
    assert!(!ok);
    assert!(err.contains("key is too large"), "{err}");
    drop(s);
    // A bad config is refused with a message naming the field.
    std::fs::write(&cfg, "[store]\nmax_txn_ops = 0\n").unwrap();
    let out = Command::new(common::bin())
        .args(["server", "--config", cfg_s, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.max_txn_ops"));
    std::fs::write(&cfg, "[store]\nmax_txn_opz = 1\n").unwrap();
    let out = Command::new(common::bin())
        .args(["server", "--config", cfg_s, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_txn_opz"));
}
