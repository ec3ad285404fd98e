use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use super::*;

const SECRET: &str = "a-test-secret-that-is-long-enough-to-use";

fn settings() -> Settings {
    Settings::default()
}

fn hmac_verifier() -> Verifier {
    Verifier::new(&settings(), &KeySource::Secret(SECRET.into())).unwrap()
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn sign(claims: serde_json::Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap()
}

fn instructor(extra: serde_json::Value) -> serde_json::Value {
    let mut claims = json!({ "sub": "ada@example.edu", "role": "instructor", "exp": now() + 600 });
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    claims
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn a_minted_token_verifies() {
    let minter = Minter::new(&settings(), &KeySource::Secret(SECRET.into())).unwrap();
    let token = minter
        .instructor("ada@example.edu", Duration::from_secs(60))
        .unwrap();
    let claims = hmac_verifier().verify(&token, Role::Instructor).unwrap();
    assert_eq!(claims.sub, "ada@example.edu");
}

#[test]
fn refusals_carry_the_contract_codes() {
    let v = hmac_verifier();
    let expired = sign(instructor(json!({ "exp": now() - 120 })));
    let within_leeway = sign(instructor(json!({ "exp": now() - 10 })));
    let future_nbf = sign(instructor(json!({ "nbf": now() + 600 })));
    let future_iat = sign(instructor(json!({ "iat": now() + 600 })));
    let no_exp = sign(json!({ "sub": "ada@example.edu", "role": "instructor" }));
    let text_exp = sign(instructor(json!({ "exp": "tomorrow" })));
    let student = sign(instructor(json!({ "role": "student" })));
    let unknown_role = sign(instructor(json!({ "role": "admin" })));
    let forged = {
        let key = EncodingKey::from_secret(b"someone-elses-secret-of-enough-length").unwrap();
        jsonwebtoken::encode(&Header::default(), &instructor(json!({})), &key).unwrap()
    };

    assert_eq!(
        v.verify(&expired, Role::Instructor),
        Err(Refusal::TokenExpired)
    );
    assert!(v.verify(&within_leeway, Role::Instructor).is_ok());
    for (name, token) in [
        ("future nbf", future_nbf),
        ("future iat", future_iat),
        ("no exp", no_exp),
        ("text exp", text_exp),
        ("student on dashboard", student),
        ("unknown role", unknown_role),
        ("forged", forged),
        ("empty", String::new()),
        ("garbage", "not.a.jwt".into()),
        ("oversized", "a".repeat(MAX_TOKEN_BYTES + 1)),
    ] {
        let got = v.verify(&token, Role::Instructor).unwrap_err();
        assert_eq!(got.code(), "invalid_token", "{name}: {got:?}");
    }
}

#[test]
fn alg_none_is_refused() {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = base64url(instructor(json!({})).to_string().as_bytes());
    let token = format!("{header}.{body}.");
    let got = hmac_verifier()
        .verify(&token, Role::Instructor)
        .unwrap_err();
    assert_eq!(got.code(), "invalid_token");
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let mut s = settings();
    s.jwt_issuer = Some("https://idp.example.edu".into());
    s.jwt_audience = Some("cellgate".into());
    let v = Verifier::new(&s, &KeySource::Secret(SECRET.into())).unwrap();

    let good = sign(instructor(
        json!({ "iss": "https://idp.example.edu", "aud": "cellgate" }),
    ));
    let wrong_iss = sign(instructor(
        json!({ "iss": "https://evil.example", "aud": "cellgate" }),
    ));
    let wrong_aud = sign(instructor(
        json!({ "iss": "https://idp.example.edu", "aud": "other" }),
    ));
    let missing = sign(instructor(json!({})));

    assert!(v.verify(&good, Role::Instructor).is_ok());
    for token in [wrong_iss, wrong_aud, missing] {
        assert_eq!(
            v.verify(&token, Role::Instructor).unwrap_err().code(),
            "invalid_token"
        );
    }
}

#[test]
fn public_keys_of_each_kind_verify_their_own_algorithms() {
    for (public, private, alg) in [
        ("rsa-public.pem", "rsa-private.pem", Algorithm::RS256),
        ("rsa-public.pem", "rsa-private.pem", Algorithm::PS256),
        ("ec-public.pem", "ec-private.pem", Algorithm::ES256),
        ("ed-public.pem", "ed-private.pem", Algorithm::EdDSA),
    ] {
        let key = KeySource::PublicKeyFile(fixture(public));
        let v = Verifier::new(&settings(), &key).unwrap();
        let pem = std::fs::read(fixture(private)).unwrap();
        let signing = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        let token = jsonwebtoken::encode(&Header::new(alg), &instructor(json!({})), &signing);
        let claims = v.verify(&token.unwrap(), Role::Instructor);
        assert!(claims.is_ok(), "{alg:?}: {claims:?}");
    }
}

#[test]
fn a_public_key_cannot_be_used_as_an_hmac_secret() {
    // The classic confusion attack: sign HS256 with the public key's bytes.
    let public = std::fs::read(fixture("rsa-public.pem")).unwrap();
    let key = EncodingKey::from_secret(&public).unwrap();
    let token = jsonwebtoken::encode(&Header::default(), &instructor(json!({})), &key).unwrap();

    let v = Verifier::new(
        &settings(),
        &KeySource::PublicKeyFile(fixture("rsa-public.pem")),
    );
    let got = v.unwrap().verify(&token, Role::Instructor).unwrap_err();
    assert_eq!(got.code(), "invalid_token");
}

#[test]
fn algorithms_of_another_kind_are_refused_at_start_up() {
    let mut s = settings();
    s.jwt_algorithms = Some(vec!["HS256".into()]);
    let err = Verifier::new(&s, &KeySource::PublicKeyFile(fixture("rsa-public.pem")));
    assert!(matches!(err, Err(KeyError::WrongKind { .. })));
}

#[test]
fn bearer_header_parsing() {
    assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
    assert_eq!(bearer(Some("bearer   abc ")), Some("abc"));
    assert_eq!(bearer(Some("Basic abc")), None);
    assert_eq!(bearer(None), None);
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
