//! Who is calling: the identity the transport established (a client certificate's SAN under mutual
//! TLS), carried in the request's extensions for authorization and the audit trail.

/// The caller's identity, as the access layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

impl Caller {
    /// The identity recorded when no authentication is configured (plaintext on loopback or a
    /// Unix socket): the transport's peer, or `local`.
    pub fn unauthenticated<T>(request: &tonic::Request<T>) -> Caller {
        match request.remote_addr() {
            Some(addr) => Caller(format!("unauthenticated@{addr}")),
            None => Caller("unauthenticated@local".into()),
        }
    }

    /// The caller of `request`: the identity the access layer put in its extensions, or the
    /// unauthenticated peer.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller::unauthenticated(request))
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
