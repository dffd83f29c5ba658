//! `oidckms.v1.KeyService`: decode the request, call the key manager, encode the answer.

use std::time::Duration;

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use tonic::{Request, Response, Status};

use super::audit::{self, AuditRecord};
use super::caller::Caller;
use super::deadline::deadline_of;
use super::pb;
use crate::clock::Timestamp;
use crate::error::Error;
use crate::jwk::Jwk;
use crate::key_manager::{KeyManager, SignedToken};
use crate::lifecycle::{KeyRecord, KeyState};
use crate::token::{MAX_CLAIMS_DEPTH, TokenRequest};

/// The `KeyService` gRPC service.
#[derive(Debug, Clone)]
pub struct KeyServiceApi {
    manager: KeyManager,
}

impl KeyServiceApi {
    /// A service over `manager`.
    pub fn new(manager: KeyManager) -> Self {
        KeyServiceApi { manager }
    }

    async fn sign(
        &self,
        r: pb::SignTokenRequest,
        deadline: Option<std::time::Instant>,
    ) -> Result<SignedToken, Status> {
        let lifetime = match r.lifetime_seconds {
            0 => None,
            n => Some(seconds("lifetime_seconds", n)?),
        };
        let extra_claims = match r.claims {
            Some(s) => struct_to_map(ClaimPath::Root("claims"), s, 1)?,
            None => Map::new(),
        };
        let request = TokenRequest {
            subject: r.subject,
            audiences: r.audiences,
            lifetime,
            extra_claims,
        };
        let started = std::time::Instant::now();
        let signed = self.manager.sign_token(request, deadline).await?;
        crate::metrics::record_signature(signed.alg, &signed.kid, started.elapsed());
        Ok(signed)
    }
}

