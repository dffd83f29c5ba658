//! Who may call what. Under mutual TLS every call passes [`AccessLayer`], which reads the verified
//! client certificate the TLS handshake left in the request, takes its identities (URI and DNS
//! subject alternative names), and checks the called RPC against an [`AccessPolicy`]:
//!
//! - no client certificate → `UNAUTHENTICATED`, for every path (health and reflection included);
//! - health and reflection → open to any client with a verified certificate;
//! - a `KeyService` RPC the certificate's identities are not granted, or any other path →
//!   `PERMISSION_DENIED`, naming the identity and the RPC.
//!
//! An allowed call carries the identity that was granted it as a [`Caller`] in its extensions, so
//! the audit trail names who signed or rotated; a refused `KeyService` call is written to the
//! audit trail too.
//!
//! The policy file is JSON: built-in roles (`signer`, `reader`, `admin`), optional custom roles,
//! and clients mapped to roles. Without a file, every verified client may call `SignToken` and
//! `GetJwks` and nothing else ([`AccessPolicy::verified_clients_sign`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::Deserialize;
use tonic::Status;
use tonic::transport::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::audit::{self, AuditRecord};
use super::caller::Caller;

/// The gRPC service whose RPCs the policy governs.
pub const KEY_SERVICE: &str = "oidckms.v1.KeyService";

/// Services any client with a verified certificate may call.
const OPEN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// One `KeyService` RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rpc {
    /// `SignToken`.
    SignToken,
    /// `RotateKeys`.
    RotateKeys,
    /// `GetJwks`.
    GetJwks,
    /// `ListKeys`.
    ListKeys,
}

impl Rpc {
    /// Every `KeyService` RPC (a unit test keeps this in step with the .proto).
    pub const ALL: [Rpc; 4] = [Rpc::SignToken, Rpc::RotateKeys, Rpc::GetJwks, Rpc::ListKeys];

    /// The method name, as in the .proto and the request path.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::SignToken => "SignToken",
            Rpc::RotateKeys => "RotateKeys",
            Rpc::GetJwks => "GetJwks",
            Rpc::ListKeys => "ListKeys",
        }
    }

    /// The RPC named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The built-in roles and what each may call.
pub fn builtin_role(name: &str) -> Option<&'static [Rpc]> {
    match name {
        "signer" => Some(&[Rpc::SignToken, Rpc::GetJwks]),
        "reader" => Some(&[Rpc::GetJwks]),
        "admin" => Some(&Rpc::ALL),
        _ => None,
    }
}

/// A policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a policy (bad JSON, an unknown field, a duplicate entry).
    #[error("{}: {source}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: serde_json::Error,
    },
    /// The file parses but says something impossible: an unknown role or RPC, a bad identity.
    #[error("{}: {what}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// The policy file's shape. Example:
///
/// ```json
/// {
///   "roles": { "rotator": ["RotateKeys", "ListKeys", "GetJwks"] },
///   "clients": {
///     "spiffe://cluster.local/ns/kube-system/sa/kube-apiserver": ["signer"],
///     "ops.example": ["admin"]
///   }
/// }
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    roles: UniqueMap<Vec<String>>,
    clients: UniqueMap<Vec<String>>,
}

/// A JSON object read in order that refuses a key given twice (serde_json's maps keep the last
/// silently, which in a policy would hide a grant or a revocation).
#[derive(Debug)]
struct UniqueMap<V>(Vec<(String, V)>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        UniqueMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut seen = BTreeSet::new();
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, V>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "\"{key}\" is given twice"
                        )));
                    }
                    entries.push((key, value));
                }
                Ok(UniqueMap(entries))
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// A client identity as the policy names it: a URI SAN (`spiffe://…`, `urn:…`: compared byte for
/// byte) or a DNS SAN (compared without regard to ASCII case, as DNS names are). The kind is part
/// of the identity: a URI SAN never matches a DNS entry or the other way round, so a CA that may
/// only issue names under some DNS domain cannot grant a URI identity by spelling it as a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum IdentityKey {
    Uri(String),
    Dns(String),
}

impl IdentityKey {
    fn uri(uri: &str) -> IdentityKey {
        IdentityKey::Uri(uri.to_owned())
    }

