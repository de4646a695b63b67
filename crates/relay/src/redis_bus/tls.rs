//! TLS to the cluster (`rediss://`): rustls (ring), trusting the system's root certificates or
//! the CA certificates of `--bus-ca-file`. Every node's certificate must name the host or IP
//! address the cluster gives for it (`CLUSTER SLOTS`), as for any TLS client.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use fred::types::config::TlsConnector;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub fn connector(ca_file: Option<&Path>) -> anyhow::Result<TlsConnector> {
    let roots = match ca_file {
        Some(path) => ca_roots(path)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(config))
}

/// The certificates of a PEM file; an error names the file.
fn ca_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let bad = || format!("--bus-ca-file {}", path.display());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).with_context(bad)? {
        roots.add(cert.with_context(bad)?).with_context(bad)?;
    }
    anyhow::ensure!(!roots.is_empty(), "{}: no certificate in it", bad());
    Ok(roots)
}

fn system_roots() -> anyhow::Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    anyhow::ensure!(
        added > 0,
        "no system root certificate to trust for rediss:// (install ca-certificates, or give \
         --bus-ca-file)"
    );
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("tg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = connector(Some(&empty)).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            connector(Some(&dir.join("missing.pem"))).unwrap_err()
        );
        assert!(e.contains("missing.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
