//! The audit trail: one record per signing or rotation call, written through `tracing` under the
//! target `audit` (so it can be routed apart from other logs). A record holds the time, the caller,
//! the RPC, the key, the token's `sub`, `aud`, `jti` and `exp`, and the outcome — never the token
//! and never key material.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use super::caller::Caller;

/// What an audited call was about.
#[derive(Debug, Default)]
pub struct AuditRecord<'a> {
    /// The RPC, e.g. `oidckms.v1.KeyService/SignToken`.
    pub rpc: &'a str,
    /// The key used or made.
    pub kid: Option<&'a str>,
    /// The token's subject.
    pub sub: Option<&'a str>,
    /// The token's audiences, as a JSON array (an audience may itself hold a comma).
    pub aud: Option<String>,
    /// The token's id.
    pub jti: Option<&'a str>,
    /// The token's expiry, unix seconds.
    pub exp: Option<i64>,
}

/// Writes one audit record. `outcome` is `ok` or the status code of the failure, named as gRPC
/// names it (`INVALID_ARGUMENT`), as in the metrics and the `rpc finished` lines.
pub fn record(caller: &Caller, rec: &AuditRecord<'_>, outcome: Result<(), tonic::Code>) {
    let outcome = match outcome {
        Ok(()) => "ok",
        Err(code) => super::instrument::code_name(code as i32),
    };
    tracing::info!(
        target: "audit",
        caller = %caller,
        rpc = rec.rpc,
        kid = rec.kid.unwrap_or(""),
        sub = rec.sub.unwrap_or(""),
        aud = rec.aud.as_deref().unwrap_or(""),
        jti = rec.jti.unwrap_or(""),
        exp = rec.exp.unwrap_or(0),
        outcome,
        "audit"
    );
}

/// The audit form of a token's audiences: a JSON array, so `["a,b"]` and `["a","b"]` differ.
pub fn audiences<S: serde::Serialize>(list: &[S]) -> String {
    serde_json::to_string(list).unwrap_or_default()
}

/// The audit facts of caller-encoded claims (the Kubernetes signer), read best-effort: claims that
/// do not decode are refused before signing anyway, and then only the outcome matters.
pub fn claims_facts(
    encoded: &str,
) -> (Option<String>, Option<String>, Option<String>, Option<i64>) {
    let Some(claims) = URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return (None, None, None, None);
    };
    let text = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    let aud = match claims.get("aud") {
        Some(Value::String(s)) => Some(audiences(std::slice::from_ref(s))),
        Some(Value::Array(a)) => Some(audiences(
            &a.iter().filter_map(Value::as_str).collect::<Vec<_>>(),
        )),
        _ => None,
    };
    (
        text("sub"),
        aud,
        text("jti"),
        claims.get("exp").and_then(Value::as_i64),
    )
}