    fn dns(name: &str) -> IdentityKey {
        IdentityKey::Dns(name.to_ascii_lowercase())
    }

    /// Parses an identity written in the policy: with a `:` (which no DNS name holds) it is a
    /// URI, otherwise a DNS name.
    fn parse(text: &str) -> Result<IdentityKey, String> {
        if text.is_empty() {
            return Err("a client identity is empty".into());
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "client \"{text}\": an identity holds no spaces or control characters"
            ));
        }
        if text.contains('*') {
            return Err(format!(
                "client \"{text}\": wildcards are not supported; name each identity exactly"
            ));
        }
        if text.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "client \"{text}\": IP address SANs are not identities here; name a URI or DNS SAN"
            ));
        }
        if text.contains(':') {
            return Ok(IdentityKey::uri(text));
        }
        if text.ends_with('.') {
            return Err(format!(
                "client \"{text}\": write the DNS name without its trailing dot, as certificates do"
            ));
        }
        Ok(IdentityKey::dns(text))
    }
}

/// What a client certificate says about who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// URI SANs, in certificate order.
    pub uris: Vec<String>,
    /// DNS SANs, in certificate order.
    pub dns_names: Vec<String>,
    /// The subject DN, for naming a certificate that has no SAN.
    pub subject: String,
}

impl ClientIdentity {
    /// Reads the SANs and subject of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<ClientIdentity, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let mut identity = ClientIdentity {
            uris: Vec::new(),
            dns_names: Vec::new(),
            subject: cert.subject().to_string(),
        };
        if let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => identity.uris.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => identity.dns_names.push((*dns).to_owned()),
                    _ => {}
                }
            }
        }
        Ok(identity)
    }

    /// The SANs with their policy keys, URIs first.
    fn names(&self) -> impl Iterator<Item = (&str, IdentityKey)> {
        let uris = self.uris.iter().map(|u| (u.as_str(), IdentityKey::uri(u)));
        let dns = self
            .dns_names
            .iter()
            .map(|d| (d.as_str(), IdentityKey::dns(d)));
        uris.chain(dns)
    }

    /// How logs and the audit trail name the holder: the first URI SAN, else the first DNS SAN,
    /// else the subject.
    pub fn display_name(&self) -> String {
        match self.uris.first().or(self.dns_names.first()) {
            Some(name) => printable(name),
            None => format!(
                "subject \"{}\" (no DNS or URI SAN)",
                printable(&self.subject)
            ),
        }
    }
}

/// A certificate's name as logs may show it: control characters (a newline that would start a
/// forged log line, a NUL) escaped. Matching uses the name as it is.
fn printable(name: &str) -> String {
    if !name.chars().any(char::is_control) {
        return name.to_owned();
    }
    name.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Which client may call which `KeyService` RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// The RPCs each named client may call.
    clients: BTreeMap<IdentityKey, BTreeSet<Rpc>>,
    /// The RPCs any verified client may call, named or not.
    any_client: BTreeSet<Rpc>,
}

impl AccessPolicy {
    /// The policy without a file: every client with a verified certificate may call `SignToken`
    /// and `GetJwks`, and nobody may call `RotateKeys` or `ListKeys` (least privilege; rotation
    /// stays with the schedule).
    pub fn verified_clients_sign() -> AccessPolicy {
        AccessPolicy {
            clients: BTreeMap::new(),
            any_client: [Rpc::SignToken, Rpc::GetJwks].into(),
        }
    }

