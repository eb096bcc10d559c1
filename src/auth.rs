//! Who a client is and what it may do: JWT verification and the grants a token carries.
//!
//! With `[auth] mode = "jwt"` a `hello` must carry a token whose `sub` is the `client_id`,
//! signed with the one algorithm the configuration implies: HS256 with `hmac_secret`, RS256 or
//! ES256 with `public_key_file` (the key's type decides). A token in any other algorithm is
//! refused, so neither `alg: none` nor HS/RS key confusion gets through. `exp` is required and
//! `nbf` honoured, both in milliseconds with `leeway_ms` of slack for clock skew.
//!
//! Optional claims narrow what the client may do: `publish` lists targets
//! (`client:ID`, `topic:NAME`) and `subscribe` topic names, each exact or a prefix ending in
//! `*` (`topic:news/*`, `alerts/*`, `client:*`). A missing claim allows everything of its kind;
//! an empty list allows nothing; a claim that is there but not a list of strings (`null`
//! included) makes the token invalid. This module is free of I/O apart from reading the key
//! file at start, and is unit-tested on its own.

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::now_ms;

/// `[auth]` in config.toml.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// "none" (any client id is accepted as claimed) or "jwt".
    pub mode: AuthMode,
    /// HS256 secret (at least 32 bytes).
    pub hmac_secret: String,
    /// PEM public key (RSA for RS256, EC P-256 for ES256).
    pub public_key_file: Option<PathBuf>,
    /// Slack for `exp` and `nbf` against clock skew.
    pub leeway_ms: u64,
}

// By hand, so the secret never reaches a log line.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field(
                "hmac_secret",
                &if self.hmac_secret.is_empty() {
                    "<empty>"
                } else {
                    "<set>"
                },
            )
            .field("public_key_file", &self.public_key_file)
            .field("leeway_ms", &self.leeway_ms)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    None,
    Jwt,
}

/// Why the verifier could not be built from the configuration.
#[derive(Debug, Error)]
pub enum AuthConfigError {
    #[error("auth.mode = \"jwt\" needs exactly one of auth.hmac_secret and auth.public_key_file")]
    NoKey,
    #[error("auth.hmac_secret must be at least 32 bytes (it is {0})")]
    ShortSecret(usize),
    #[error("auth.public_key_file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
}

impl AuthConfigError {
    /// The config key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            AuthConfigError::NoKey | AuthConfigError::ShortSecret(_) => "auth.hmac_secret",
            AuthConfigError::KeyFile { .. } => "auth.public_key_file",
        }
    }
}

/// Why a token was refused. The text never contains the token.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a token is required (auth.mode = \"jwt\")")]
    Missing,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token was issued for {token_sub:?}, not for {client_id:?}")]
    WrongSubject {
        token_sub: String,
        client_id: String,
    },
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
}

/// The claims outboxd reads.
///
/// An optional claim is `None` only when it is absent. A present one must have its type: a
/// `null` (or a string where a list belongs) makes the token invalid, never an absent claim,
/// because an absent `publish` or `subscribe` allows everything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present::<_, u64>"
    )]
    pub nbf: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present::<_, Vec<String>>"
    )]
    pub publish: Option<Vec<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present::<_, Vec<String>>"
    )]
    pub subscribe: Option<Vec<String>>,
}

/// A claim that is there: its value must be a `T` (`null` is not). Absent claims never get
/// here (`#[serde(default)]` makes them `None`).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// What a verified client may do, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    publish: Option<Vec<String>>,
    subscribe: Option<Vec<String>>,
    /// Unix ms at which the session ends unless a fresh token arrives; None: never.
    pub expires_at_ms: Option<u64>,
}

impl Grants {
    /// Everything, forever: auth mode "none".
    pub fn all() -> Self {
        Grants {
            publish: None,
            subscribe: None,
            expires_at_ms: None,
        }
    }

    /// `target` as written on the wire: `client:ID` or `topic:NAME`.
    pub fn may_publish(&self, target: &str) -> bool {
        allowed(self.publish.as_deref(), target)
    }

    pub fn may_subscribe(&self, topic: &str) -> bool {
        allowed(self.subscribe.as_deref(), topic)
    }
}

fn allowed(patterns: Option<&[String]>, name: &str) -> bool {
    match patterns {
        None => true,
        Some(list) => list.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        }),
    }
}

