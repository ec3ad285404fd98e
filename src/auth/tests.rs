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
    Verifier::for_secret(SECRET).unwrap()
}

fn verifier(s: &Settings, key: KeySource) -> Result<Verifier, KeyError> {
    Verifier::new(s, Some(&key), None)
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

#[tokio::test]
async fn a_minted_token_verifies() {
    let minter = Minter::new(&settings(), Some(&KeySource::Secret(SECRET.into()))).unwrap();
    let token = minter
        .instructor("ada@example.edu", Duration::from_secs(60))
        .unwrap();
    let claims = hmac_verifier()
        .verify(&token, Role::Instructor)
        .await
        .unwrap();
    assert_eq!(claims.sub, "ada@example.edu");
}

#[tokio::test]
async fn refusals_carry_the_contract_codes() {
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
        v.verify(&expired, Role::Instructor).await,
        Err(Refusal::TokenExpired)
    );
    assert!(v.verify(&within_leeway, Role::Instructor).await.is_ok());
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
        let got = v.verify(&token, Role::Instructor).await.unwrap_err();
        assert_eq!(got.code(), "invalid_token", "{name}: {got:?}");
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = base64url(instructor(json!({})).to_string().as_bytes());
    let token = format!("{header}.{body}.");
    let got = hmac_verifier()
        .verify(&token, Role::Instructor)
        .await
        .unwrap_err();
    assert_eq!(got.code(), "invalid_token");
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let mut s = settings();
    s.jwt_issuer = Some("https://idp.example.edu".into());
    s.jwt_audience = Some("cellgate".into());
    let v = verifier(&s, KeySource::Secret(SECRET.into())).unwrap();

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

    assert!(v.verify(&good, Role::Instructor).await.is_ok());
    for token in [wrong_iss, wrong_aud, missing] {
        assert_eq!(
            v.verify(&token, Role::Instructor).await.unwrap_err().code(),
            "invalid_token"
        );
    }
}

#[tokio::test]
async fn public_keys_of_each_kind_verify_their_own_algorithms() {
    for (public, private, alg) in [
        ("rsa-public.pem", "rsa-private.pem", Algorithm::RS256),
        ("rsa-public.pem", "rsa-private.pem", Algorithm::PS256),
        ("ec-public.pem", "ec-private.pem", Algorithm::ES256),
        ("ed-public.pem", "ed-private.pem", Algorithm::EdDSA),
    ] {
        let key = KeySource::PublicKeyFile(fixture(public));
        let v = verifier(&settings(), key).unwrap();
        let pem = std::fs::read(fixture(private)).unwrap();
        let signing = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        let token = jsonwebtoken::encode(&Header::new(alg), &instructor(json!({})), &signing);
        let claims = v.verify(&token.unwrap(), Role::Instructor).await;
        assert!(claims.is_ok(), "{alg:?}: {claims:?}");
    }
}

#[tokio::test]
async fn a_public_key_cannot_be_used_as_an_hmac_secret() {
    // The classic confusion attack: sign HS256 with the public key's bytes.
    let public = std::fs::read(fixture("rsa-public.pem")).unwrap();
    let key = EncodingKey::from_secret(&public).unwrap();
    let token = jsonwebtoken::encode(&Header::default(), &instructor(json!({})), &key).unwrap();

    let v = verifier(
        &settings(),
        KeySource::PublicKeyFile(fixture("rsa-public.pem")),
    );
    let got = v
        .unwrap()
        .verify(&token, Role::Instructor)
        .await
        .unwrap_err();
    assert_eq!(got.code(), "invalid_token");
}

#[tokio::test]
async fn algorithms_of_another_kind_are_refused_at_start_up() {
    let mut s = settings();
    s.jwt_algorithms = Some(vec!["HS256".into()]);
    let err = verifier(&s, KeySource::PublicKeyFile(fixture("rsa-public.pem")));
    assert!(matches!(err, Err(KeyError::WrongKind { .. })));
}