    /// Reads a policy file. Only the clients it names may call anything.
    pub fn load(path: &Path) -> Result<AccessPolicy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ParseError::Syntax(source) => PolicyError::Syntax {
                path: path.to_path_buf(),
                source,
            },
            ParseError::Invalid(what) => PolicyError::Invalid {
                path: path.to_path_buf(),
                what,
            },
        })
    }

    fn from_json(text: &str) -> Result<AccessPolicy, ParseError> {
        let invalid = ParseError::Invalid;
        // serde would read a top-level array positionally and name its own types in errors.
        if !text
            .trim_start()
            .trim_start_matches('\u{feff}')
            .starts_with('{')
        {
            return Err(invalid(
                "the policy is a JSON object: {\"roles\": {...}, \"clients\": {...}}".into(),
            ));
        }
        let file: PolicyFile = serde_json::from_str(text).map_err(ParseError::Syntax)?;
        let mut roles: BTreeMap<&str, BTreeSet<Rpc>> = BTreeMap::new();
        for (name, rpcs) in &file.roles.0 {
            if builtin_role(&name.to_ascii_lowercase()).is_some() {
                return Err(invalid(format!(
                    "role \"{name}\" is (or differs only in case from) a built-in role (signer, \
                     reader, admin), which cannot be redefined"
                )));
            }
            let rpcs = rpcs
                .iter()
                .map(|r| {
                    Rpc::from_name(r).ok_or_else(|| {
                        invalid(format!(
                            "role \"{name}\": unknown RPC \"{r}\" (known: {})",
                            rpc_list(&Rpc::ALL)
                        ))
                    })
                })
                .collect::<Result<BTreeSet<Rpc>, _>>()?;
            roles.insert(name, rpcs);
        }
        if file.clients.0.is_empty() {
            return Err(invalid(
                "\"clients\" names nobody, so no call would be allowed".into(),
            ));
        }
        let mut clients = BTreeMap::new();
        for (identity, role_names) in &file.clients.0 {
            let key = IdentityKey::parse(identity).map_err(invalid)?;
            let mut rpcs = BTreeSet::new();
            for role in role_names {
                if let Some(builtin) = builtin_role(role) {
                    rpcs.extend(builtin.iter().copied());
                } else if let Some(custom) = roles.get(role.as_str()) {
                    rpcs.extend(custom.iter().copied());
                } else {
                    return Err(invalid(format!(
                        "client \"{identity}\": unknown role \"{role}\" (built in: signer, \
                         reader, admin; or define it under \"roles\")"
                    )));
                }
            }
            if clients.insert(key, rpcs).is_some() {
                return Err(invalid(format!(
                    "client \"{identity}\" is given twice (DNS names compare without case)"
                )));
            }
        }
        Ok(AccessPolicy {
            clients,
            any_client: BTreeSet::new(),
        })
    }

    /// Decides a call to `path` (`/package.Service/Method`) by the holder of `peer_certs` (the
    /// verified chain, leaf first; `None` without a client certificate) from `remote`.
    pub fn authorize(
        &self,
        path: &str,
        peer_certs: Option<&[CertificateDer<'_>]>,
        remote: Option<SocketAddr>,
    ) -> Result<Caller, Denial> {
        let Some(leaf) = peer_certs.and_then(<[_]>::first) else {
            let caller = match remote {
                Some(addr) => Caller(format!("unauthenticated@{addr}")),
                None => Caller("unauthenticated@local".into()),
            };
            return Err(Denial {
                caller,
                status: Status::unauthenticated(format!(
                    "{path} needs a client certificate issued by this service's client CA \
                     (--tls-client-ca); none was presented (clients such as grpcurl leave out a \
                     certificate that this CA did not issue)"
                )),
            });
        };
        let identity = match ClientIdentity::from_der(leaf) {
            Ok(identity) => identity,
            Err(e) => {
                return Err(Denial {
                    caller: Caller("unreadable-certificate".into()),
                    status: Status::permission_denied(format!(
                        "the client certificate cannot be read ({e}); it may not call {path}"
                    )),
                });
            }
        };
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", ""));
        if OPEN_SERVICES.contains(&service) {
            return Ok(Caller(identity.display_name()));
        }
        let rpc = (service == KEY_SERVICE)
            .then(|| Rpc::from_name(method))
            .flatten();
        if let Some(rpc) = rpc {
            // The identity that grants the call is the one the audit trail records.
            if let Some((name, _)) = identity
                .names()
                .find(|(_, key)| self.clients.get(key).is_some_and(|r| r.contains(&rpc)))
            {
                return Ok(Caller(printable(name)));
            }
            if self.any_client.contains(&rpc) {
                return Ok(Caller(identity.display_name()));
            }
        }
        let mut named = identity.display_name();
        let others: Vec<String> = identity
            .names()
            .skip(1)
            .map(|(n, _)| printable(n))
            .collect();
        if !others.is_empty() {
            named = format!("{named} (also {})", others.join(", "));
        }
        let what = match path.trim_start_matches('/') {
            "" => "(no path)",
            p => p,
        };
        Err(Denial {
            caller: Caller(identity.display_name()),
            status: Status::permission_denied(format!(
                "client {named} is not allowed to call {what}"
            )),
        })
    }
}