/// Where a value sits in the request's `claims`, for error messages (`claims.a.b[2]`); built
/// as the conversion descends, and only formatted when something is refused.
#[derive(Clone, Copy)]
enum ClaimPath<'a> {
    Root(&'a str),
    Key(&'a ClaimPath<'a>, &'a str),
    Index(&'a ClaimPath<'a>, usize),
}

impl std::fmt::Display for ClaimPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClaimPath::Root(name) => f.write_str(name),
            ClaimPath::Key(parent, key) => write!(f, "{parent}.{key}"),
            ClaimPath::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Converts a protobuf `Value` to JSON. Whole numbers become JSON integers (so a claim such as
/// `{"n": 5}` stays `5`, not `5.0`); non-finite numbers are refused.
fn to_json(path: ClaimPath<'_>, value: prost_types::Value, depth: usize) -> Result<Value, Error> {
    if depth > MAX_CLAIMS_DEPTH {
        return Err(Error::invalid(
            "claims",
            format!("nested deeper than {MAX_CLAIMS_DEPTH} levels"),
        ));
    }
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
                Value::Number(Number::from(n as i64))
            } else {
                Value::Number(
                    Number::from_f64(n).ok_or_else(|| {
                        Error::invalid(path.to_string(), "numbers must be finite")
                    })?,
                )
            }
        }
        Some(Kind::StructValue(s)) => Value::Object(struct_to_map(path, s, depth + 1)?),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| to_json(ClaimPath::Index(&path, i), v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn struct_to_map(
    path: ClaimPath<'_>,
    s: prost_types::Struct,
    depth: usize,
) -> Result<Map<String, Value>, Error> {
    s.fields
        .into_iter()
        .map(|(k, v)| {
            let value = to_json(ClaimPath::Key(&path, &k), v, depth)?;
            Ok((k, value))
        })
        .collect()
}

fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_secs(),
        nanos: (t.as_millis().rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn key_state(state: KeyState) -> pb::KeyState {
    match state {
        KeyState::Next => pb::KeyState::Next,
        KeyState::Active => pb::KeyState::Active,
        KeyState::Previous => pb::KeyState::Previous,
        KeyState::Retired => pb::KeyState::Retired,
    }
}

fn key_info((record, state): &(KeyRecord, KeyState)) -> pb::KeyInfo {
    pb::KeyInfo {
        key_id: record.kid.clone(),
        algorithm: record.spec.jws_algorithm().into(),
        state: key_state(*state).into(),
        created_at: Some(timestamp(record.created_at)),
        activated_at: Some(timestamp(record.activates_at)),
        signs_until: record.signs_until.map(timestamp),
        retires_at: record.retires_at.map(timestamp),
        bits: record.spec.bits(),
    }
}

fn jwk(j: Jwk) -> pb::Jwk {
    pb::Jwk {
        kty: j.kty,
        kid: j.kid,
        r#use: j.use_,
        alg: j.alg,
        n: j.n.unwrap_or_default(),
        e: j.e.unwrap_or_default(),
        crv: j.crv.unwrap_or_default(),
        x: j.x.unwrap_or_default(),
        y: j.y.unwrap_or_default(),
    }
}

fn seconds(field: &str, value: i64) -> Result<Duration, Error> {
    u64::try_from(value)
        .map(Duration::from_secs)
        .map_err(|_| Error::invalid(field, format!("{value} is negative")))
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyServiceApi {
    async fn sign_token(
        &self,
        request: Request<pb::SignTokenRequest>,
    ) -> Result<Response<pb::SignTokenResponse>, Status> {
        let caller = Caller::of(&request);
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        let audit_aud = audit::audiences(&r.audiences);
        let audit_sub = r.subject.clone();
        let mut audit = AuditRecord {
            rpc: "oidckms.v1.KeyService/SignToken",
            sub: Some(&audit_sub),
            aud: Some(audit_aud),
            ..AuditRecord::default()
        };
        let result = self.sign(r, deadline).await;
        match &result {
            Ok(t) => {
                audit.kid = Some(&t.kid);
                audit.jti = Some(&t.jti);
                audit.exp = Some(t.expires_at);
                audit::record(&caller, &audit, Ok(()));
            }
            Err(status) => audit::record(&caller, &audit, Err(status.code())),
        }
        let signed = result?;
        Ok(Response::new(pb::SignTokenResponse {
            token: signed.token,
            key_id: signed.kid,
            expires_at: signed.expires_at,
            token_id: signed.jti,
        }))
    }

    async fn rotate_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        let caller = Caller::of(&request);
        let mut audit = AuditRecord {
            rpc: "oidckms.v1.KeyService/RotateKeys",
            ..AuditRecord::default()
        };
        let result = match seconds(
            "prepublish_seconds",
            request.into_inner().prepublish_seconds,
        ) {
            Ok(prepublish) => self.manager.rotate(prepublish).await.map_err(Status::from),
            Err(e) => Err(Status::from(e)),
        };
        match &result {
            Ok(r) => {
                audit.kid = Some(&r.new_kid);
                audit::record(&caller, &audit, Ok(()));
            }
            Err(status) => audit::record(&caller, &audit, Err(status.code())),
        }
        let rotation = result?;
        Ok(Response::new(pb::RotateKeysResponse {
            active_key_id: rotation.active_kid,
            keys: rotation.keys.iter().map(key_info).collect(),
            new_key_id: rotation.new_kid,
        }))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let published = self.manager.published();
        Ok(Response::new(pb::GetJwksResponse {
            issuer: published.issuer,
            keys: published.keys.into_iter().map(jwk).collect(),
            cache_max_age_seconds: published.cache_max_age.as_secs() as i64,
        }))
    }

    async fn list_keys(
        &self,
        _request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let (keys, active) = self.manager.list_keys();
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.iter().map(key_info).collect(),
            active_key_id: active.unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: f64) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }

    #[test]
    fn whole_numbers_stay_integers_and_non_finite_is_refused() {
        let root = ClaimPath::Root("claims");
        assert_eq!(to_json(root, num(5.0), 1).unwrap(), serde_json::json!(5));
        assert_eq!(to_json(root, num(0.5), 1).unwrap(), serde_json::json!(0.5));
        let inner = ClaimPath::Index(&ClaimPath::Key(&root, "x"), 2);
        let err = to_json(inner, num(f64::NAN), 1).unwrap_err().to_string();
        assert!(err.starts_with("claims.x[2]:"), "{err}");
    }
}
