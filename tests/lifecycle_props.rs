//! Property tests of the key lifecycle (issue #3), through the real key manager and sealed file
//! store, with an injected clock: random sequences of signing, manual rotations (with and without
//! pre-publication), time passing (with the scheduler waking when it should), restarts from the
//! persisted store and algorithm changes. After every step the invariants relying parties depend on
//! must hold.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use oidc_kms::clock::{Clock, ManualClock, Timestamp};
use oidc_kms::issuer::Issuer;
use oidc_kms::key_manager::{KeyManager, Settings};
use oidc_kms::keys::{FileStore, Kek, KeySpec};
use oidc_kms::lifecycle::{KeyState, Policy};
use oidc_kms::token::TokenRequest;
use proptest::prelude::*;

const MAX_LIFETIME: Duration = Duration::from_secs(600);
const PERIOD: Duration = Duration::from_secs(1800);
const LEAD: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
enum Op {
    Sign { lifetime_s: u64 },
    RotateNow,
    RotatePrepublished { lead_s: u64 },
    Advance { secs: u64 },
    Restart { spec: KeySpec },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..=600).prop_map(|lifetime_s| Op::Sign { lifetime_s }),
        1 => Just(Op::RotateNow),
        1 => (1u64..=900).prop_map(|lead_s| Op::RotatePrepublished { lead_s }),
        4 => (1u64..=1200).prop_map(|secs| Op::Advance { secs }),
        1 => prop_oneof![Just(KeySpec::P256), Just(KeySpec::P384)].prop_map(|spec| Op::Restart { spec }),
    ]
}

struct World {
    dir: tempfile::TempDir,
    kek: Kek,
    clock: Arc<ManualClock>,
    manager: Option<KeyManager>,
    /// Tokens still owed a published key: (kid, exp in seconds).
    tokens: Vec<(String, i64)>,
    /// Keys a manual rotation removed at once (AKS): their tokens are no longer owed.
    cut_short: HashSet<String>,
    /// Keys made by a scheduled or pre-published rotation: when they were first published and the
    /// lead they are owed (`--prepublish`, or what a manual rotation asked for).
    scheduled_first_seen: HashMap<String, (Timestamp, Duration)>,
    first_signature: HashMap<String, Timestamp>,
    ever_seen: HashSet<String>,
    last_published: HashSet<String>,
}

