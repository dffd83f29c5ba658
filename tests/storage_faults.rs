//! Storage faults and hostile bytes, at the library level (issue #5): a rotation that cannot be
//! persisted changes nothing and the old key keeps signing; the store decoder and SignToken never
//! panic on random input.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use oidc_kms::clock::{Clock, ManualClock, Timestamp};
use oidc_kms::grpc::key_service::KeyServiceApi;
use oidc_kms::grpc::pb::{self, key_service_server::KeyService as _};
use oidc_kms::issuer::Issuer;
use oidc_kms::key_manager::{KeyManager, Settings};
use oidc_kms::keys::{FileStore, Kek, KeySpec, KeyStore, LoadedKeys, Signer, StoreError};
use oidc_kms::lifecycle::{Keyring, Policy};
use oidc_kms::token::TokenRequest;
use proptest::prelude::*;

/// A file store whose disk can be made to fail, as a full or read-only disk would.
struct FailingDisk {
    inner: FileStore,
    fail: Arc<AtomicBool>,
}

impl KeyStore for FailingDisk {
    fn load(&mut self) -> Result<Option<LoadedKeys>, StoreError> {
        self.inner.load()
    }
    fn generate(&mut self, spec: KeySpec) -> Result<Arc<dyn Signer>, StoreError> {
        self.inner.generate(spec)
    }
    fn commit(&mut self, keyring: &Keyring) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                action: "write",
                path: "keyring.json.tmp".into(),
                source: std::io::Error::from_raw_os_error(28), // ENOSPC
            });
        }
        self.inner.commit(keyring)
    }
}

fn settings() -> Settings {
    Settings {
        issuer: Issuer::parse("https://issuer.example/").unwrap(),
        policy: Policy {
            max_token_lifetime: Duration::from_secs(3600),
            rotation_period: Some(Duration::from_secs(7200)),
            prepublish: Duration::from_secs(600),
        },
        new_key_spec: KeySpec::P256,
    }
}

fn request() -> TokenRequest {
    TokenRequest {
        subject: "s".into(),
        audiences: vec!["a".into()],
        ..Default::default()
    }
}

#[test]
fn a_rotation_that_cannot_be_persisted_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::generate().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_800_000_000)));
    let store = FailingDisk {
        inner: FileStore::open(dir.path(), &kek).unwrap(),
        fail: Arc::clone(&fail),
    };
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let manager = KeyManager::open(Box::new(store), dyn_clock, settings()).unwrap();
    let before = manager.list_keys();
    let kid = manager.sign_token_blocking(&request()).unwrap().kid;
    let on_disk = std::fs::read(dir.path().join("keyring.json")).unwrap();

    fail.store(true, Ordering::SeqCst);
    let err = manager.rotate_blocking(Duration::ZERO).unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("No space left on device")
            && status.message().contains("current key keeps signing"),
        "{}",
        status.message()
    );
    // The scheduled rotation fails the same way, and is retried later.
    clock.advance(Duration::from_secs(7200));
    assert!(manager.tick().is_err());

    assert_eq!(
        manager.sign_token_blocking(&request()).unwrap().kid,
        kid,
        "the old key keeps signing"
    );
    let published: Vec<String> = manager
        .published()
        .keys
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(
        published,
        vec![kid.clone()],
        "the new key is never published"
    );
    assert_eq!(manager.list_keys().0.len(), before.0.len());
    assert_eq!(
        std::fs::read(dir.path().join("keyring.json")).unwrap(),
        on_disk
    );
    assert!(!dir.path().join("keyring.json.tmp").exists());

    // The disk recovers: the next attempt works.
    fail.store(false, Ordering::SeqCst);
    let rotation = manager.rotate_blocking(Duration::ZERO).unwrap();
    assert_ne!(rotation.active_kid, kid);
}