#[derive(Debug)]
enum ParseError {
    Syntax(serde_json::Error),
    Invalid(String),
}

fn rpc_list(rpcs: &[Rpc]) -> String {
    rpcs.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
}

/// A refused call: who asked, and the status they get.
#[derive(Debug)]
pub struct Denial {
    /// Who was refused, for the audit trail.
    pub caller: Caller,
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`, with a message naming the identity and the RPC.
    pub status: Status,
}

/// A tower layer that checks every call against an [`AccessPolicy`]; see the module docs.
#[derive(Debug, Clone)]
pub struct AccessLayer {
    policy: Arc<AccessPolicy>,
}

impl AccessLayer {
    /// A layer enforcing `policy`.
    pub fn new(policy: Arc<AccessPolicy>) -> Self {
        AccessLayer { policy }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessService<S>;

    fn layer(&self, inner: S) -> AccessService<S> {
        AccessService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AccessLayer`] makes: answers refused calls itself, passes the rest on with a
/// [`Caller`] in their extensions.
#[derive(Debug, Clone)]
pub struct AccessService<S> {
    inner: S,
    policy: Arc<AccessPolicy>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AccessService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // tonic puts the TLS session's connect info (with the verified chain) into every request
        // before any layer runs.
        let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let certs = tls.and_then(TlsConnectInfo::peer_certs);
        let remote = tls.and_then(|t| t.get_ref().remote_addr());
        let path = request.uri().path();
        match self
            .policy
            .authorize(path, certs.as_deref().map(Vec::as_slice), remote)
        {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(denial) => {
                if let Some(rpc) = path.strip_prefix('/')
                    && rpc.starts_with(KEY_SERVICE)
                {
                    audit::record(
                        &denial.caller,
                        &AuditRecord {
                            rpc,
                            ..AuditRecord::default()
                        },
                        Err(denial.status.code()),
                    );
                }
                tracing::warn!(caller = %denial.caller, path, "refused: {}", denial.status.message());
                let response = denial.status.into_http::<ResBody>();
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use rcgen::{CertificateParams, KeyPair, SanType};
    use tonic::Code;

    fn cert(sans: &[SanType]) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans.to_vec();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    const APISERVER: &str = "spiffe://cluster.local/ns/kube-system/sa/kube-apiserver";

    fn policy() -> AccessPolicy {
        AccessPolicy::from_json(&format!(
            r#"{{
                "roles": {{ "auditor": ["ListKeys"] }},
                "clients": {{
                    "{APISERVER}": ["signer"],
                    "Ops.Example": ["admin"],
                    "audit.example": ["auditor", "reader"]
                }}
            }}"#
        ))
        .expect("policy parses")
    }

    fn call(p: &AccessPolicy, rpc: &str, c: &CertificateDer<'static>) -> Result<Caller, Code> {
        p.authorize(
            &format!("/{KEY_SERVICE}/{rpc}"),
            Some(std::slice::from_ref(c)),
            None,
        )
        .map_err(|d| d.status.code())
    }

    #[test]
    fn roles_grant_exactly_their_rpcs() {
        let p = policy();
        let apiserver = cert(&[uri(APISERVER)]);
        assert_eq!(
            call(&p, "SignToken", &apiserver),
            Ok(Caller(APISERVER.into()))
        );
        assert!(call(&p, "GetJwks", &apiserver).is_ok());
        assert_eq!(
            call(&p, "RotateKeys", &apiserver),
            Err(Code::PermissionDenied)
        );
        assert_eq!(
            call(&p, "ListKeys", &apiserver),
            Err(Code::PermissionDenied)
        );

        // DNS names compare without case.
        let ops = cert(&[dns("ops.EXAMPLE")]);
        for rpc in Rpc::ALL {
            assert_eq!(call(&p, rpc.name(), &ops), Ok(Caller("ops.EXAMPLE".into())));
        }
        let auditor = cert(&[dns("audit.example")]);
        assert!(call(&p, "ListKeys", &auditor).is_ok());
        assert!(call(&p, "GetJwks", &auditor).is_ok());
        assert_eq!(call(&p, "SignToken", &auditor), Err(Code::PermissionDenied));
    }

