//! The key manager: the heart of the service. It owns the key store and the keyring, signs tokens
//! with the active key, rotates (on demand and on schedule), and answers what is published.
//! The gRPC and HTTP layers are thin adapters over it.
//!
//! Concurrency:
//! - `writer` (a std mutex) serializes everything that changes the keyring: rotations, scheduled
//!   work, commits. Its critical sections are blocking work (key generation, fsync) and always run
//!   on the blocking pool, never across an `.await`.
//! - `keys` (a std RwLock around an immutable `Arc<KeySet>`) is what signers read. A signer holds the
//!   read lock while it reads the clock and signs; an immediate rotation takes the write lock while
//!   it reads the clock, commits and swaps the snapshot. So every token the old key signs is issued
//!   before the old key's `signs_until`, and therefore expires before the key leaves the JWKS.
//! - `view` holds the same snapshot for everyone else (GetJwks, FetchKeys, ListKeys, metrics). Its
//!   lock is only ever held to copy or replace the `Arc`, never across a commit, so a slow or hung
//!   disk during a rotation stalls no reader, and no async worker thread. A commit updates `view`
//!   before `keys`: a kid a signer returns is already in what readers see.
//! - `changes` (a watch channel) tells subscribers (the scheduler, the Kubernetes signer) that the
//!   key set changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockWriteGuard};
use std::time::Duration;

use ring::rand::SystemRandom;
use tokio::sync::watch;

use crate::clock::{Clock, Timestamp};
use crate::error::Error;
use crate::issuer::Issuer;
use crate::jwk::Jwk;
use crate::keys::{KeySpec, KeyStore, Signer, StoreError};
use crate::lifecycle::{KeyRecord, KeyState, Keyring, LifecycleError, Policy, RotationPlan};
use crate::signing_pool::SigningPool;
use crate::token::{self, Claims, TokenRequest};

/// The longest a relying party is told to cache the published keys.
pub const MAX_CACHE_AGE: Duration = Duration::from_secs(300);

/// The longest a manual rotation may keep its new key published before it signs.
pub const MAX_PREPUBLISH: Duration = Duration::from_secs(30 * 86_400);

/// What the key manager is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The issuer written into every token.
    pub issuer: Issuer,
    /// Rotation and lifetime rules.
    pub policy: Policy,
    /// The type of newly made keys.
    pub new_key_spec: KeySpec,
}

/// A signed token.
#[derive(Debug, Clone)]
pub struct SignedToken {
    /// Compact JWS.
    pub token: String,
    /// The signing key's id.
    pub kid: String,
    /// `exp`, unix seconds.
    pub expires_at: i64,
    /// `jti`.
    pub jti: String,
    /// The JWS algorithm it was signed with.
    pub alg: &'static str,
}

/// A signature over claims the caller encoded (the Kubernetes external-signer protocol).
#[derive(Debug, Clone)]
pub struct ExternalSignature {
    /// The encoded JWS header (exactly `alg`, `kid`, `typ`).
    pub header: String,
    /// The unpadded base64url signature over `header + "." + claims`, claims as received.
    pub signature: String,
    /// The signing key's id.
    pub kid: String,
}

/// A signature made by [`KeyManager::sign_with_active_key`].
struct ActiveSignature {
    input: String,
    signature: Vec<u8>,
    exp: i64,
    kid: String,
    key: Arc<LiveKey>,
}

/// Why a rotation happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationReason {
    /// An admin asked.
    Manual,
    /// The rotation period came round.
    Scheduled,
}

/// The result of a rotation.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The key that signs now.
    pub active_kid: String,
    /// The key the rotation made or promoted.
    pub new_kid: String,
    /// Every key with its state.
    pub keys: Vec<(KeyRecord, KeyState)>,
}

/// The public key set as relying parties should see it now.
#[derive(Debug, Clone)]
pub struct PublishedKeys {
    /// The issuer, verbatim.
    pub issuer: String,
    /// The JWKs, oldest key first.
    pub keys: Vec<Jwk>,
    /// How long a relying party may cache this set.
    pub cache_max_age: Duration,
}

