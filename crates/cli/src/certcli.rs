//! `meshwork cert init | issue`: a local certificate authority and
//! certificates signed by it, for development and small deployments (what
//! `meshwork up --tls` uses). Keys are written readable by their owner only.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};

/// `meshwork cert`.
#[derive(Args)]
pub(crate) struct CertArgs {
    #[command(subcommand)]
    cmd: CertCmd,
}

#[derive(Subcommand)]
enum CertCmd {
    /// Make a certificate authority: DIR/ca.pem and DIR/ca-key.pem.
    Init {
        /// Where to write it.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Years it is valid.
        #[arg(long, default_value_t = 10)]
        years: u32,
    },
    /// Make a certificate signed by DIR's authority: DIR/NAME.pem and DIR/NAME-key.pem.
    Issue {
        /// Where the authority is, and where to write.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Its name (the certificate's common name: a node, a service, a user).
        #[arg(long)]
        name: String,
        /// Host names and IP addresses it serves (repeatable) [default: localhost, 127.0.0.1, ::1].
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// A client certificate only (no server use): the common name is the
        /// identity mutual TLS sees.
        #[arg(long)]
        client: bool,
        /// Days it is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub(crate) fn run(a: CertArgs) -> Result<()> {
    match a.cmd {
        CertCmd::Init { dir, years } => {
            init(&dir, years)?;
            println!("wrote {0}/ca.pem and {0}/ca-key.pem", dir.display());
        }
        CertCmd::Issue {
            dir,
            name,
            hosts,
            client,
            days,
        } => {
            issue(&dir, &name, &hosts, client, days)?;
            println!("wrote {0}/{name}.pem and {0}/{name}-key.pem", dir.display());
        }
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    meshwork_tls::identity::write_private(path, text)
        .with_context(|| format!("writing {}", path.display()))
}

fn days_from_now(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    // A minute back: a peer whose clock is a little behind accepts it at once.
    (
        now - time::Duration::minutes(1),
        now + time::Duration::days(i64::from(days)),
    )
}

/// Writes a new authority into `dir` (refusing to overwrite one).
pub(crate) fn init(dir: &Path, years: u32) -> Result<()> {
    meshwork_tls::identity::Authority::create(dir, years)?;
    Ok(())
}

/// Writes `name`'s certificate and key, signed by the authority in `dir`.
pub(crate) fn issue(
    dir: &Path,
    name: &str,
    hosts: &[String],
    client: bool,
    days: u32,
) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("--name {name:?}: use letters, digits, '-', '_' and '.'");
    }
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| {
            format!(
                "reading {} (make an authority first: meshwork cert init --dir {})",
                dir.join(f).display(),
                dir.display()
            )
        })
    };
    let ca_key = KeyPair::from_pem(&read("ca-key.pem")?).context("reading ca-key.pem")?;
    let ca = CertificateParams::from_ca_cert_pem(&read("ca.pem")?)
        .context("reading ca.pem")?
        .self_signed(&ca_key)
        .context("loading the authority")?;
    let key = KeyPair::generate().context("generating the key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let defaults = ["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let hosts = if hosts.is_empty() && !client {
        &defaults[..]
    } else {
        hosts
    };
    for h in hosts {
        params.subject_alt_names.push(match h.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                h.clone()
                    .try_into()
                    .with_context(|| format!("--host {h:?} is not a DNS name"))?,
            ),
        });
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if client {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        // A node serves and is a client of other nodes.
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    };
    (params.not_before, params.not_after) = days_from_now(days);
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .context("signing the certificate")?;
    write_private(&dir.join(format!("{name}-key.pem")), &key.serialize_pem())?;
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
