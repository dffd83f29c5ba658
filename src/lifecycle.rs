//! The key lifecycle, as pure data and time: which key signs, which are published, when the next
//! rotation is due and when a key retires. Nothing here does I/O; every method takes `now`.
//!
//! A key's state follows from its recorded times and the moment asked about:
//!
//! ```text
//!   created ── activates_at ─────────── signs_until ─────────── retires_at
//!     next   │      active               │      previous          │ retired (erased)
//! ```
//!
//! Rotations only write times, so a scheduled key turns active at its moment without anyone
//! acting, and a restart resumes exactly where the store left off.

use std::time::Duration;

use crate::clock::Timestamp;
use crate::keys::KeySpec;

/// Where a key is in its life at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Published, not signing yet (pre-published so verifiers cache it first).
    Next,
    /// Published and signing.
    Active,
    /// Published for verification only, until the tokens it signed have expired.
    Previous,
    /// Gone from the JWKS; at the next store commit its sealed key is erased, and its record
    /// moves to the keyring's short history of retired keys.
    Retired,
}

impl KeyState {
    /// Lower-case name, as shown to admins.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Active => "active",
            KeyState::Previous => "previous",
            KeyState::Retired => "retired",
        }
    }
}

/// One key's lifecycle record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Key id.
    pub kid: String,
    /// Key type.
    pub spec: KeySpec,
    /// When the key was made (and published).
    pub created_at: Timestamp,
    /// When it starts (or started) signing.
    pub activates_at: Timestamp,
    /// When it stops signing; `None` while no successor is planned.
    pub signs_until: Option<Timestamp>,
    /// When it leaves the JWKS; `None` while no successor is planned.
    pub retires_at: Option<Timestamp>,
    /// The longest token lifetime in force while it could sign (the maximum may have been lowered
    /// since): it stays published at least this long after it stops signing.
    pub max_lifetime: Duration,
}

impl KeyRecord {
    /// The key's state at `now`.
    pub fn state(&self, now: Timestamp) -> KeyState {
        if self.retires_at.is_some_and(|t| t <= now) {
            KeyState::Retired
        } else if self.signs_until.is_some_and(|t| t <= now) {
            KeyState::Previous
        } else if self.activates_at > now {
            KeyState::Next
        } else {
            KeyState::Active
        }
    }

    /// Whether the key is in the JWKS at `now`.
    pub fn is_published(&self, now: Timestamp) -> bool {
        self.state(now) != KeyState::Retired
    }
}

/// The rules rotations follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The longest a token may live; a key that stopped signing stays published this long.
    pub max_token_lifetime: Duration,
    /// How often a scheduled rotation happens; `None` turns scheduled rotation off.
    pub rotation_period: Option<Duration>,
    /// How long a scheduled key is published before it signs.
    pub prepublish: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_token_lifetime: Duration::from_secs(24 * 3600),
            rotation_period: None,
            prepublish: Duration::from_secs(3600),
        }
    }
}

/// What a rotation needs from the key store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationPlan {
    /// Make a new key; it will sign from the given moment (now, or after pre-publication).
    NewKey {
        /// When the new key starts signing.
        activates_at: Timestamp,
    },
    /// A key is already pre-published: an immediate rotation promotes it instead of making another.
    PromoteNext {
        /// The pending key.
        kid: String,
    },
}

/// A rotation that cannot happen now.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    /// A pre-published rotation is already pending.
    #[error(
        "a rotation is already pending: key {kid} starts signing at {activates_at}; rotate without pre-publication to promote it now"
    )]
    RotationPending {
        /// The pending key.
        kid: String,
        /// When it activates.
        activates_at: Timestamp,
    },
    /// A pre-published rotation would unpublish an older key before its tokens expire.
    #[error(
        "a pre-published rotation now would unpublish key {kid} while tokens it signed are valid until {retires_at}; wait until then, or rotate without pre-publication (which keeps only the key it replaces and retires every older key at once, as AKS does)"
    )]
    PreviousStillPublished {
        /// The older key.
        kid: String,
        /// When its last tokens expire.
        retires_at: Timestamp,
    },
    /// The store's records are inconsistent.
    #[error("the keyring is inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// How many retired keys' records the keyring remembers (without their key material), so that