/// Checks tokens against the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway_ms: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway_ms", &self.leeway_ms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// The verifier for `cfg`, or None in mode "none".
    pub fn from_config(cfg: &AuthConfig) -> Result<Option<Verifier>, AuthConfigError> {
        if cfg.mode == AuthMode::None {
            return Ok(None);
        }
        let (key, alg) = match (cfg.hmac_secret.is_empty(), &cfg.public_key_file) {
            (false, None) => {
                if cfg.hmac_secret.len() < 32 {
                    return Err(AuthConfigError::ShortSecret(cfg.hmac_secret.len()));
                }
                (
                    DecodingKey::from_secret(cfg.hmac_secret.as_bytes()),
                    Algorithm::HS256,
                )
            }
            (true, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| AuthConfigError::KeyFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                public_key(&pem).map_err(|reason| AuthConfigError::KeyFile {
                    path: path.clone(),
                    reason,
                })?
            }
            _ => return Err(AuthConfigError::NoKey),
        };
        let mut validation = Validation::new(alg);
        // Time is checked below, in milliseconds; the library checks the signature, the
        // algorithm and that `exp` and `sub` are present.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Some(Verifier {
            key,
            validation,
            leeway_ms: cfg.leeway_ms,
        }))
    }

    /// Verifies `token` for `client_id` at the current time.
    pub fn verify(&self, token: Option<&str>, client_id: &str) -> Result<Grants, AuthError> {
        self.verify_at(token, client_id, now_ms())
    }

    pub fn verify_at(
        &self,
        token: Option<&str>,
        client_id: &str,
        now_ms: u64,
    ) -> Result<Grants, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        let c = data.claims;
        if c.sub != client_id {
            return Err(AuthError::WrongSubject {
                token_sub: c.sub,
                client_id: client_id.to_string(),
            });
        }
        let exp_ms = c.exp.saturating_mul(1000);
        if now_ms > exp_ms.saturating_add(self.leeway_ms) {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = c.nbf {
            if now_ms.saturating_add(self.leeway_ms) < nbf.saturating_mul(1000) {
                return Err(AuthError::NotYetValid);
            }
        }
        Ok(Grants {
            publish: c.publish,
            subscribe: c.subscribe,
            expires_at_ms: Some(exp_ms.saturating_add(self.leeway_ms)),
        })
    }
}

/// A human reason for a library error, without the token.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => "bad signature".into(),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm not accepted".into(),
        K::InvalidToken => "malformed token".into(),
        K::MissingRequiredClaim(c) => format!("missing claim {c:?}"),
        // A claim of the wrong type (`"publish": null`): say which, without the token.
        K::Json(e) if e.classify() == serde_json::error::Category::Data => {
            format!("a claim has the wrong type: {e}")
        }
        K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed token".into(),
        other => format!("{other:?}"),
    }
}

fn public_key(pem: &[u8]) -> Result<(DecodingKey, Algorithm), String> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Ok((k, Algorithm::RS256));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Ok((k, Algorithm::ES256));
    }
    Err("not a PEM RSA or EC (P-256) public key".into())
}

