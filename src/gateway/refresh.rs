//! Keeping the gateway's key set current: poll `GetJwks`, render, swap. While the key service cannot
//! be reached, the last good set is served for `max_stale`, then nothing (503): never an empty set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::GatewayConfig;
use super::documents::Documents;
use crate::grpc::client::connection_hint;
use crate::grpc::pb::{self, key_service_client::KeyServiceClient};
use crate::jwk::Jwk;
use crate::shutdown::Shutdown;

/// What the HTTP side reads: the current documents and whether the last refresh worked.
#[derive(Debug)]
pub struct GatewayState {
    /// The last good documents and when they were fetched. Swapped whole by the refresher.
    current: RwLock<Option<(Arc<Documents>, Instant)>>,
    refresh_ok: AtomicBool,
    max_stale: Duration,
}

impl GatewayState {
    /// Empty state: nothing to serve until the first refresh.
    pub fn new(max_stale: Duration) -> Self {
        GatewayState {
            current: RwLock::new(None),
            refresh_ok: AtomicBool::new(false),
            max_stale,
        }
    }

    /// The documents to serve, unless there are none or they are older than `max_stale`.
    pub fn documents(&self) -> Option<Arc<Documents>> {
        self.documents_and_age().map(|(d, _)| d)
    }

    /// The documents to serve and how long ago they were fetched.
    pub fn documents_and_age(&self) -> Option<(Arc<Documents>, Duration)> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        let (docs, at) = current.as_ref()?;
        let age = at.elapsed();
        (age <= self.max_stale).then(|| (Arc::clone(docs), age))
    }

    /// The last good documents however old: what paths the gateway serves, for labelling.
    pub fn last_documents(&self) -> Option<Arc<Documents>> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current.as_ref().map(|(d, _)| Arc::clone(d))
    }

    /// How long ago the key set was last refreshed, and how many keys it holds; `None` before
    /// the first refresh.
    pub fn last_refresh(&self) -> Option<(Duration, usize)> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .map(|(docs, at)| (at.elapsed(), docs.kids.len()))
    }

    /// Ready: the last refresh worked and there is a key set to serve.
    pub fn is_ready(&self) -> bool {
        self.refresh_ok.load(Ordering::Relaxed) && self.documents().is_some()
    }

    fn store(&self, docs: Documents) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) =
            Some((Arc::new(docs), Instant::now()));
        self.refresh_ok.store(true, Ordering::Relaxed);
    }

    fn mark_failed(&self) -> bool {
        self.refresh_ok.swap(false, Ordering::Relaxed)
    }
}

/// Polls the key service.
#[derive(Debug)]
pub struct Refresher {
    client: KeyServiceClient<Channel>,
    url: String,
    interval: Duration,
    state: Arc<GatewayState>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(1);

fn jwk(k: pb::Jwk) -> Jwk {
    let opt = |s: String| (!s.is_empty()).then_some(s);
    Jwk {
        kty: k.kty,
        use_: k.r#use,
        kid: k.kid,
        alg: k.alg,
        n: opt(k.n),
        e: opt(k.e),
        crv: opt(k.crv),
        x: opt(k.x),
        y: opt(k.y),
    }
}

impl Refresher {
    /// A refresher for `config.kms`; connects lazily, so the key service may start later.
    pub fn new(config: &GatewayConfig, state: Arc<GatewayState>) -> Self {
        let endpoint = config
            .kms
            .clone()
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        Refresher {
            url: endpoint.uri().to_string(),
            client: KeyServiceClient::new(endpoint.connect_lazy()),
            interval: config.refresh_interval,
            state,
        }
    }

    /// One refresh; returns how long the key service lets relying parties cache the set.
    async fn refresh(&mut self) -> Result<Duration, String> {
        let answer = self
            .client
            .get_jwks(pb::GetJwksRequest {})
            .await
            .map_err(|s| {
                let hint = connection_hint(&s, &self.url, super::KMS_TLS_SETTINGS);
                format!("{}: {}{hint}", s.code(), s.message())
            })?
            .into_inner();
        let hint = Duration::from_secs(answer.cache_max_age_seconds.max(1) as u64);
        let keys = answer.keys.into_iter().map(jwk).collect();
        let docs = Documents::render(&answer.issuer, keys, hint).map_err(|e| e.to_string())?;
        self.state.store(docs);
        Ok(hint)
    }

    /// Refreshes until shutdown: every `interval`, or sooner when the key service's cache hint is
    /// shorter; every second while it cannot be reached.
    pub async fn run(mut self, shutdown: Shutdown) {
        let stop = shutdown.wait();
        tokio::pin!(stop);
        let mut failing = false;
        let mut told_stale = false;
        let mut fetched = false;
        loop {
            let wait = match self.refresh().await {
                Ok(hint) => {
                    if failing && fetched {
                        tracing::info!(kms = %self.url, "key service reachable again; key set refreshed");
                    } else if failing {
                        tracing::info!(kms = %self.url, "key service reachable; first key set fetched");
                    }
                    fetched = true;
                    failing = false;
                    told_stale = false;
                    self.interval.min(hint)
                }
                Err(e) => {
                    crate::metrics::record_refresh_error();
                    if self.state.mark_failed() || !failing {
                        if self.state.last_refresh().is_some() {
                            tracing::warn!(kms = %self.url, error = %e, "cannot refresh the key set; serving the last good one until it is older than --max-stale");
                        } else {
                            tracing::warn!(kms = %self.url, error = %e, "cannot fetch the key set; nothing to serve until the key service answers");
                        }
                    }
                    if !told_stale
                        && self.state.last_refresh().is_some()
                        && self.state.documents().is_none()
                    {
                        tracing::warn!(kms = %self.url, "the last good key set is older than --max-stale; the documents answer 503 until the key service answers");
                        told_stale = true;
                    }
                    failing = true;
                    RETRY
                }
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