fn settings(spec: KeySpec) -> Settings {
    Settings {
        issuer: Issuer::parse("https://issuer.example/").unwrap(),
        policy: Policy {
            max_token_lifetime: MAX_LIFETIME,
            rotation_period: Some(PERIOD),
            prepublish: LEAD,
        },
        new_key_spec: spec,
    }
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_800_000_000)));
        let mut w = World {
            dir,
            kek,
            clock,
            manager: None,
            tokens: vec![],
            cut_short: HashSet::new(),
            scheduled_first_seen: HashMap::new(),
            first_signature: HashMap::new(),
            ever_seen: HashSet::new(),
            last_published: HashSet::new(),
        };
        w.open(KeySpec::P256);
        w.observe("start");
        w
    }

    fn open(&mut self, spec: KeySpec) {
        let store = FileStore::open(self.dir.path(), &self.kek).unwrap();
        let clock: Arc<dyn Clock> = self.clock.clone();
        self.manager = Some(KeyManager::open(Box::new(store), clock, settings(spec)).unwrap());
    }

    fn m(&self) -> &KeyManager {
        self.manager.as_ref().unwrap()
    }

    fn published(&self) -> HashSet<String> {
        self.m()
            .published()
            .keys
            .into_iter()
            .map(|k| k.kid)
            .collect()
    }

    /// Checks every invariant at the current moment.
    fn observe(&mut self, step: &str) {
        let now = self.clock.now();
        let published = self.published();
        assert!(
            published.len() <= 3,
            "{step}: {} keys published",
            published.len()
        );
        let (keys, active) = self.m().list_keys();
        let active = active.expect("always an active key");
        assert!(
            published.contains(&active),
            "{step}: the active key is published"
        );
        for (record, state) in &keys {
            if *state == KeyState::Next && !self.ever_seen.contains(&record.kid) {
                let lead = record.created_at.until(record.activates_at);
                self.scheduled_first_seen
                    .insert(record.kid.clone(), (now, lead));
            }
        }
        // A kid that left the published set never comes back (no kid is reused).
        for kid in &published {
            assert!(
                !self.ever_seen.contains(kid) || self.last_published.contains(kid),
                "{step}: kid {kid} reappeared"
            );
        }
        self.ever_seen.extend(published.iter().cloned());
        for (kid, exp) in &self.tokens {
            if Timestamp::from_secs(*exp) > now && !self.cut_short.contains(kid) {
                assert!(
                    published.contains(kid),
                    "{step}: a valid token's key {kid} was unpublished"
                );
            }
        }
        self.last_published = published;
    }

    fn apply(&mut self, op: &Op) {
        let step = format!("{op:?}");
        match op {
            Op::Sign { lifetime_s } => {
                let req = TokenRequest {
                    subject: "s".into(),
                    audiences: vec!["a".into()],
                    lifetime: Some(Duration::from_secs(*lifetime_s)),
                    ..Default::default()
                };
                let signed = self.m().sign_token_blocking(&req).unwrap();
                let now = self.clock.now();
                assert!(
                    self.published().contains(&signed.kid),
                    "{step}: signed by an unpublished key"
                );
                if self.scheduled_first_seen.contains_key(&signed.kid) {
                    self.first_signature
                        .entry(signed.kid.clone())
                        .or_insert(now);
                }
                self.tokens.push((signed.kid, signed.expires_at));
            }
            Op::RotateNow | Op::RotatePrepublished { .. } => {
                let lead = match op {
                    Op::RotatePrepublished { lead_s } => Duration::from_secs(*lead_s),
                    _ => Duration::ZERO,
                };
                let before = self.published();
                let result = self.m().rotate_blocking(lead);
                match result {
                    Ok(r) => {
                        if !lead.is_zero() {
                            assert!(
                                after_lead_is(&r, lead),
                                "{step}: the new key waits the lead asked for"
                            );
                        }
                        if lead.is_zero() {
                            // An immediate rotation may promote a pre-published key early (AKS):
                            // it no longer owes the full lead.
                            self.scheduled_first_seen.remove(&r.new_kid);
                        }
                    }
                    Err(oidc_kms::Error::Lifecycle(_)) if !lead.is_zero() => {}
                    // A lead shorter than the JWKS cache lifetime is refused, and only that.
                    Err(oidc_kms::Error::InvalidArgument { field, .. })
                        if field == "prepublish_seconds" && !lead.is_zero() && lead < LEAD => {}
                    Err(e) => panic!("{step}: {e}"),
                }
                let after = self.published();
                self.cut_short.extend(before.difference(&after).cloned());
                self.observe(&step);
            }
            Op::Advance { secs } => {
                // The scheduler wakes at each event on the way, as `run_scheduler` does.
                let target = self.clock.now().plus(Duration::from_secs(*secs));
                loop {
                    let next = self.m().tick().unwrap();
                    self.observe(&step);
                    match next {
                        Some(at) if at <= target => self.clock.set(at.max(self.clock.now())),
                        _ => break,
                    }
                }
                self.clock.set(target);
                self.m().tick().unwrap();
                self.observe(&step);
            }
            Op::Restart { spec } => {
                let before = self.m().list_keys();
                self.manager = None;
                self.open(*spec);
                let after = self.m().list_keys();
                assert_eq!(
                    after, before,
                    "{step}: the state after a restart equals the state before it"
                );
                self.observe(&step);
            }
        }
        // Scheduled keys signed only after their full pre-publication lead.
        for (kid, first) in &self.first_signature {
            if let Some((seen, lead)) = self.scheduled_first_seen.get(kid) {
                assert!(
                    seen.until(*first) >= *lead,
                    "{kid} signed {:?} after it was published, owed {lead:?}",
                    seen.until(*first)
                );
            }
        }
    }
}

/// The rotation's new key activates `lead` after it was created.
fn after_lead_is(r: &oidc_kms::key_manager::Rotation, lead: Duration) -> bool {
    r.keys
        .iter()
        .find(|(k, _)| k.kid == r.new_kid)
        .is_some_and(|(k, _)| k.created_at.until(k.activates_at) == lead)
}

/// Scheduled rotations are owed the configured lead.
#[test]
fn scheduled_keys_are_owed_the_configured_prepublication() {
    let mut world = World::new();
    world.apply(&Op::Advance {
        secs: PERIOD.as_secs(),
    });
    let owed: Vec<Duration> = world
        .scheduled_first_seen
        .values()
        .map(|(_, lead)| *lead)
        .collect();
    assert_eq!(
        owed,
        vec![LEAD],
        "one scheduled rotation, pre-published for --prepublish"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn lifecycle_invariants_hold_for_any_sequence(ops in prop::collection::vec(op(), 1..40)) {
        let mut world = World::new();
        for op in &ops {
            world.apply(op);
        }
        drop(world.dir);
    }
}
