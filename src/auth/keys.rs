//! Turning the configured key into a decoding key bound to the
//! algorithms of its kind, so that a public key can never be used as an
//! HMAC secret.

use std::path::PathBuf;
use std::str::FromStr;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use crate::config::KeySource;

/// Why the configured key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The PEM file could not be read.
    #[error("cannot read the public key file {path}: {source}")]
    Read {
        /// The configured path.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The file is not an RSA, EC or Ed25519 public key in PEM form.
    #[error("{path} is not an RSA, EC or Ed25519 public key in PEM form")]
    NotAKey {
        /// The configured path.
        path: PathBuf,
    },
    /// The HMAC secret is empty.
    #[error("the JWT secret is empty")]
    EmptySecret,
    /// An algorithm name is unknown.
    #[error("unknown JWT algorithm {0:?}")]
    UnknownAlgorithm(String),
    /// An algorithm does not fit the key's kind.
    #[error("algorithm {algorithm:?} cannot be used with this key (allowed: {allowed})")]
    WrongKind {
        /// The algorithm asked for.
        algorithm: String,
        /// The algorithms of the key's kind.
        allowed: String,
    },
}

/// The decoding key and the algorithms it may verify.
pub(super) fn decoding_key(
    source: &KeySource,
    wanted: Option<&[String]>,
) -> Result<(DecodingKey, Vec<Algorithm>), KeyError> {
    let (key, family) = match source {
        KeySource::Secret(secret) => (
            DecodingKey::from_secret(secret.as_bytes()).map_err(|_| KeyError::EmptySecret)?,
            AlgorithmFamily::Hmac,
        ),
        KeySource::PublicKeyFile(path) => public_key(path)?,
    };
    let allowed = family.algorithms();

    let algorithms = match wanted {
        None | Some([]) => allowed.to_vec(),
        Some(names) => names
            .iter()
            .map(|name| {
                let alg = Algorithm::from_str(name)
                    .map_err(|_| KeyError::UnknownAlgorithm(name.clone()))?;
                if allowed.contains(&alg) {
                    Ok(alg)
                } else {
                    Err(KeyError::WrongKind {
                        algorithm: name.clone(),
                        allowed: format!("{allowed:?}"),
                    })
                }
            })
            .collect::<Result<_, _>>()?,
    };
    Ok((key, algorithms))
}

fn public_key(path: &PathBuf) -> Result<(DecodingKey, AlgorithmFamily), KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.clone(),
        source,
    })?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, AlgorithmFamily::Rsa));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, AlgorithmFamily::Ec));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, AlgorithmFamily::Ed));
    }
    Err(KeyError::NotAKey { path: path.clone() })
}
