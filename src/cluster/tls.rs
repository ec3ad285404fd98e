//! TLS for `rediss://`: the system's certificate authorities, plus those of
//! `CELLGATE_REDIS_CA_FILE` for a managed Redis signed by a private CA.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A client configuration trusting the system's roots and those in
/// `ca_file`. The error is a sentence for the start-up message.
pub(super) fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read CELLGATE_REDIS_CA_FILE {shown}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CELLGATE_REDIS_CA_FILE {shown} is not PEM: {e}"))?;
        if certs.is_empty() {
            return Err(format!(
                "CELLGATE_REDIS_CA_FILE {shown} holds no certificate"
            ));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                format!("CELLGATE_REDIS_CA_FILE {shown}: unusable certificate: {e}")
            })?;
        }
    } else if added == 0 {
        return Err(
            "the system has no certificate authorities to check the server with \
                    (install ca-certificates, or set CELLGATE_REDIS_CA_FILE)"
                .into(),
        );
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("no TLS protocol version available: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}