    #[test]
    fn the_granting_san_is_the_caller_and_denials_name_identity_and_rpc() {
        let p = policy();
        let both = cert(&[uri("spiffe://cluster.local/ns/x/sa/y"), dns("ops.example")]);
        assert_eq!(
            call(&p, "RotateKeys", &both),
            Ok(Caller("ops.example".into()))
        );
        let stranger = cert(&[uri("spiffe://elsewhere/sa/z"), dns("z.example")]);
        let denial = p
            .authorize(
                "/oidckms.v1.KeyService/SignToken",
                Some(std::slice::from_ref(&stranger)),
                None,
            )
            .unwrap_err();
        assert_eq!(denial.status.code(), Code::PermissionDenied);
        assert_eq!(
            denial.status.message(),
            "client spiffe://elsewhere/sa/z (also z.example) is not allowed to call \
             oidckms.v1.KeyService/SignToken"
        );
        assert_eq!(denial.caller, Caller("spiffe://elsewhere/sa/z".into()));
        // A certificate without a SAN is named by its subject.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bare");
        let bare = params
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone();
        let denial = p
            .authorize(
                "/oidckms.v1.KeyService/GetJwks",
                Some(std::slice::from_ref(&bare)),
                None,
            )
            .unwrap_err();
        assert!(denial.status.message().contains("CN=bare"), "{denial:?}");
    }

    #[test]
    fn without_a_certificate_everything_is_unauthenticated() {
        let p = AccessPolicy::verified_clients_sign();
        for path in [
            "/oidckms.v1.KeyService/GetJwks",
            "/grpc.health.v1.Health/Check",
            "/nope",
        ] {
            let denial = p
                .authorize(path, None, Some("10.0.0.1:5000".parse().unwrap()))
                .unwrap_err();
            assert_eq!(denial.status.code(), Code::Unauthenticated, "{path}");
            assert_eq!(
                denial.caller,
                Caller("unauthenticated@10.0.0.1:5000".into())
            );
            let empty: &[CertificateDer<'_>] = &[];
            let denial = p.authorize(path, Some(empty), None).unwrap_err();
            assert_eq!(denial.status.code(), Code::Unauthenticated, "{path}");
        }
    }

    #[test]
    fn default_policy_lets_verified_clients_sign_only() {
        let p = AccessPolicy::verified_clients_sign();
        let anyone = cert(&[dns("anyone.example")]);
        assert!(call(&p, "SignToken", &anyone).is_ok());
        assert!(call(&p, "GetJwks", &anyone).is_ok());
        assert_eq!(call(&p, "RotateKeys", &anyone), Err(Code::PermissionDenied));
        assert_eq!(call(&p, "ListKeys", &anyone), Err(Code::PermissionDenied));
    }

    #[test]
    fn health_and_reflection_are_open_unknown_paths_are_not() {
        let p = policy();
        let stranger = cert(&[dns("stranger.example")]);
        let certs = Some(std::slice::from_ref(&stranger));
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(p.authorize(path, certs, None).is_ok(), "{path}");
        }
        let ops = cert(&[dns("ops.example")]);
        for path in [
            "/oidckms.v1.KeyService/Unknown",
            "/other.Service/SignToken",
            "/",
            "",
        ] {
            let denial = p
                .authorize(path, Some(std::slice::from_ref(&ops)), None)
                .unwrap_err();
            assert_eq!(denial.status.code(), Code::PermissionDenied, "{path}");
        }
    }

