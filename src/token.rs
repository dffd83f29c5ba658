//! Tokens: the checks a signing request must pass, the claims we write, and the compact JWS layout.
//! Signing itself is the key's business ([`crate::keys::Signer`]).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::Error;
use crate::strict_json::{self, StrictJsonError};

/// Claims a caller may not set: we write them.
pub const REGISTERED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

/// The default token lifetime (capped by the configured maximum).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// The hard ceiling on any configured maximum: a token lives at most one day.
pub const LIFETIME_CEILING: Duration = Duration::from_secs(24 * 3600);

/// Longest subject, in characters (Microsoft Entra's limit for federated credentials).
pub const MAX_SUBJECT_CHARS: usize = 600;
/// Most audiences in one token.
pub const MAX_AUDIENCES: usize = 20;
/// Longest audience, in characters (Entra's limit).
pub const MAX_AUDIENCE_CHARS: usize = 600;
/// Largest extra claims, encoded as JSON.
pub const MAX_CLAIMS_BYTES: usize = 16 * 1024;
/// Deepest nesting of extra claims.
pub const MAX_CLAIMS_DEPTH: usize = 16;

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// What a caller asks to be signed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenRequest {
    /// `sub`.
    pub subject: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// Requested lifetime; `None` for the default.
    pub lifetime: Option<Duration>,
    /// Private claims.
    pub extra_claims: Map<String, Value>,
}

/// The payload of a token, in the order we write it.
#[derive(Debug, Serialize)]
pub struct Claims<'a> {
    /// Issuer, verbatim.
    pub iss: &'a str,
    /// Subject.
    pub sub: &'a str,
    /// Audiences, always an array.
    pub aud: &'a [String],
    /// Issued at (unix seconds).
    pub iat: i64,
    /// Not before (= iat).
    pub nbf: i64,
    /// Expiry (unix seconds).
    pub exp: i64,
    /// Unique token id.
    pub jti: &'a str,
    /// Private claims.
    #[serde(flatten)]
    pub extra: &'a Map<String, Value>,
}

impl TokenRequest {
    /// Checks the request against the rules and returns the lifetime to use.
    pub fn validate(&self, max_lifetime: Duration) -> Result<Duration, Error> {
        if self.subject.is_empty() {
            return Err(Error::invalid("subject", "must not be empty"));
        }
        if self.subject.chars().count() > MAX_SUBJECT_CHARS {
            return Err(Error::invalid(
                "subject",
                format!("longer than {MAX_SUBJECT_CHARS} characters"),
            ));
        }
        if self.subject.chars().any(char::is_control) {
            return Err(Error::invalid(
                "subject",
                "must not contain control characters",
            ));
        }
        if self.audiences.is_empty() {
            return Err(Error::invalid(
                "audiences",
                "at least one audience is required",
            ));
        }
        if self.audiences.len() > MAX_AUDIENCES {
            return Err(Error::invalid(
                "audiences",
                format!(
                    "{} audiences; at most {MAX_AUDIENCES} are allowed",
                    self.audiences.len()
                ),
            ));
        }
        for (i, aud) in self.audiences.iter().enumerate() {
            if aud.is_empty() {
                return Err(Error::invalid(
                    format!("audiences[{i}]"),
                    "must not be empty",
                ));
            }
            if aud.chars().count() > MAX_AUDIENCE_CHARS {
                return Err(Error::invalid(
                    format!("audiences[{i}]"),
                    format!("longer than {MAX_AUDIENCE_CHARS} characters"),
                ));
            }
            if aud.chars().any(char::is_control) {
                return Err(Error::invalid(
                    format!("audiences[{i}]"),
                    "must not contain control characters",
                ));
            }
            if let Some(first) = self.audiences[..i].iter().position(|a| a == aud) {
                return Err(Error::invalid(
                    format!("audiences[{i}]"),
                    format!("repeats audiences[{first}]"),
                ));
            }
        }
        let nesting = self.extra_claims.values().map(depth).max().unwrap_or(0) + 1;
        if nesting > MAX_CLAIMS_DEPTH {
            return Err(Error::invalid(
                "claims",
                format!("nested {nesting} levels deep; at most {MAX_CLAIMS_DEPTH} are allowed"),
            ));
        }
        let size = serde_json::to_vec(&self.extra_claims).map_or(usize::MAX, |v| v.len());
        if size > MAX_CLAIMS_BYTES {
            return Err(Error::invalid(
                "claims",
                format!(
                    "{size} bytes once encoded; at most {MAX_CLAIMS_BYTES} (16 KiB) are allowed"
                ),
            ));
        }
        if let Some(name) = REGISTERED_CLAIMS
            .iter()
            .find(|c| self.extra_claims.contains_key(**c))
        {
            return Err(Error::invalid(
                format!("claims.{name}"),
                format!(
                    "{name:?} is a registered claim that the key service sets itself; remove it from claims"
                ),
            ));
        }
        match self.lifetime {
            None => Ok(DEFAULT_LIFETIME.min(max_lifetime)),
            Some(d) if d > max_lifetime => Err(Error::invalid(
                "lifetime_seconds",
                format!(
                    "{} s is above the maximum token lifetime of {} s",
                    d.as_secs(),
                    max_lifetime.as_secs()
                ),
            )),
            Some(d) => Ok(d),
        }
    }
}

