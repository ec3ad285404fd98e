//! Verification keys, each bound to the algorithms of its kind, so that a
//! public key can never be used as an HMAC secret and an HMAC secret never
//! checks an RSA signature.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use crate::config::KeySource;

/// Why a configured key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The PEM file could not be read.
    #[error("cannot read the public key file {path}")]
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
    /// An HMAC secret is empty.
    #[error("a JWT secret is empty")]
    EmptySecret,
    /// An algorithm name is unknown.
    #[error("unknown JWT algorithm {0:?}")]
    UnknownAlgorithm(String),
    /// An algorithm fits none of the configured keys.
    #[error("algorithm {algorithm:?} cannot be used with the configured keys (allowed: {allowed})")]
    WrongKind {
        /// The algorithm asked for.
        algorithm: String,
        /// The algorithms the configured keys can verify.
        allowed: String,
    },
}

/// One key the gateway verifies signatures with.
#[derive(Clone)]
pub(crate) struct VerifyKey {
    /// The `kid` a token must name to be checked with this key, if any.
    pub kid: Option<String>,
    /// The key material.
    pub key: DecodingKey,
    /// The algorithms this key may verify: always of the key's own kind.
    pub algorithms: Vec<Algorithm>,
}

impl VerifyKey {
    /// Whether this key may check a token signed with `alg`.
    pub fn allows(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }
}

/// The algorithms an operator allows (`CELLGATE_JWT_ALGORITHMS`), or every
/// algorithm when none are listed.
#[derive(Clone, Debug)]
pub(crate) struct AllowList(Option<Vec<Algorithm>>);

impl AllowList {
    /// Parses the configured names; an unknown name is an error.
    pub fn parse(names: Option<&[String]>) -> Result<Self, KeyError> {
        let Some(names) = names.filter(|n| !n.is_empty()) else {
            return Ok(AllowList(None));
        };
        let algorithms = names
            .iter()
            .map(|name| {
                Algorithm::from_str(name).map_err(|_| KeyError::UnknownAlgorithm(name.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(AllowList(Some(algorithms)))
    }

    /// The algorithms of `family` this list allows.
    pub fn of_family(&self, family: AlgorithmFamily) -> Vec<Algorithm> {
        let all = family.algorithms();
        match &self.0 {
            None => all.to_vec(),
            Some(list) => all.iter().copied().filter(|a| list.contains(a)).collect(),
        }
    }

    /// Fails when an algorithm on the list fits none of `keys` (a typo, or
    /// an HMAC algorithm with only a public key configured).
    pub fn check_against(&self, families: &[AlgorithmFamily]) -> Result<(), KeyError> {
        let Some(list) = &self.0 else {
            return Ok(());
        };
        let usable: Vec<Algorithm> = families
            .iter()
            .flat_map(|f| f.algorithms().iter().copied())
            .collect();
        match list.iter().find(|a| !usable.contains(a)) {
            Some(alg) => Err(KeyError::WrongKind {
                algorithm: format!("{alg:?}"),
                allowed: format!("{usable:?}"),
            }),
            None => Ok(()),
        }
    }
}

/// The keys given in the settings: HMAC secrets (the current one and any
/// still accepted during a rotation) or one PEM public key.
pub(crate) fn fixed_keys(
    primary: Option<&KeySource>,
    previous_secrets: &[String],
    key_id: Option<&str>,
    allow: &AllowList,
) -> Result<Vec<VerifyKey>, KeyError> {
    let mut families = Vec::new();
    let mut keys = Vec::new();
    match primary {
        Some(KeySource::Secret(secret)) => {
            keys.push(secret_key(secret, key_id, allow)?);
            families.push(AlgorithmFamily::Hmac);
        }
        Some(KeySource::PublicKeyFile(path)) => {
            let (key, family) = public_key(path)?;
            keys.push(VerifyKey {
                kid: key_id.map(str::to_string),
                key,
                algorithms: allow.of_family(family),
            });
            families.push(family);
        }
        None => {}
    }
    for secret in previous_secrets {
        // Older secrets carry no key id: tokens they signed predate it.
        keys.push(secret_key(secret, None, allow)?);
        families.push(AlgorithmFamily::Hmac);
    }
    if !keys.is_empty() {
        allow.check_against(&families)?;
    }
    Ok(keys)
}

fn secret_key(secret: &str, kid: Option<&str>, allow: &AllowList) -> Result<VerifyKey, KeyError> {
    if secret.is_empty() {
        return Err(KeyError::EmptySecret);
    }
    let key = DecodingKey::from_secret(secret.as_bytes()).map_err(|_| KeyError::EmptySecret)?;
    Ok(VerifyKey {
        kid: kid.map(str::to_string),
        key,
        algorithms: allow.of_family(AlgorithmFamily::Hmac),
    })
}

fn public_key(path: &Path) -> Result<(DecodingKey, AlgorithmFamily), KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
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
    Err(KeyError::NotAKey {
        path: path.to_path_buf(),
    })
}

/// The key a JWK describes, bound to the algorithms its type allows (and
/// to its own `alg` when it names one). `None` for keys cellgate cannot
/// or must not use: encryption keys, symmetric keys, unknown types.
pub(crate) fn from_jwk(jwk: &Jwk, allow: &AllowList) -> Option<VerifyKey> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return None;
    }
    let family_algorithms = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => allow.of_family(AlgorithmFamily::Rsa),
        AlgorithmParameters::EllipticCurve(ec) => {
            let alg = match ec.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                _ => return None,
            };
            let allowed = allow.of_family(AlgorithmFamily::Ec);
            allowed.into_iter().filter(|a| *a == alg).collect()
        }
        AlgorithmParameters::OctetKeyPair(_) => allow.of_family(AlgorithmFamily::Ed),
        // A shared secret published in a key set is no secret: never used.
        AlgorithmParameters::OctetKey(_) => return None,
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        None => family_algorithms,
        Some(named) => {
            let named = jwk_algorithm(named)?;
            family_algorithms
                .into_iter()
                .filter(|a| *a == named)
                .collect()
        }
    };
    if algorithms.is_empty() {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        key,
        algorithms,
    })
}

fn jwk_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Algorithm::from_str(&alg.to_string()).ok()
}