    #[test]
    fn bad_policies_are_refused_with_the_reason() {
        let bad = |json: &str| match AccessPolicy::from_json(json) {
            Ok(_) => panic!("accepted: {json}"),
            Err(ParseError::Syntax(e)) => e.to_string(),
            Err(ParseError::Invalid(what)) => what,
        };
        assert!(bad(r#"{"clients": {"a.example": ["root"]}}"#).contains("unknown role \"root\""));
        assert!(bad(r#"{"clients": {}}"#).contains("names nobody"));
        assert!(
            bad(r#"{"clients": {"a.example": ["admin"], "a.example": ["reader"]}}"#)
                .contains("given twice")
        );
        assert!(
            bad(r#"{"clients": {"A.example": ["admin"], "a.example": ["reader"]}}"#)
                .contains("given twice")
        );
        assert!(
            bad(r#"{"roles": {"x": ["Sign"]}, "clients": {"a.example": ["x"]}}"#)
                .contains("unknown RPC \"Sign\"")
        );
        assert!(
            bad(r#"{"roles": {"admin": ["GetJwks"]}, "clients": {"a.example": ["admin"]}}"#)
                .contains("built-in role")
        );
        assert!(bad(r#"{"clients": {"*.example": ["admin"]}}"#).contains("wildcards"));
        assert!(bad(r#"{"clients": {"": ["admin"]}}"#).contains("empty"));
        assert!(bad(r#"{"client": {"a.example": ["admin"]}}"#).contains("unknown field"));
        assert!(bad(r#"{"clients": {"a.example": "admin"}}"#).contains("expected a sequence"));
        assert!(bad(r#"{"clients": {"127.0.0.1": ["admin"]}}"#).contains("IP address"));
        assert!(bad(r#"{"clients": {"::1": ["admin"]}}"#).contains("IP address"));
        assert!(bad(r#"{"clients": {"a.example.": ["admin"]}}"#).contains("trailing dot"));
        assert!(
            bad(r#"{"roles": {"Signer": ["RotateKeys"]}, "clients": {"a.example": ["Signer"]}}"#)
                .contains("built-in role")
        );
        assert!(bad(r#"[{}, {"a.example": ["admin"]}]"#).contains("a JSON object"));
    }

    #[test]
    fn names_with_control_characters_are_escaped_where_they_are_shown() {
        let p = policy();
        let forged = "x.example\n2026-01-01T00:00:00Z INFO audit: caller=ops.example outcome=ok";
        let c = cert(&[dns(forged)]);
        let denial = p
            .authorize(
                &format!("/{KEY_SERVICE}/RotateKeys"),
                Some(std::slice::from_ref(&c)),
                None,
            )
            .unwrap_err();
        assert!(!denial.caller.0.contains('\n'), "{:?}", denial.caller);
        assert!(
            denial.caller.0.starts_with("x.example\\n2026"),
            "{:?}",
            denial.caller
        );
        assert!(
            !denial.status.message().contains('\n'),
            "{}",
            denial.status.message()
        );
    }

    #[test]
    fn uri_and_dns_names_never_stand_for_each_other() {
        let p = policy();
        // The admin's DNS name written as a URI SAN, and the API server's URI written as a DNS SAN
        // (a CA constrained to some DNS domain may still issue any URI SAN).
        let uri_as_dns = cert(&[uri("ops.example")]);
        assert_eq!(
            call(&p, "ListKeys", &uri_as_dns),
            Err(Code::PermissionDenied)
        );
        let dns_as_uri = cert(&[dns(APISERVER)]);
        assert_eq!(
            call(&p, "SignToken", &dns_as_uri),
            Err(Code::PermissionDenied)
        );
        // URIs without "://" are URIs too, compared byte for byte.
        let urn =
            AccessPolicy::from_json(r#"{"clients": {"urn:Example:Ops": ["admin"]}}"#).unwrap();
        assert!(call(&urn, "ListKeys", &cert(&[uri("urn:Example:Ops")])).is_ok());
        assert_eq!(
            call(&urn, "ListKeys", &cert(&[uri("urn:example:ops")])),
            Err(Code::PermissionDenied)
        );
    }

    #[test]
    fn rpc_list_matches_the_proto() {
        let set =
            prost_types::FileDescriptorSet::decode(super::super::pb::FILE_DESCRIPTOR_SET).unwrap();
        let service = set
            .file
            .iter()
            .filter(|f| f.package() == "oidckms.v1")
            .flat_map(|f| f.service.iter())
            .find(|s| format!("oidckms.v1.{}", s.name()) == KEY_SERVICE)
            .expect("KeyService in the descriptor set");
        let mut in_proto: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        let mut ours: Vec<&str> = Rpc::ALL.iter().map(|r| r.name()).collect();
        in_proto.sort_unstable();
        ours.sort_unstable();
        assert_eq!(in_proto, ours, "add new RPCs to Rpc::ALL and to a role");
    }
}