/// A live key: the signer and what we precompute for it.
#[derive(Debug)]
pub struct LiveKey {
    /// The private key, usable only to sign.
    pub signer: Arc<dyn Signer>,
    /// Its encoded JWS header.
    pub header: String,
    /// Its JWK.
    pub jwk: Jwk,
}

/// An immutable snapshot of the keyring and its live keys.
#[derive(Debug)]
pub struct KeySet {
    /// Lifecycle records.
    pub keyring: Keyring,
    keys: HashMap<String, Arc<LiveKey>>,
    /// When this snapshot was made.
    pub changed_at: Timestamp,
}

impl KeySet {
    /// The active key at `now`.
    pub fn active(&self, now: Timestamp) -> Option<(&KeyRecord, &Arc<LiveKey>)> {
        let record = self.keyring.active(now)?;
        Some((record, self.keys.get(&record.kid)?))
    }

    /// The published keys at `now`, oldest first.
    pub fn published(&self, now: Timestamp) -> Vec<(&KeyRecord, &Arc<LiveKey>)> {
        self.keyring
            .published(now)
            .filter_map(|r| Some((r, self.keys.get(&r.kid)?)))
            .collect()
    }
}

struct Writer {
    store: Box<dyn KeyStore>,
    keyring: Keyring,
    live: HashMap<String, Arc<LiveKey>>,
}

struct Inner {
    settings: Settings,
    clock: Arc<dyn Clock>,
    writer: Mutex<Writer>,
    keys: RwLock<Arc<KeySet>>,
    view: RwLock<Arc<KeySet>>,
    changes: watch::Sender<Timestamp>,
    rng: SystemRandom,
    pool: SigningPool,
    /// Set when the store could not tell what is on disk after a failed commit: the keys in memory
    /// may no longer match it, so nothing is signed until a restart reads the store again.
    halted: AtomicBool,
}

/// The key manager; cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct KeyManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("issuer", &self.inner.settings.issuer.as_str())
            .finish_non_exhaustive()
    }
}