/// admins can still see which key signed an old token and when it left.
pub const RETIRED_HISTORY: usize = 10;

/// The history's order: by retirement, then creation, then kid (a total order, so a history
/// reads back from the store exactly as it was written).
fn history_order(a: &KeyRecord, b: &KeyRecord) -> std::cmp::Ordering {
    (a.retires_at, a.created_at, &a.kid).cmp(&(b.retires_at, b.created_at, &b.kid))
}

/// Every live key's record, oldest first, and the records of the last few retired keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<KeyRecord>,
    /// Retired keys, oldest first, at most [`RETIRED_HISTORY`].
    retired: Vec<KeyRecord>,
}

impl Keyring {
    /// A new keyring whose one key is active from `now`, for tokens of up to `max_token_lifetime`.
    pub fn new(kid: String, spec: KeySpec, now: Timestamp, max_token_lifetime: Duration) -> Self {
        Keyring {
            keys: vec![KeyRecord {
                kid,
                spec,
                created_at: now,
                activates_at: now,
                signs_until: None,
                retires_at: None,
                max_lifetime: max_token_lifetime,
            }],
            retired: Vec::new(),
        }
    }

    /// Rebuilds a keyring from stored records, checking that they make sense together.
    pub fn from_records(mut keys: Vec<KeyRecord>) -> Result<Self, LifecycleError> {
        if keys.is_empty() {
            return Err(LifecycleError::Inconsistent("no keys"));
        }
        keys.sort_by_key(|k| (k.activates_at, k.created_at));
        let mut kids: Vec<&str> = keys.iter().map(|k| k.kid.as_str()).collect();
        kids.sort_unstable();
        if kids.windows(2).any(|w| w[0] == w[1]) {
            return Err(LifecycleError::Inconsistent("a key id appears twice"));
        }
        if keys.iter().filter(|k| k.signs_until.is_none()).count() > 1 {
            return Err(LifecycleError::Inconsistent(
                "more than one key without an end of signing",
            ));
        }
        Ok(Keyring {
            keys,
            retired: Vec::new(),
        })
    }

    /// Adds the stored history of retired keys to a keyring rebuilt by [`Self::from_records`].
    pub fn with_retired(mut self, mut retired: Vec<KeyRecord>) -> Result<Self, LifecycleError> {
        if retired.len() > RETIRED_HISTORY {
            return Err(LifecycleError::Inconsistent("too many retired keys"));
        }
        if retired.iter().any(|r| r.retires_at.is_none()) {
            return Err(LifecycleError::Inconsistent(
                "a retired key without a retirement time",
            ));
        }
        if retired
            .iter()
            .enumerate()
            .any(|(i, r)| self.get(&r.kid).is_some() || retired[..i].iter().any(|o| o.kid == r.kid))
        {
            return Err(LifecycleError::Inconsistent("a key id appears twice"));
        }
        retired.sort_by(history_order);
        self.retired = retired;
        Ok(self)
    }

    /// The live records (keys whose private key the store holds), oldest first.
    pub fn records(&self) -> &[KeyRecord] {
        &self.keys
    }

    /// The last few retired keys' records (see [`RETIRED_HISTORY`]), oldest first.
    pub fn retired(&self) -> &[KeyRecord] {
        &self.retired
    }