#[test]
fn a_read_only_store_file_system_fails_cleanly() {
    // A real fault from the operating system: the keyring's temp file cannot be created because a
    // directory is squatting on its name (root ignores permission bits, so chmod would not do).
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::generate().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(Timestamp::from_secs(1_800_000_000)));
    let store = FileStore::open(dir.path(), &kek).unwrap();
    let manager = KeyManager::open(Box::new(store), clock, settings()).unwrap();
    let kid = manager.sign_token_blocking(&request()).unwrap().kid;
    std::fs::create_dir(dir.path().join("keyring.json.tmp")).unwrap();
    let err = manager
        .rotate_blocking(Duration::ZERO)
        .unwrap_err()
        .to_string();
    assert!(err.contains("keyring.json.tmp"), "{err}");
    assert_eq!(manager.sign_token_blocking(&request()).unwrap().kid, kid);
    std::fs::remove_dir(dir.path().join("keyring.json.tmp")).unwrap();
    assert!(manager.rotate_blocking(Duration::ZERO).is_ok());
}

fn store_with_one_key() -> (tempfile::TempDir, Kek, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::generate().unwrap();
    {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(Timestamp::from_secs(1_800_000_000)));
        let store = FileStore::open(dir.path(), &kek).unwrap();
        KeyManager::open(Box::new(store), clock, settings()).unwrap();
    }
    let bytes = std::fs::read(dir.path().join("keyring.json")).unwrap();
    (dir, kek, bytes)
}

fn any_value() -> impl Strategy<Value = prost_types::Value> {
    use prost_types::value::Kind;
    let leaf = prop_oneof![
        any::<bool>().prop_map(Kind::BoolValue),
        any::<f64>().prop_map(Kind::NumberValue),
        ".{0,40}".prop_map(Kind::StringValue),
        Just(Kind::NullValue(0)),
    ]
    .prop_map(|k| prost_types::Value { kind: Some(k) });
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|values| prost_types::Value {
                kind: Some(prost_types::value::Kind::ListValue(
                    prost_types::ListValue { values }
                ))
            }),
            prop::collection::btree_map("[a-z]{1,8}|iss|sub|aud|exp", inner, 0..6).prop_map(
                |fields| {
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                            fields,
                        })),
                    }
                }
            ),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random bytes, and the real keyring with random bytes changed, never panic the decoder and
    /// are refused unless unchanged.
    #[test]
    fn the_store_decoder_refuses_garbage_without_panicking(
        garbage in prop::collection::vec(any::<u8>(), 0..600),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let (dir, kek, good) = store_with_one_key();
        std::fs::write(dir.path().join("keyring.json"), &garbage).unwrap();
        let mut s = FileStore::open(dir.path(), &kek).unwrap();
        prop_assert!(s.load().is_err());
        drop(s);
        let mut bytes = good.clone();
        for (i, x) in &flips {
            let at = i.index(bytes.len());
            bytes[at] ^= x;
        }
        std::fs::write(dir.path().join("keyring.json"), &bytes).unwrap();
        let mut s = FileStore::open(dir.path(), &kek).unwrap();
        let result = s.load();
        // A change that leaves the same JSON value (e.g. white space) may be accepted; any other
        // change is refused.
        let same_value = serde_json::from_slice::<serde_json::Value>(&bytes).ok()
            == serde_json::from_slice::<serde_json::Value>(&good).ok();
        prop_assert!(result.is_err() || same_value, "a changed store was accepted");
    }

    /// Random SignToken requests through the gRPC adapter: every failure is a clean status.
    #[test]
    fn random_sign_requests_never_panic(
        subject in ".{0,700}",
        audiences in prop::collection::vec(".{0,30}", 0..24),
        lifetime_seconds in prop_oneof![Just(0i64), -10i64..100_000, any::<i64>()],
        fields in prop::collection::btree_map(".{0,12}", any_value(), 0..6),
    ) {
        let (_dir, api) = api();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let req = pb::SignTokenRequest {
            subject,
            audiences,
            lifetime_seconds,
            claims: Some(prost_types::Struct { fields }),
        };
        match rt.block_on(api.sign_token(tonic::Request::new(req))) {
            Ok(r) => prop_assert_eq!(r.into_inner().token.split('.').count(), 3),
            Err(status) => {
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", status.message());
                prop_assert!(!status.message().is_empty());
            }
        }
    }
}

fn api() -> (tempfile::TempDir, KeyServiceApi) {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::generate().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(Timestamp::from_secs(1_800_000_000)));
    let store = FileStore::open(dir.path(), &kek).unwrap();
    let manager = KeyManager::open(Box::new(store), clock, settings()).unwrap();
    (dir, KeyServiceApi::new(manager))
}