/// Signs a token with an HS256 secret (for `outboxd token`, development and tests).
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, String> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const RSA_KEY: &str = include_str!("../tests/fixtures/test-rsa.key.pem");
    const RSA_PUB: &str = include_str!("../tests/fixtures/test-rsa.pub.pem");
    const EC_KEY: &str = include_str!("../tests/fixtures/test-ec.key.pem");
    const NOW: u64 = 1_800_000_000_000;

    fn claims(sub: &str) -> Claims {
        Claims {
            sub: sub.into(),
            exp: NOW / 1000 + 60,
            nbf: None,
            publish: None,
            subscribe: None,
        }
    }

    fn hs_verifier(leeway_ms: u64) -> Verifier {
        Verifier::from_config(&AuthConfig {
            mode: AuthMode::Jwt,
            hmac_secret: SECRET.into(),
            public_key_file: None,
            leeway_ms,
        })
        .unwrap()
        .unwrap()
    }

    fn rs_verifier() -> Verifier {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pub.pem");
        std::fs::write(&path, RSA_PUB).unwrap();
        Verifier::from_config(&AuthConfig {
            mode: AuthMode::Jwt,
            hmac_secret: String::new(),
            public_key_file: Some(path),
            leeway_ms: 0,
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn valid_token_for_the_same_client_is_accepted_until_expiry() {
        let v = hs_verifier(0);
        let t = mint_hs256(SECRET, &claims("alice")).unwrap();
        let g = v.verify_at(Some(&t), "alice", NOW).unwrap();
        assert_eq!(g.expires_at_ms, Some(NOW + 60_000));
        assert!(g.may_publish("client:bob") && g.may_subscribe("news"));
    }

    #[test]
    fn missing_forged_and_other_clients_tokens_are_refused() {
        let v = hs_verifier(0);
        assert_eq!(v.verify_at(None, "alice", NOW), Err(AuthError::Missing));
        let forged = mint_hs256("another-secret-another-secret-xx", &claims("alice")).unwrap();
        assert!(matches!(
            v.verify_at(Some(&forged), "alice", NOW),
            Err(AuthError::Invalid(_))
        ));
        let bobs = mint_hs256(SECRET, &claims("bob")).unwrap();
        assert!(matches!(
            v.verify_at(Some(&bobs), "alice", NOW),
            Err(AuthError::WrongSubject { .. })
        ));
        assert!(matches!(
            v.verify_at(Some("not.a.jwt"), "alice", NOW),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn expiry_and_not_before_are_enforced_with_the_leeway() {
        let mut c = claims("alice");
        c.exp = NOW / 1000 - 1; // expired one second ago
        let t = mint_hs256(SECRET, &c).unwrap();
        assert_eq!(
            hs_verifier(0).verify_at(Some(&t), "alice", NOW),
            Err(AuthError::Expired)
        );
        assert!(hs_verifier(2000).verify_at(Some(&t), "alice", NOW).is_ok());

        let mut c = claims("alice");
        c.nbf = Some(NOW / 1000 + 1);
        let t = mint_hs256(SECRET, &c).unwrap();
        assert_eq!(
            hs_verifier(0).verify_at(Some(&t), "alice", NOW),
            Err(AuthError::NotYetValid)
        );
        assert!(hs_verifier(2000).verify_at(Some(&t), "alice", NOW).is_ok());
    }

    #[test]
    fn alg_none_and_hs_rs_confusion_are_refused() {
        // alg "none": header {"alg":"none"}, no signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let body = serde_json::to_vec(&claims("alice")).unwrap();
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(&body)
        );
        assert!(matches!(
            hs_verifier(0).verify_at(Some(&none), "alice", NOW),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            rs_verifier().verify_at(Some(&none), "alice", NOW),
            Err(AuthError::Invalid(_))
        ));

        // HS256 signed with the RSA public key's bytes as the secret: the classic confusion.
        let confused = mint_hs256(RSA_PUB, &claims("alice")).unwrap();
        assert!(matches!(
            rs_verifier().verify_at(Some(&confused), "alice", NOW),
            Err(AuthError::Invalid(_))
        ));

        // A genuine RS256 token is accepted by the RS verifier and refused by the HS one.
        let rs = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims("alice"),
            &EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(rs_verifier().verify_at(Some(&rs), "alice", NOW).is_ok());
        assert!(matches!(
            hs_verifier(0).verify_at(Some(&rs), "alice", NOW),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn ec_public_key_selects_es256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ec.pub.pem");
        std::fs::write(&path, include_str!("../tests/fixtures/test-ec.pub.pem")).unwrap();
        let v = Verifier::from_config(&AuthConfig {
            mode: AuthMode::Jwt,
            public_key_file: Some(path),
            ..AuthConfig::default()
        })
        .unwrap()
        .unwrap();
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims("alice"),
            &EncodingKey::from_ec_pem(EC_KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(v.verify_at(Some(&t), "alice", NOW).is_ok());
    }

    #[test]
    fn claims_narrow_publish_and_subscribe_by_exact_name_or_prefix() {
        let mut c = claims("alice");
        c.publish = Some(vec!["client:bob".into(), "topic:news/*".into()]);
        c.subscribe = Some(vec![]);
        let t = mint_hs256(SECRET, &c).unwrap();
        let g = hs_verifier(0).verify_at(Some(&t), "alice", NOW).unwrap();
        assert!(g.may_publish("client:bob"));
        assert!(!g.may_publish("client:bobby"));
        assert!(g.may_publish("topic:news/eu"));
        assert!(!g.may_publish("topic:sports"));
        assert!(!g.may_subscribe("news"), "an empty list allows nothing");
    }

    #[test]
    fn a_grant_claim_that_is_null_or_of_another_type_invalidates_the_token() {
        let v = hs_verifier(0);
        let sign = |body: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &body,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        let exp = NOW / 1000 + 60;
        for (claim, value) in [
            ("publish", serde_json::json!(null)),
            ("subscribe", serde_json::json!(null)),
            ("publish", serde_json::json!("client:bob")),
            ("subscribe", serde_json::json!(["news", 1])),
            ("nbf", serde_json::json!(null)),
        ] {
            let mut body = serde_json::json!({"sub": "alice", "exp": exp});
            body[claim] = value.clone();
            match v.verify_at(Some(&sign(body)), "alice", NOW) {
                Err(AuthError::Invalid(why)) => assert!(why.contains("wrong type"), "{why}"),
                other => panic!("{claim}: {value} was not refused: {other:?}"),
            }
        }
        // Absent claims still allow everything.
        let g = v
            .verify_at(
                Some(&sign(serde_json::json!({"sub": "alice", "exp": exp}))),
                "alice",
                NOW,
            )
            .unwrap();
        assert!(g.may_publish("client:bob") && g.may_subscribe("news"));
    }

    #[test]
    fn bad_configurations_are_refused_with_the_key_named() {
        let e = Verifier::from_config(&AuthConfig {
            mode: AuthMode::Jwt,
            ..AuthConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("auth.hmac_secret"));
        let e = Verifier::from_config(&AuthConfig {
            mode: AuthMode::Jwt,
            hmac_secret: "short".into(),
            ..AuthConfig::default()
        })
        .unwrap_err();
        assert!(matches!(e, AuthConfigError::ShortSecret(5)));
        assert!(Verifier::from_config(&AuthConfig::default())
            .unwrap()
            .is_none());
    }
}