    /// The record of `kid`.
    pub fn get(&self, kid: &str) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The key that signs at `now`.
    pub fn active(&self, now: Timestamp) -> Option<&KeyRecord> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.state(now) == KeyState::Active)
    }

    /// The pre-published key waiting to sign, if any.
    pub fn pending_next(&self, now: Timestamp) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.state(now) == KeyState::Next)
    }

    /// The keys in the JWKS at `now`, oldest first.
    pub fn published(&self, now: Timestamp) -> impl Iterator<Item = &KeyRecord> {
        self.keys.iter().filter(move |k| k.is_published(now))
    }

    /// Decides what a rotation at `now` needs. `prepublish` zero means "sign at once" (AKS).
    pub fn plan_rotation(
        &self,
        now: Timestamp,
        prepublish: Duration,
    ) -> Result<RotationPlan, LifecycleError> {
        match self.pending_next(now) {
            Some(next) if prepublish.is_zero() => Ok(RotationPlan::PromoteNext {
                kid: next.kid.clone(),
            }),
            Some(next) => Err(LifecycleError::RotationPending {
                kid: next.kid.clone(),
                activates_at: next.activates_at,
            }),
            None if prepublish.is_zero() => Ok(RotationPlan::NewKey { activates_at: now }),
            None => {
                // A pre-published rotation keeps one older key (three are published meanwhile:
                // the new one, the active, the newest previous); any other previous key would
                // leave the JWKS while tokens it signed are still valid.
                let mut previous: Vec<&KeyRecord> = self
                    .keys
                    .iter()
                    .filter(|k| k.state(now) == KeyState::Previous)
                    .collect();
                previous.pop(); // the newest, which is kept
                match previous.first() {
                    Some(older) => Err(LifecycleError::PreviousStillPublished {
                        kid: older.kid.clone(),
                        retires_at: older.retires_at.unwrap_or(now),
                    }),
                    None => Ok(RotationPlan::NewKey {
                        activates_at: now.plus(prepublish),
                    }),
                }
            }
        }
    }

    /// Adds a freshly made key that signs from `activates_at` (`now` for an immediate rotation).
    ///
    /// The active key signs until then and stays published for the maximum token lifetime after.
    /// An immediate rotation retires every older key at once (AKS: rotating twice drops the oldest);
    /// a pre-published one keeps at most one older key, so no more than three are ever published.
    pub fn add_key(
        &mut self,
        kid: String,
        spec: KeySpec,
        now: Timestamp,
        activates_at: Timestamp,
        max_token_lifetime: Duration,
    ) {
        self.hand_over(now, activates_at, max_token_lifetime);
        self.keys.push(KeyRecord {
            kid,
            spec,
            created_at: now,
            activates_at,
            signs_until: None,
            retires_at: None,
            max_lifetime: max_token_lifetime,
        });
    }

    /// Makes the pending key sign from `now` (an immediate rotation while a key is pre-published).
    pub fn promote_next(&mut self, now: Timestamp, max_token_lifetime: Duration) -> Option<String> {
        let idx = self
            .keys
            .iter()
            .position(|k| k.state(now) == KeyState::Next)?;
        let mut next = self.keys.remove(idx);
        self.hand_over(now, now, max_token_lifetime);
        next.activates_at = now;
        let kid = next.kid.clone();
        self.keys.push(next);
        Some(kid)
    }

    fn hand_over(&mut self, now: Timestamp, activates_at: Timestamp, max_token_lifetime: Duration) {
        let immediate = activates_at <= now;
        let active_kid = self.active(now).map(|k| k.kid.clone());
        // The newest key that already stopped signing; a pre-published rotation may keep it.
        let newest_previous = self
            .keys
            .iter()
            .rev()
            .find(|k| k.state(now) == KeyState::Previous)
            .map(|k| k.kid.clone());
        for key in &mut self.keys {
            if Some(&key.kid) == active_kid.as_ref() {
                key.signs_until = Some(activates_at);
                key.max_lifetime = key.max_lifetime.max(max_token_lifetime);
                key.retires_at = Some(activates_at.plus(key.max_lifetime));
            } else if key.state(now) == KeyState::Previous
                && (immediate || Some(&key.kid) != newest_previous.as_ref())
            {
                key.retires_at = Some(now);
            }
        }
    }

    /// Moves the records of retired keys to the history (their key material is to be erased);
    /// returns their kids. The history keeps the last [`RETIRED_HISTORY`].
    pub fn prune(&mut self, now: Timestamp) -> Vec<String> {
        let (gone, live): (Vec<KeyRecord>, Vec<KeyRecord>) = std::mem::take(&mut self.keys)
            .into_iter()
            .partition(|k| k.state(now) == KeyState::Retired);
        self.keys = live;
        let kids = gone.iter().map(|k| k.kid.clone()).collect();
        self.retired.extend(gone);
        self.retired.sort_by(history_order);
        let excess = self.retired.len().saturating_sub(RETIRED_HISTORY);
        self.retired.drain(..excess);
        kids
    }

    /// Keeps every key that may still sign published for the (possibly raised) maximum lifetime.
    /// A lowered maximum shortens nothing: tokens signed under the old one are still out there.
    /// Returns whether anything changed.
    pub fn apply_max_lifetime(&mut self, now: Timestamp, max_token_lifetime: Duration) -> bool {
        let mut changed = false;
        for key in &mut self.keys {
            let may_sign = key.signs_until.is_none_or(|t| t > now);
            if may_sign && key.max_lifetime < max_token_lifetime {
                key.max_lifetime = max_token_lifetime;
                changed = true;
            }
            if let Some(until) = key.signs_until.filter(|t| *t > now) {
                let needed = until.plus(max_token_lifetime);
                if key.retires_at.is_none_or(|r| r < needed) {
                    key.retires_at = Some(needed);
                    changed = true;
                }
            }
        }
        changed
    }

    /// When the next scheduled rotation should start (pre-publish the next key), if any.
    pub fn rotation_due(&self, now: Timestamp, policy: &Policy) -> Option<Timestamp> {
        let period = policy.rotation_period?;
        if self.pending_next(now).is_some() {
            return None;
        }
        let active = self.active(now)?;
        let by_schedule = active
            .activates_at
            .plus(period.saturating_sub(policy.prepublish));
        // Wait until at most one older key is still published, so a new `next` never makes four.
        let mut previous: Vec<Timestamp> = self
            .keys
            .iter()
            .filter(|k| k.state(now) == KeyState::Previous)
            .filter_map(|k| k.retires_at)
            .collect();
        previous.sort_unstable();
        previous.pop();
        Some(previous.into_iter().fold(by_schedule, Timestamp::max))
    }

    /// The next moment something must happen: a rotation to start or a record to erase.
    pub fn next_event(&self, now: Timestamp, policy: &Policy) -> Option<Timestamp> {
        let retire = self
            .keys
            .iter()
            .filter_map(|k| k.retires_at)
            .filter(|t| *t > now)
            .min();
        let activate = self
            .keys
            .iter()
            .map(|k| k.activates_at)
            .filter(|t| *t > now)
            .min();
        [retire, activate, self.rotation_due(now, policy)]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_secs(secs)
    }

    fn published(ring: &Keyring, now: Timestamp) -> Vec<&str> {
        ring.published(now).map(|k| k.kid.as_str()).collect()
    }

    fn rotate_now(ring: &mut Keyring, kid: &str, now: Timestamp) {
        match ring.plan_rotation(now, Duration::ZERO).unwrap() {
            RotationPlan::NewKey { activates_at } => {
                ring.add_key(kid.into(), KeySpec::P256, now, activates_at, DAY)
            }
            RotationPlan::PromoteNext { .. } => {
                ring.promote_next(now, DAY);
            }
        }
    }

    #[test]
    fn old_key_stays_published_for_exactly_the_max_lifetime() {
        let mut ring = Keyring::new("k1".into(), KeySpec::P256, t(0), DAY);
        rotate_now(&mut ring, "k2", t(100));
        assert_eq!(ring.active(t(100)).unwrap().kid, "k2");
        let boundary = t(100).plus(DAY);
        assert_eq!(
            published(&ring, Timestamp::from_millis(boundary.as_millis() - 1)),
            ["k1", "k2"]
        );
        assert_eq!(published(&ring, boundary), ["k2"]);
        assert_eq!(ring.get("k1").unwrap().state(boundary), KeyState::Retired);
        assert_eq!(ring.next_event(t(100), &Policy::default()), Some(boundary));
        assert_eq!(ring.prune(boundary), ["k1"]);
        assert_eq!(ring.records().len(), 1);
        // Its record, without key material, stays in the short history.
        assert_eq!(ring.retired().len(), 1);
        assert_eq!(ring.retired()[0].kid, "k1");
        assert_eq!(ring.retired()[0].state(boundary), KeyState::Retired);
    }

    #[test]
    fn the_history_keeps_the_last_retired_keys_and_reads_back_the_same() {
        let mut ring = Keyring::new("k0".into(), KeySpec::P256, t(0), DAY);
        for i in 1..=(RETIRED_HISTORY as i64 + 5) {
            rotate_now(&mut ring, &format!("k{i}"), t(i * 10));
            ring.prune(t(i * 10));
        }
        let history: Vec<&str> = ring.retired().iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(history.len(), RETIRED_HISTORY);
        assert_eq!(
            history.last(),
            Some(&"k13"),
            "the newest retired key is kept"
        );
        assert!(!history.contains(&"k0"), "the oldest are forgotten");
        let again = Keyring::from_records(ring.records().to_vec())
            .unwrap()
            .with_retired(ring.retired().iter().rev().cloned().collect())
            .unwrap();
        assert_eq!(again, ring);
        // A live key cannot also be in the history.
        let clash = ring.records().to_vec();
        assert!(
            Keyring::from_records(clash.clone())
                .unwrap()
                .with_retired(clash)
                .is_err()
        );
    }

    #[test]
    fn rotating_twice_retires_the_oldest_at_once() {
        let mut ring = Keyring::new("k1".into(), KeySpec::P256, t(0), DAY);
        rotate_now(&mut ring, "k2", t(10));
        rotate_now(&mut ring, "k3", t(20));
        assert_eq!(published(&ring, t(20)), ["k2", "k3"]);
        assert_eq!(ring.active(t(20)).unwrap().kid, "k3");
        // Only the oldest goes: k2, which signed until now, keeps its full overlap.
        assert_eq!(ring.get("k2").unwrap().retires_at, Some(t(20).plus(DAY)));
        assert_eq!(ring.prune(t(20)), ["k1"]);
    }

    #[test]
    fn a_prepublished_rotation_keeps_the_newest_previous_key_for_its_tokens() {
        let mut ring = Keyring::new("k1".into(), KeySpec::P256, t(0), DAY);
        rotate_now(&mut ring, "k2", t(10));
        let k1_retires = ring.get("k1").unwrap().retires_at;
        assert_eq!(k1_retires, Some(t(10).plus(DAY)));
        // k3 is pre-published while k1 is still owed its overlap: k1 keeps it to the end.
        ring.add_key("k3".into(), KeySpec::P256, t(20), t(20).plus(H), DAY);
        assert_eq!(ring.get("k1").unwrap().retires_at, k1_retires);
        assert_eq!(published(&ring, t(21)), ["k1", "k2", "k3"]);
        assert_eq!(ring.get("k2").unwrap().signs_until, Some(t(20).plus(H)));
        // A further immediate rotation (AKS) retires the oldest, k1, and keeps k2's overlap.
        rotate_now(&mut ring, "unused", t(30));
        assert_eq!(
            ring.active(t(30)).unwrap().kid,
            "k3",
            "the next key is promoted"
        );
        assert_eq!(published(&ring, t(30)), ["k2", "k3"]);
        assert_eq!(ring.get("k2").unwrap().retires_at, Some(t(30).plus(DAY)));
    }

    #[test]
    fn a_prepublished_rotation_never_cuts_short_an_older_keys_tokens() {
        let mut ring = Keyring::new("k1".into(), KeySpec::P256, t(0), DAY);
        ring.add_key("k2".into(), KeySpec::P256, t(10), t(10), DAY); // k1: previous
        ring.add_key("k3".into(), KeySpec::P256, t(20), t(20).plus(H), DAY); // k1 kept, k2 active
        let k1_retires = ring.get("k1").unwrap().retires_at.unwrap();
        // Once k3 signs, k1 and k2 are both previous: one more pre-published key would have to
        // unpublish k1 early, so that rotation is refused, naming k1 and when it may go.
        let later = t(20).plus(H).plus(Duration::from_secs(1));
        assert_eq!(
            ring.plan_rotation(later, H),
            Err(LifecycleError::PreviousStillPublished {
                kid: "k1".into(),
                retires_at: k1_retires,
            })
        );
        // An immediate rotation still may (AKS: it retires the oldest at once), and after k1's
        // tokens have expired a pre-published one may too.
        assert!(ring.plan_rotation(later, Duration::ZERO).is_ok());
        assert!(ring.plan_rotation(k1_retires, H).is_ok());
    }

    #[test]
    fn prepublished_key_is_next_until_its_moment() {
        let mut ring = Keyring::new("k1".into(), KeySpec::P256, t(0), DAY);
        let plan = ring.plan_rotation(t(10), H).unwrap();
        assert_eq!(
            plan,
            RotationPlan::NewKey {
                activates_at: t(10).plus(H)
            }
        );
        ring.add_key("k2".into(), KeySpec::P256, t(10), t(10).plus(H), DAY);
        assert_eq!(ring.get("k2").unwrap().state(t(11)), KeyState::Next);
        assert_eq!(ring.active(t(11)).unwrap().kid, "k1");
        assert_eq!(published(&ring, t(11)), ["k1", "k2"]);
        let switch = t(10).plus(H);
        assert_eq!(ring.active(switch).unwrap().kid, "k2");
        assert_eq!(ring.get("k1").unwrap().retires_at, Some(switch.plus(DAY)));
        // A second pre-published rotation while one is pending is refused; an immediate one promotes.
        assert!(matches!(
            ring.plan_rotation(t(12), H),
            Err(LifecycleError::RotationPending { .. })
        ));
        rotate_now(&mut ring, "unused", t(12));
        assert_eq!(ring.active(t(12)).unwrap().kid, "k2");
        assert!(ring.get("unused").is_none());
    }

    #[test]
    fn schedule_waits_so_that_at_most_three_keys_are_published() {
        let policy = Policy {
            max_token_lifetime: DAY,
            rotation_period: Some(H),
            prepublish: Duration::from_secs(600),
        };
        let mut ring = Keyring::new("k1".into(), KeySpec::P256, t(0), DAY);
        assert_eq!(ring.rotation_due(t(0), &policy), Some(t(3000)));
        let mut now = t(0);
        for i in 2..8 {
            now = ring.rotation_due(now, &policy).unwrap().max(now);
            let RotationPlan::NewKey { activates_at } =
                ring.plan_rotation(now, policy.prepublish).unwrap()
            else {
                panic!("no pending key expected")
            };
            ring.add_key(format!("k{i}"), KeySpec::P256, now, activates_at, DAY);
            for probe in 0..100 {
                let at = now.plus(Duration::from_secs(probe * 1000));
                assert!(ring.published(at).count() <= 3, "at {at:?}");
            }
            now = activates_at;
            ring.prune(now);
        }
    }

    #[test]
    fn raising_the_max_lifetime_extends_retirement_of_keys_still_signing() {
        let mut ring = Keyring::new("k1".into(), KeySpec::P256, t(0), DAY);
        ring.add_key("k2".into(), KeySpec::P256, t(0), t(100), H);
        assert!(ring.apply_max_lifetime(t(50), DAY));
        assert_eq!(ring.get("k1").unwrap().retires_at, Some(t(100).plus(DAY)));
        assert!(!ring.apply_max_lifetime(t(50), H), "never shortened");
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let ring = Keyring::new("k1".into(), KeySpec::P256, t(0), DAY);
        let mut twice = ring.records().to_vec();
        twice.push(twice[0].clone());
        assert!(Keyring::from_records(twice).is_err());
        assert!(Keyring::from_records(vec![]).is_err());
    }
}