#[tokio::test]
async fn bearer_header_parsing() {
    assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
    assert_eq!(bearer(Some("bearer   abc ")), Some("abc"));
    assert_eq!(bearer(Some("Basic abc")), None);
    assert_eq!(bearer(None), None);
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn sign_with(secret: &str, header: Header, claims: serde_json::Value) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

const OLD_SECRET: &str = "the-secret-we-used-last-term-still-long-enough";

fn rotating_settings() -> Settings {
    let mut s = settings();
    s.jwt_previous_secrets = vec![OLD_SECRET.into()];
    s
}

#[tokio::test]
async fn previous_secrets_are_accepted_during_a_rotation() {
    let v = verifier(&rotating_settings(), KeySource::Secret(SECRET.into())).unwrap();
    let current = sign_with(SECRET, Header::default(), instructor(json!({})));
    let previous = sign_with(OLD_SECRET, Header::default(), instructor(json!({})));
    let retired = sign_with(
        "a-secret-retired-two-rotations-ago-long-enough",
        Header::default(),
        instructor(json!({})),
    );

    assert!(v.verify(&current, Role::Instructor).await.is_ok());
    assert!(v.verify(&previous, Role::Instructor).await.is_ok());
    let got = v.verify(&retired, Role::Instructor).await.unwrap_err();
    assert_eq!(got, Refusal::invalid("bad signature"));
}

#[tokio::test]
async fn an_expired_token_of_a_previous_secret_is_told_apart_from_a_forgery() {
    let v = verifier(&rotating_settings(), KeySource::Secret(SECRET.into())).unwrap();
    let expired = sign_with(
        OLD_SECRET,
        Header::default(),
        instructor(json!({ "exp": now() - 3600 })),
    );
    let got = v.verify(&expired, Role::Instructor).await.unwrap_err();
    assert_eq!(got, Refusal::TokenExpired);
}

#[tokio::test]
async fn minted_tokens_carry_the_key_id_and_a_named_key_is_the_only_one_tried() {
    let mut s = rotating_settings();
    s.jwt_key_id = Some("2026-autumn".into());
    let key = KeySource::Secret(SECRET.into());
    let v = verifier(&s, key.clone()).unwrap();
    let token = Minter::new(&s, Some(&key))
        .unwrap()
        .instructor("ada@example.edu", Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(),
        Some("2026-autumn")
    );
    assert!(v.verify(&token, Role::Instructor).await.is_ok());

    // The old secret has no key id: a token naming the current id but
    // signed with the old secret is not checked against the old secret.
    let header = Header {
        kid: Some("2026-autumn".into()),
        ..Header::default()
    };
    let mismatched = sign_with(OLD_SECRET, header, instructor(json!({})));
    let got = v.verify(&mismatched, Role::Instructor).await.unwrap_err();
    assert_eq!(got, Refusal::invalid("bad signature"));
}

#[tokio::test]
async fn an_unknown_key_id_is_refused() {
    let header = Header {
        kid: Some("nobody-knows-this-key".into()),
        ..Header::default()
    };
    let token = sign_with(SECRET, header, instructor(json!({})));
    let got = hmac_verifier()
        .verify(&token, Role::Instructor)
        .await
        .unwrap_err();
    assert_eq!(got, Refusal::invalid("unknown key id"));
}

#[tokio::test]
async fn only_jwt_types_are_accepted() {
    let v = hmac_verifier();
    for (typ, ok) in [
        (Some("JWT"), true),
        (Some("jwt"), true),
        (Some("at+jwt"), true),
        (Some("application/at+jwt"), true),
        (None, true),
        (Some("JWE"), false),
        (Some("dpop+jwt"), false),
        (Some(""), false),
    ] {
        let header = Header {
            typ: typ.map(str::to_string),
            ..Header::default()
        };
        let token = sign_with(SECRET, header, instructor(json!({})));
        let got = v.verify(&token, Role::Instructor).await;
        match ok {
            true => assert!(got.is_ok(), "typ {typ:?}: {got:?}"),
            false => assert_eq!(got.unwrap_err(), Refusal::invalid("wrong typ"), "{typ:?}"),
        }
    }
}

#[tokio::test]
async fn wrongly_typed_time_claims_are_refused() {
    let v = hmac_verifier();
    for claims in [
        instructor(json!({ "exp": (now() + 600).to_string() })),
        instructor(json!({ "exp": null })),
        instructor(json!({ "exp": 1.5e12 })),
        instructor(json!({ "nbf": "yesterday" })),
        instructor(json!({ "iat": [1, 2] })),
        instructor(json!({ "exp": true })),
    ] {
        let token = sign(claims.clone());
        let got = v.verify(&token, Role::Instructor).await.unwrap_err();
        assert_eq!(got.code(), "invalid_token", "{claims}: {got:?}");
    }
}

#[test]
fn an_hmac_algorithm_with_only_a_public_key_is_refused_at_start_up() {
    let mut s = settings();
    s.jwt_algorithms = Some(vec!["RS256".into(), "HS256".into()]);
    let err = verifier(&s, KeySource::PublicKeyFile(fixture("rsa-public.pem")));
    assert!(matches!(err, Err(KeyError::WrongKind { .. })));
    // With a previous HMAC secret beside the RSA key, HS256 has a key.
    s.jwt_previous_secrets = vec![OLD_SECRET.into()];
    assert!(verifier(&s, KeySource::PublicKeyFile(fixture("rsa-public.pem"))).is_ok());
}