/// Unpadded base64url.
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The encoded JWS protected header for a key: exactly `alg`, `kid` and `typ`.
pub fn encoded_header(alg: &str, kid: &str) -> String {
    let header = serde_json::json!({ "alg": alg, "kid": kid, "typ": "JWT" });
    b64url(header.to_string().as_bytes())
}

/// A random token id in UUID v4 form, as Kubernetes writes `jti`.
pub fn new_jti(rng: &SystemRandom) -> Result<String, Error> {
    let mut b = [0u8; 16];
    rng.fill(&mut b).map_err(|_| Error::ShuttingDown)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut jti = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            jti.push('-');
        }
        jti.push(char::from(HEX[usize::from(x >> 4)]));
        jti.push(char::from(HEX[usize::from(x & 0x0f)]));
    }
    Ok(jti)
}

/// `header.payload`, the bytes a JWS signature covers.
pub fn signing_input(encoded_header: &str, claims: &Claims<'_>) -> String {
    let payload = serde_json::to_vec(claims).expect("claims serialize");
    let mut out = String::with_capacity(encoded_header.len() + 1 + payload.len() * 4 / 3 + 4);
    out.push_str(encoded_header);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
    out
}

/// How far ahead of our clock a caller's `iat` may be.
pub const MAX_CLOCK_SKEW_SECS: i64 = 60;