fn live_key(signer: Arc<dyn Signer>) -> Arc<LiveKey> {
    let public = signer.public_key();
    Arc::new(LiveKey {
        header: token::encoded_header(public.spec().jws_algorithm(), public.kid()),
        jwk: Jwk::from_public_key(public),
        signer,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KeyManager {
    /// Opens the store: loads its keys, or makes the first key of a new store; brings the keyring
    /// up to date (retirements, a rotation missed while down). Blocking.
    pub fn open(
        mut store: Box<dyn KeyStore>,
        clock: Arc<dyn Clock>,
        settings: Settings,
    ) -> Result<Self, Error> {
        let now = clock.now();
        let max = settings.policy.max_token_lifetime;
        let (keyring, signers) = match store.load()? {
            Some(loaded) => (loaded.keyring, loaded.signers),
            None => {
                let signer = store.generate(settings.new_key_spec)?;
                let keyring = Keyring::new(
                    signer.kid().to_owned(),
                    settings.new_key_spec,
                    clock.now(),
                    max,
                );
                store.commit(&keyring)?;
                tracing::info!(kid = signer.kid(), spec = %settings.new_key_spec, "created a new key store with one active key");
                (keyring, vec![signer])
            }
        };
        let live: HashMap<_, _> = signers
            .into_iter()
            .map(|s| (s.kid().to_owned(), live_key(s)))
            .collect();
        let snapshot = Arc::new(KeySet {
            keyring: keyring.clone(),
            keys: live.clone(),
            changed_at: now,
        });
        let manager = KeyManager {
            inner: Arc::new(Inner {
                settings,
                clock,
                writer: Mutex::new(Writer {
                    store,
                    keyring,
                    live,
                }),
                keys: RwLock::new(Arc::clone(&snapshot)),
                view: RwLock::new(snapshot),
                changes: watch::Sender::new(now),
                rng: SystemRandom::new(),
                pool: SigningPool::for_this_machine(),
                halted: AtomicBool::new(false),
            }),
        };
        {
            let mut w = lock(&manager.inner.writer);
            let mut ring = w.keyring.clone();
            if ring.apply_max_lifetime(now, max) {
                manager.commit(&mut w, ring, None, now, None)?;
            }
        }
        manager.tick()?;
        Ok(manager)
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The clock's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// The current snapshot. Never waits for a commit (see the module doc).
    pub fn key_set(&self) -> Arc<KeySet> {
        self.inner
            .view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A receiver that changes whenever the key set does.
    pub fn subscribe(&self) -> watch::Receiver<Timestamp> {
        self.inner.changes.subscribe()
    }

    /// Signs with the key active now. The key set's read lock is held while the clock is read,
    /// `build` makes the signing input (and says when the token expires) and the key signs: see
    /// the module doc. A token that would outlive its key is refused (impossible by construction).
    fn sign_with_active_key(
        &self,
        build: impl FnOnce(Timestamp, &LiveKey) -> Result<(String, i64), Error>,
    ) -> Result<ActiveSignature, Error> {
        if self.inner.halted.load(Ordering::Acquire) {
            return Err(Error::Halted);
        }
        let guard = self
            .inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let now = self.inner.clock.now();
        let (record, key) = guard.active(now).ok_or(Error::NoActiveKey)?;
        let (input, exp) = build(now, key)?;
        if record
            .retires_at
            .is_some_and(|r| Timestamp::from_secs(exp) > r)
        {
            return Err(LifecycleError::Inconsistent(
                "the active key would leave the JWKS before this token expires",
            )
            .into());
        }
        let signature = key.signer.sign(input.as_bytes())?;
        Ok(ActiveSignature {
            input,
            signature,
            exp,
            kid: record.kid.clone(),
            key: Arc::clone(key),
        })
    }

    /// Signs a token (blocking: run it on the signing pool).
    pub fn sign_token_blocking(&self, request: &TokenRequest) -> Result<SignedToken, Error> {
        let settings = &self.inner.settings;
        let lifetime = request.validate(settings.policy.max_token_lifetime)?;
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        let jti = token::new_jti(&self.inner.rng)?;
        let signed = self.sign_with_active_key(|now, key| {
            let iat = now.as_secs();
            let exp = iat.saturating_add(lifetime);
            let claims = Claims {
                iss: settings.issuer.as_str(),
                sub: &request.subject,
                aud: &request.audiences,
                iat,
                nbf: iat,
                exp,
                jti: &jti,
                extra: &request.extra_claims,
            };
            Ok((token::signing_input(&key.header, &claims), exp))
        })?;
        let mut token = signed.input;
        token.push('.');
        token.push_str(&token::b64url(&signed.signature));
        Ok(SignedToken {
            token,
            kid: signed.kid,
            expires_at: signed.exp,
            jti,
            alg: signed.key.signer.public_key().spec().jws_algorithm(),
        })
    }

    /// Signs claims that the caller already encoded, byte for byte as received, after checking
    /// them (see [`token::check_encoded_claims`]). Blocking.
    pub fn sign_encoded_claims_blocking(&self, claims: &str) -> Result<ExternalSignature, Error> {
        let settings = &self.inner.settings;
        let signed = self.sign_with_active_key(|now, key| {
            let exp = token::check_encoded_claims(
                claims,
                settings.issuer.as_str(),
                settings.policy.max_token_lifetime,
                now.as_secs(),
            )?;
            Ok((format!("{}.{claims}", key.header), exp))
        })?;
        Ok(ExternalSignature {
            header: signed.key.header.clone(),
            signature: token::b64url(&signed.signature),
            kid: signed.kid,
        })
    }

    /// Signs a token on the signing pool; refused at once when the pool is full, and not signed
    /// when `deadline` passes first.
    pub async fn sign_token(
        &self,
        request: TokenRequest,
        deadline: Option<std::time::Instant>,
    ) -> Result<SignedToken, Error> {
        let this = self.clone();
        self.inner
            .pool
            .run(deadline, move || this.sign_token_blocking(&request))
            .await
    }

    /// Signs caller-encoded claims on the signing pool (see [`Self::sign_encoded_claims_blocking`]).
    pub async fn sign_encoded_claims(
        &self,
        claims: String,
        deadline: Option<std::time::Instant>,
    ) -> Result<ExternalSignature, Error> {
        let this = self.clone();
        self.inner
            .pool
            .run(deadline, move || this.sign_encoded_claims_blocking(&claims))
            .await
    }

    /// Rotates: `prepublish` zero makes the new key sign at once (AKS); otherwise it is published
    /// now and signs after `prepublish`. Blocking.
    pub fn rotate_blocking(&self, prepublish: Duration) -> Result<Rotation, Error> {
        let cache = self.cache_max_age();
        if !prepublish.is_zero() && prepublish < 2 * cache {
            return Err(Error::invalid(
                "prepublish_seconds",
                format!(
                    "{} s is too short: relying parties may cache the JWKS for {} s, and some \
                     would not hold the new key before it signs; ask for at least {} s (twice \
                     the cache lifetime), or 0 to rotate at once",
                    prepublish.as_secs(),
                    cache.as_secs(),
                    (2 * cache).as_secs()
                ),
            ));
        }
        if prepublish > MAX_PREPUBLISH {
            return Err(Error::invalid(
                "prepublish_seconds",
                format!(
                    "{} s is more than the {} s (30 days) a key may wait published before it signs",
                    prepublish.as_secs(),
                    MAX_PREPUBLISH.as_secs()
                ),
            ));
        }
        let mut w = lock(&self.inner.writer);
        let plan = w.keyring.plan_rotation(self.now(), prepublish)?;
        let new_kid = self.rotate_locked(&mut w, plan, prepublish, RotationReason::Manual)?;
        let now = self.now();
        let keys = w
            .keyring
            .retired()
            .iter()
            .chain(w.keyring.records())
            .map(|r| (r.clone(), r.state(now)))
            .collect();
        let active_kid = w
            .keyring
            .active(now)
            .map(|r| r.kid.clone())
            .ok_or(Error::NoActiveKey)?;
        Ok(Rotation {
            active_kid,
            new_kid,
            keys,
        })
    }

    /// Rotates on the blocking pool.
    pub async fn rotate(&self, prepublish: Duration) -> Result<Rotation, Error> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.rotate_blocking(prepublish))
            .await
            .map_err(|_| Error::ShuttingDown)?
    }

    fn rotate_locked(
        &self,
        w: &mut Writer,
        plan: RotationPlan,
        prepublish: Duration,
        reason: RotationReason,
    ) -> Result<String, Error> {
        let max = self.inner.settings.policy.max_token_lifetime;
        let (new_signer, new_kid) = match plan {
            RotationPlan::NewKey { .. } => {
                let spec = self.inner.settings.new_key_spec;
                // Generation is slow (RSA); the clock is read after it, below.
                let signer = w.store.generate(spec)?;
                let kid = signer.kid().to_owned();
                (Some(signer), kid)
            }
            RotationPlan::PromoteNext { kid } => (None, kid),
        };
        let immediate = prepublish.is_zero();
        // An immediate rotation ends the old key's signing now: keep signers out while the clock
        // is read and the change is committed (see the module doc).
        let sign_lock = immediate.then(|| {
            self.inner
                .keys
                .write()
                .unwrap_or_else(PoisonError::into_inner)
        });
        let now = self.now();
        let mut ring = w.keyring.clone();
        match &new_signer {
            Some(signer) => {
                let spec = signer.public_key().spec();
                ring.add_key(new_kid.clone(), spec, now, now.plus(prepublish), max);
            }
            None => {
                ring.promote_next(now, max);
            }
        }
        self.commit(w, ring, new_signer, now, sign_lock)?;
        tracing::info!(kid = %new_kid, reason = ?reason, prepublish_s = prepublish.as_secs(), "rotated keys");
        crate::metrics::record_rotation(reason);
        Ok(new_kid)
    }

    /// Prunes, commits and publishes `ring` as the new keyring. `held` is the snapshot's write
    /// guard when the caller already keeps signers out.
    fn commit(
        &self,
        w: &mut Writer,
        mut ring: Keyring,
        new_signer: Option<Arc<dyn Signer>>,
        now: Timestamp,
        held: Option<RwLockWriteGuard<'_, Arc<KeySet>>>,
    ) -> Result<(), Error> {
        let retired = ring.prune(now);
        match w.store.commit(&ring) {
            Ok(()) => {}
            Err(e @ StoreError::Indeterminate { .. }) => {
                self.inner.halted.store(true, Ordering::Release);
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        for kid in retired {
            tracing::info!(%kid, "retired key: left the JWKS, sealed record erased");
        }
        if let Some(signer) = new_signer {
            w.live.insert(signer.kid().to_owned(), live_key(signer));
        }
        w.live.retain(|kid, _| ring.get(kid).is_some());
        w.keyring = ring;
        let snapshot = Arc::new(KeySet {
            keyring: w.keyring.clone(),
            keys: w.live.clone(),
            changed_at: now,
        });
        *self
            .inner
            .view
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::clone(&snapshot);
        let mut guard = held.unwrap_or_else(|| {
            self.inner
                .keys
                .write()
                .unwrap_or_else(PoisonError::into_inner)
        });
        *guard = snapshot;
        drop(guard);
        self.inner.changes.send_replace(now);
        Ok(())
    }

    /// Does what is due now (erase retired keys, start a scheduled rotation) and returns when to
    /// call again. Blocking.
    pub fn tick(&self) -> Result<Option<Timestamp>, Error> {
        let policy = self.inner.settings.policy;
        let mut w = lock(&self.inner.writer);
        let now = self.now();
        if w.keyring
            .rotation_due(now, &policy)
            .is_some_and(|due| due <= now)
        {
            let plan = w.keyring.plan_rotation(now, policy.prepublish)?;
            self.rotate_locked(&mut w, plan, policy.prepublish, RotationReason::Scheduled)?;
        } else if w
            .keyring
            .records()
            .iter()
            .any(|r| r.state(now) == KeyState::Retired)
        {
            let ring = w.keyring.clone();
            self.commit(&mut w, ring, None, now, None)?;
        }
        Ok(w.keyring.next_event(self.now(), &policy))
    }

    /// Runs scheduled work until `shutdown` resolves: sleeps until the next event, wakes early
    /// when a manual rotation changes the plan, retries after a failure.
    pub async fn run_scheduler(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut changes = self.subscribe();
        loop {
            let this = self.clone();
            let next = tokio::task::spawn_blocking(move || this.tick()).await;
            let wait = match next {
                Ok(Ok(Some(at))) => self.now().until(at).max(Duration::from_millis(5)),
                Ok(Ok(None)) => Duration::from_secs(3600),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "scheduled key work failed; retrying in 10 s");
                    Duration::from_secs(10)
                }
                Err(_) => return,
            };
            changes.mark_unchanged();
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait.min(Duration::from_secs(3600))) => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// The published keys now.
    pub fn published(&self) -> PublishedKeys {
        let set = self.key_set();
        let now = self.now();
        PublishedKeys {
            issuer: self.inner.settings.issuer.as_str().to_owned(),
            keys: set
                .published(now)
                .into_iter()
                .map(|(_, k)| k.jwk.clone())
                .collect(),
            cache_max_age: self.cache_max_age(),
        }
    }

    /// How long a relying party may cache the published keys: half the pre-publication lead (so a
    /// scheduled key reaches every cache before it signs, with the other half to spare for the
    /// gateway's refresh, a slow fetch and clocks), at most 300 s, at least 1 s. Manual
    /// pre-published rotations must ask for at least twice this.
    pub fn cache_max_age(&self) -> Duration {
        (self.inner.settings.policy.prepublish / 2)
            .min(MAX_CACHE_AGE)
            .max(Duration::from_secs(1))
    }

    /// Every key with its state now: the retired ones the keyring remembers, then the live ones.
    pub fn list_keys(&self) -> (Vec<(KeyRecord, KeyState)>, Option<String>) {
        let set = self.key_set();
        let now = self.now();
        let keys = set
            .keyring
            .retired()
            .iter()
            .chain(set.keyring.records())
            .map(|r| (r.clone(), r.state(now)))
            .collect();
        (keys, set.keyring.active(now).map(|r| r.kid.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::keys::{FileStore, Kek};
    use crate::lifecycle::Policy;

    const H: Duration = Duration::from_secs(3600);

    fn settings() -> Settings {
        Settings {
            issuer: Issuer::parse("https://issuer.example/").unwrap(),
            policy: Policy {
                max_token_lifetime: Duration::from_secs(1800),
                rotation_period: Some(H),
                prepublish: Duration::from_secs(600),
            },
            new_key_spec: KeySpec::P256,
        }
    }

    fn open(dir: &std::path::Path, kek: &Kek, clock: &Arc<ManualClock>) -> KeyManager {
        open_with(dir, kek, clock, settings())
    }

    fn open_with(
        dir: &std::path::Path,
        kek: &Kek,
        clock: &Arc<ManualClock>,
        settings: Settings,
    ) -> KeyManager {
        let store = FileStore::open(dir, kek).unwrap();
        KeyManager::open(
            Box::new(store),
            Arc::clone(clock) as Arc<dyn Clock>,
            settings,
        )
        .unwrap()
    }

    #[test]
    fn a_wall_clock_stepped_back_is_named_and_an_immediate_rotation_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_700_000_000)));
        let m = open(dir.path(), &kek, &clock);
        let first = m.list_keys().1.unwrap();
        // NTP pulls the clock back an hour, behind the only key's activation.
        clock.set(Timestamp::from_secs(1_700_000_000 - 3600));
        let request = TokenRequest {
            subject: "s".into(),
            audiences: vec!["a".into()],
            ..TokenRequest::default()
        };
        let err = m.sign_token_blocking(&request).unwrap_err().to_string();
        assert!(err.contains("has the system clock stepped back?"), "{err}");
        assert_eq!(m.published().keys.len(), 1, "the key is still published");
        // The admin's way out: the waiting key signs from now on.
        assert_eq!(m.rotate_blocking(Duration::ZERO).unwrap().active_kid, first);
        assert_eq!(m.sign_token_blocking(&request).unwrap().kid, first);
    }

    #[test]
    fn the_cache_hint_is_half_the_lead_and_manual_leads_twice_the_hint() {
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_700_000_000)));
        let kek = Kek::generate().unwrap();
        for (lead, hint) in [(3600, 300), (600, 300), (60, 30), (3, 1), (1, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let mut s = settings();
            s.policy.prepublish = Duration::from_secs(lead);
            s.policy.rotation_period = None;
            let m = open_with(dir.path(), &kek, &clock, s);
            let cache = m.cache_max_age();
            assert_eq!(cache.as_secs(), hint, "lead {lead} s");
            assert_eq!(m.published().cache_max_age, cache);
            if lead >= 60 {
                let short = 2 * cache - Duration::from_secs(1);
                let err = m.rotate_blocking(short).unwrap_err().to_string();
                assert!(err.contains(&format!("at least {} s", 2 * hint)), "{err}");
                m.rotate_blocking(2 * cache).unwrap();
            }
        }
    }

    /// A store whose commits, once armed, wait for the test's go-ahead: a disk that hangs.
    struct HangingStore {
        inner: FileStore,
        armed: Arc<AtomicBool>,
        entered: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl KeyStore for HangingStore {
        fn load(&mut self) -> Result<Option<crate::keys::LoadedKeys>, StoreError> {
            self.inner.load()
        }
        fn generate(&mut self, spec: KeySpec) -> Result<Arc<dyn Signer>, StoreError> {
            self.inner.generate(spec)
        }
        fn commit(&mut self, keyring: &Keyring) -> Result<(), StoreError> {
            if self.armed.load(Ordering::SeqCst) {
                self.entered.send(()).unwrap();
                self.release.recv().unwrap();
            }
            self.inner.commit(keyring)
        }
    }

    #[test]
    fn readers_of_the_key_set_do_not_wait_for_a_hanging_commit() {
        use std::sync::mpsc::channel;
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_700_000_000)));
        let armed = Arc::new(AtomicBool::new(false));
        let (entered_tx, entered) = channel();
        let (release, release_rx) = channel();
        let store = HangingStore {
            inner: FileStore::open(dir.path(), &kek).unwrap(),
            armed: Arc::clone(&armed),
            entered: entered_tx,
            release: release_rx,
        };
        let manager = KeyManager::open(
            Box::new(store),
            Arc::clone(&clock) as Arc<dyn Clock>,
            settings(),
        )
        .unwrap();
        let first = manager.list_keys().1.unwrap();

        // An immediate rotation keeps signers out while it commits; the commit hangs.
        armed.store(true, Ordering::SeqCst);
        let rotating = {
            let manager = manager.clone();
            std::thread::spawn(move || manager.rotate_blocking(Duration::ZERO))
        };
        entered.recv().unwrap();

        // GetJwks, FetchKeys, ListKeys and metrics still answer, with the keys as they were.
        let (answer, answered) = channel();
        let reader = manager.clone();
        std::thread::spawn(move || {
            let published = reader.published();
            let (_, active) = reader.list_keys();
            let _ = answer.send((published.keys.len(), active));
        });
        let seen = answered.recv_timeout(Duration::from_secs(10));
        release.send(()).unwrap();
        let new = rotating.join().unwrap().unwrap().active_kid;
        assert_eq!(
            seen.expect("a reader waited for the hanging commit"),
            (1, Some(first))
        );
        // Once the commit is through, readers see the new key.
        assert_eq!(manager.list_keys().1, Some(new));
        assert_eq!(manager.published().keys.len(), 2);
    }

    #[test]
    fn a_lowered_max_lifetime_keeps_old_keys_published_for_the_tokens_they_signed() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_700_000_000)));
        let mut day = settings();
        day.policy.max_token_lifetime = 24 * H;
        day.policy.rotation_period = None;
        let first = open_with(dir.path(), &kek, &clock, day.clone());
        let k1 = first.list_keys().1.unwrap();
        drop(first); // k1 may have signed 24 h tokens

        // Restarted with a 10-minute maximum, then rotated.
        let mut short = day;
        short.policy.max_token_lifetime = Duration::from_secs(600);
        let again = open_with(dir.path(), &kek, &clock, short.clone());
        clock.advance(Duration::from_secs(60));
        let rotated_at = clock.now();
        again.rotate_blocking(Duration::ZERO).unwrap();
        let retires = |m: &KeyManager, kid: &str| m.key_set().keyring.get(kid).unwrap().retires_at;
        assert_eq!(retires(&again, &k1), Some(rotated_at.plus(24 * H)));
        // ...and so across another restart.
        drop(again);
        let third = open_with(dir.path(), &kek, &clock, short);
        assert_eq!(retires(&third, &k1), Some(rotated_at.plus(24 * H)));
        clock.advance(23 * H);
        third.tick().unwrap();
        assert!(
            third
                .key_set()
                .keyring
                .published(clock.now())
                .any(|k| k.kid == k1)
        );
    }

    #[test]
    fn a_service_down_past_several_rotations_rotates_once_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_700_000_000)));
        let first = open(dir.path(), &kek, &clock);
        let k1 = first
            .key_set()
            .keyring
            .active(clock.now())
            .unwrap()
            .kid
            .clone();
        drop(first);

        // Down for five rotation periods.
        clock.advance(5 * H);
        let again = open(dir.path(), &kek, &clock);
        let (keys, active) = again.list_keys();
        assert_eq!(
            active.as_deref(),
            Some(k1.as_str()),
            "k1 signs until the new key's lead ends"
        );
        let states: Vec<KeyState> = keys.iter().map(|(_, s)| *s).collect();
        assert_eq!(
            states,
            [KeyState::Active, KeyState::Next],
            "one rotation, pre-published"
        );
        let k2 = keys[1].0.kid.clone();

        // After the lead, k2 signs and nothing else was owed: the next rotation is a period on.
        clock.advance(Duration::from_secs(600));
        let next = again.tick().unwrap();
        assert_eq!(again.list_keys().1.as_deref(), Some(k2.as_str()));
        assert_eq!(again.list_keys().0.len(), 2, "k1 previous, k2 active");
        let due = again
            .key_set()
            .keyring
            .rotation_due(clock.now(), &settings().policy)
            .unwrap();
        assert_eq!(clock.now().until(due), H - Duration::from_secs(600));
        assert!(next.is_some());
    }
}