/// Checks claims that a caller encoded itself (the Kubernetes external-signer protocol): unpadded
/// base64url of a JSON object, each claim named once, whose `iss` is ours, with integer `iat` (no more
/// than [`MAX_CLOCK_SKEW_SECS`] in the future) and `exp` (after `iat` and now), living at most `max_lifetime` and expiring no
/// later than `now + max_lifetime`; `nbf`, `sub`, `aud` and `jti`, when present, of their RFC 7519
/// types. Returns `exp`.
pub fn check_encoded_claims(
    encoded: &str,
    issuer: &str,
    max_lifetime: Duration,
    now_secs: i64,
) -> Result<i64, Error> {
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| Error::invalid("claims", "not unpadded base64url"))?;
    let claims: Map<String, Value> = strict_json::from_slice(&bytes).map_err(|e| match e {
        // One verifier would read the first value, another the last.
        StrictJsonError::Duplicate(e) => Error::invalid(
            "claims",
            format!("{e}; claim names must be unique (RFC 7519 section 4)"),
        ),
        StrictJsonError::Invalid(_) => Error::invalid("claims", "does not decode to a JSON object"),
    })?;
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == issuer => {}
        Some(Value::String(iss)) => {
            return Err(Error::invalid(
                "claims.iss",
                format!("must be this service's issuer {issuer:?}, not {iss:?}"),
            ));
        }
        Some(_) => return Err(Error::invalid("claims.iss", "must be a string")),
        None => {
            return Err(Error::invalid(
                "claims.iss",
                format!("missing; must be this service's issuer {issuer:?}"),
            ));
        }
    }
    let int = |name: &str| {
        claims.get(name).and_then(Value::as_i64).ok_or_else(|| {
            Error::invalid(
                format!("claims.{name}"),
                "must be present as an integer (unix seconds)",
            )
        })
    };
    let (iat, exp) = (int("iat")?, int("exp")?);
    if exp <= iat {
        return Err(Error::invalid(
            "claims.exp",
            format!("must be after iat ({iat}), not {exp}"),
        ));
    }
    if exp <= now_secs {
        return Err(Error::invalid(
            "claims.exp",
            format!("{exp} has already passed (now is {now_secs})"),
        ));
    }
    if iat > now_secs.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(Error::invalid(
            "claims.iat",
            format!("{iat} is in the future (now is {now_secs})"),
        ));
    }
    if claims.contains_key("nbf") {
        let nbf = int("nbf")?;
        if nbf >= exp {
            return Err(Error::invalid(
                "claims.nbf",
                format!("must be before exp ({exp}), not {nbf}"),
            ));
        }
    }
    // The registered claims a verifier reads must have the types RFC 7519 gives them.
    for name in ["sub", "jti"] {
        if claims.get(name).is_some_and(|v| !v.is_string()) {
            return Err(Error::invalid(format!("claims.{name}"), "must be a string"));
        }
    }
    match claims.get("aud") {
        None | Some(Value::String(_)) => {}
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
        Some(_) => {
            return Err(Error::invalid(
                "claims.aud",
                "must be a string or an array of strings",
            ));
        }
    }
    let max = i64::try_from(max_lifetime.as_secs()).unwrap_or(i64::MAX);
    if exp.saturating_sub(iat) > max {
        return Err(Error::invalid(
            "claims.exp",
            format!(
                "exp - iat is {} s, above the maximum token lifetime of {max} s",
                exp.saturating_sub(iat)
            ),
        ));
    }
    if exp > now_secs.saturating_add(max) {
        return Err(Error::invalid(
            "claims.exp",
            format!("expires more than the maximum token lifetime ({max} s) from now"),
        ));
    }
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> TokenRequest {
        TokenRequest {
            subject: "system:serviceaccount:default:app".into(),
            audiences: vec!["api://AzureADTokenExchange".into()],
            ..Default::default()
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn default_lifetime_is_one_hour_or_the_max_if_shorter() {
        assert_eq!(req().validate(DAY).unwrap(), DEFAULT_LIFETIME);
        assert_eq!(
            req().validate(Duration::from_secs(600)).unwrap(),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn above_the_max_is_refused_stating_the_max() {
        let r = TokenRequest {
            lifetime: Some(Duration::from_secs(90_000)),
            ..req()
        };
        let msg = r.validate(DAY).unwrap_err().to_string();
        assert!(
            msg.starts_with("lifetime_seconds") && msg.contains("86400"),
            "{msg}"
        );
    }

    #[test]
    fn control_characters_and_repeated_audiences_are_refused() {
        let message = |r: TokenRequest| r.validate(DAY).unwrap_err().to_string();
        let msg = message(TokenRequest {
            subject: "a\nb".into(),
            ..req()
        });
        assert!(
            msg.starts_with("subject") && msg.contains("control"),
            "{msg}"
        );
        let msg = message(TokenRequest {
            audiences: vec!["a".into(), "b\u{1b}[0m".into()],
            ..req()
        });
        assert!(
            msg.starts_with("audiences[1]") && msg.contains("control"),
            "{msg}"
        );
        let msg = message(TokenRequest {
            audiences: vec!["a".into(), "b".into(), "a".into()],
            ..req()
        });
        assert!(
            msg.starts_with("audiences[2]: repeats audiences[0]"),
            "{msg}"
        );
        let commas = TokenRequest {
            audiences: vec!["a,b".into(), "a".into()],
            ..req()
        };
        assert!(
            commas.validate(DAY).is_ok(),
            "a comma is an ordinary character"
        );
    }

    #[test]
    fn registered_claims_empty_subject_and_audiences_are_refused() {
        for name in REGISTERED_CLAIMS {
            let mut r = req();
            r.extra_claims.insert(name.into(), Value::from("x"));
            let msg = r.validate(DAY).unwrap_err().to_string();
            assert!(msg.starts_with(&format!("claims.{name}")), "{msg}");
        }
        let msg = TokenRequest {
            subject: String::new(),
            ..req()
        }
        .validate(DAY)
        .unwrap_err()
        .to_string();
        assert!(msg.starts_with("subject"));
        let msg = TokenRequest {
            audiences: vec![],
            ..req()
        }
        .validate(DAY)
        .unwrap_err()
        .to_string();
        assert!(msg.starts_with("audiences"));
    }

    #[test]
    fn limits_name_the_field_and_the_limit() {
        let long = "x".repeat(601);
        let mut deep = Value::from(1);
        for _ in 0..40 {
            deep = serde_json::json!({ "a": deep });
        }
        let cases: Vec<(TokenRequest, &str, &str)> = vec![
            (
                TokenRequest {
                    subject: long.clone(),
                    ..req()
                },
                "subject",
                "600",
            ),
            (
                TokenRequest {
                    audiences: vec!["a".into(); 21],
                    ..req()
                },
                "audiences",
                "20",
            ),
            (
                TokenRequest {
                    audiences: vec!["a".into(), long],
                    ..req()
                },
                "audiences[1]",
                "600",
            ),
            (
                TokenRequest {
                    extra_claims: [("blob".to_owned(), Value::from("x".repeat(17 * 1024)))]
                        .into_iter()
                        .collect(),
                    ..req()
                },
                "claims",
                "16384",
            ),
            (
                TokenRequest {
                    extra_claims: [("d".to_owned(), deep)].into_iter().collect(),
                    ..req()
                },
                "claims",
                "16",
            ),
        ];
        for (r, field, limit) in cases {
            match r.validate(DAY).unwrap_err() {
                Error::InvalidArgument { field: f, reason } => {
                    assert_eq!(f, field);
                    assert!(reason.contains(limit), "{field}: {reason}");
                }
                other => panic!("{other}"),
            }
        }
        let at_limit = TokenRequest {
            subject: "s".repeat(600),
            audiences: (0..20)
                .map(|i| format!("{i:03}{}", "a".repeat(597)))
                .collect(),
            ..req()
        };
        assert!(
            at_limit.validate(DAY).is_ok(),
            "the limits themselves are allowed"
        );
    }

    #[test]
    fn header_has_exactly_alg_kid_typ() {
        let h = URL_SAFE_NO_PAD
            .decode(encoded_header("RS256", "k1"))
            .unwrap();
        let v: Value = serde_json::from_slice(&h).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"alg": "RS256", "kid": "k1", "typ": "JWT"})
        );
    }

    #[test]
    fn encoded_claims_are_checked_before_signing() {
        let enc = |v: Value| b64url(v.to_string().as_bytes());
        let iss = "https://i.example/";
        let ok = enc(serde_json::json!({"iss": iss, "iat": 100, "exp": 700}));
        assert_eq!(check_encoded_claims(&ok, iss, DAY, 100).unwrap(), 700);
        let field =
            |text: &str, now| match check_encoded_claims(text, iss, Duration::from_secs(600), now)
                .unwrap_err()
            {
                Error::InvalidArgument { field, .. } => field,
                other => panic!("{other}"),
            };
        assert_eq!(field("%%%", 100), "claims");
        assert_eq!(field(&b64url(b"[1]"), 100), "claims");
        assert_eq!(
            field(
                &enc(serde_json::json!({"iss": "x", "iat": 1, "exp": 2})),
                100
            ),
            "claims.iss"
        );
        assert_eq!(
            field(
                &enc(serde_json::json!({"iss": iss, "iat": 100, "exp": 701})),
                100
            ),
            "claims.exp"
        );
        assert_eq!(
            field(
                &enc(serde_json::json!({"iss": iss, "iat": 150, "exp": 710})),
                100
            ),
            "claims.exp",
            "expires more than the maximum lifetime from now"
        );
        assert_eq!(
            field(&enc(serde_json::json!({"iss": iss, "exp": 1000})), 100),
            "claims.iat"
        );
        let wrong = |claims: Value| field(&enc(claims), 100);
        assert_eq!(
            wrong(serde_json::json!({"iss": iss, "iat": 900, "exp": 1000})),
            "claims.iat",
            "issued in the future"
        );
        assert_eq!(
            wrong(serde_json::json!({"iss": iss, "iat": 100, "exp": 100})),
            "claims.exp",
            "exp not after iat"
        );
        assert_eq!(
            wrong(serde_json::json!({"iss": iss, "iat": 10, "exp": 90})),
            "claims.exp",
            "already expired"
        );
        assert_eq!(
            wrong(serde_json::json!({"iss": iss, "iat": 100, "exp": 700, "nbf": 700})),
            "claims.nbf"
        );
        assert_eq!(
            wrong(serde_json::json!({"iss": iss, "iat": 100, "exp": 700, "nbf": "soon"})),
            "claims.nbf"
        );
        assert_eq!(
            wrong(serde_json::json!({"iss": iss, "iat": 100, "exp": 700, "sub": 7})),
            "claims.sub"
        );
        assert_eq!(
            wrong(serde_json::json!({"iss": iss, "iat": 100, "exp": 700, "aud": ["a", 1]})),
            "claims.aud"
        );
        // The same claim twice: refused, whichever copy would have passed.
        for text in [
            format!(r#"{{"iss":"https://evil/","iss":"{iss}","iat":100,"exp":700}}"#),
            format!(r#"{{"iss":"{iss}","iat":100,"exp":99999999999,"exp":700}}"#),
        ] {
            let err = check_encoded_claims(&b64url(text.as_bytes()), iss, DAY, 100).unwrap_err();
            assert!(err.to_string().contains("must be unique"), "{err}");
        }
        let with_all = serde_json::json!({
            "iss": iss, "iat": 100, "nbf": 100, "exp": 700, "sub": "s", "aud": ["a"], "jti": "j"
        });
        assert_eq!(
            check_encoded_claims(&enc(with_all), iss, DAY, 100).unwrap(),
            700
        );
    }

    #[test]
    fn jti_is_a_v4_uuid_and_unique() {
        let rng = SystemRandom::new();
        let a = new_jti(&rng).unwrap();
        let groups: Vec<&str> = a.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{a}"
        );
        assert!(
            groups
                .iter()
                .all(|g| g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))),
            "{a}"
        );
        assert!(groups[2].starts_with('4'), "version 4: {a}");
        assert!(
            groups[3].starts_with(['8', '9', 'a', 'b']),
            "RFC 4122 variant: {a}"
        );
        assert_ne!(a, new_jti(&rng).unwrap());
    }
}
