//! What this node keeps for the DHT, and how it keeps it when peers try to fill it.
//!
//! Every stored announcement is signed by the server it names (checked before it gets
//! here), but peer ids are free: an attacker can sign thousands of its own. So a stored
//! record lives at most as long as an announcement is valid, whatever expiry its sender
//! asked for; a full store first drops what has expired, then what expires soonest (an
//! honest server re-announces within its TTL, a flood of one-off identities does not);
//! and a model's provider list holds many servers, with expired entries cleared before
//! each addition, so that first-come squatters cannot keep the 21st honest server of a
//! popular model out of it. And what one address may store is capped ([`Senders`]):
//! identities are free, addresses are not.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::PeerId;

use super::addresses::PeerGroup;
use super::record::MAX_AGE_SECS;

/// Announcements kept: far more than the servers of any model, within a few MB.
const MAX_RECORDS: usize = 4096;
/// Servers kept per model key.
const MAX_PROVIDERS_PER_KEY: usize = 512;
/// Announcements, and providers of one model, that one group of senders (an address)
/// may have in the store: more servers than share one address in practice, and a
/// small part of the store.
pub const MAX_PER_GROUP: usize = 64;

/// Who sent what is in the store, by group of senders, so that one address cannot
/// fill it with records of identities made for the purpose. An entry is `K`: a
/// record's key, or a model key and a provider.
#[derive(Debug)]
pub struct Senders<K> {
    sent_by: HashMap<K, PeerGroup>,
}

impl<K> Default for Senders<K> {
    fn default() -> Self {
        Self {
            sent_by: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> Senders<K> {
    /// Whether `group` may store `entry` (it already holds it, or holds fewer than
    /// its cap of `family`'s entries); if so, counts it as `group`'s. `family` picks
    /// the entries the cap counts (all records; one model's providers), and `kept`
    /// says whether an entry is still in the store, for forgetting the ones that left.
    pub fn admit(
        &mut self,
        entry: &K,
        group: PeerGroup,
        family: impl Fn(&K) -> bool,
        kept: impl Fn(&K) -> bool,
    ) -> bool {
        if self.sent_by.get(entry) == Some(&group) {
            return true;
        }
        let held = |sent_by: &HashMap<K, PeerGroup>| {
            sent_by
                .iter()
                .filter(|(k, g)| **g == group && family(k))
                .count()
        };
        if held(&self.sent_by) >= MAX_PER_GROUP {
            self.sent_by.retain(|k, _| kept(k));
            if held(&self.sent_by) >= MAX_PER_GROUP {
                return false;
            }
        }
        self.sent_by.insert(entry.clone(), group);
        true
    }
}

/// Stores an announcement sent by `group`, within the group's cap.
pub fn put_from(
    store: &mut MemoryStore,
    senders: &mut Senders<RecordKey>,
    group: PeerGroup,
    record: Record,
    now: Instant,
) -> Result<(), String> {
    let kept = |k: &RecordKey| store.get(k).is_some_and(|r| !r.is_expired(now));
    if !senders.admit(&record.key, group, |_| true, kept) {
        return Err(format!(
            "{group:?} has {MAX_PER_GROUP} announcements stored here"
        ));
    }
    put(store, record, now)
}

/// Adds a provider sent by `group`, within the group's cap for that model.
pub fn add_provider_from(
    store: &mut MemoryStore,
    senders: &mut Senders<(RecordKey, PeerId)>,
    group: PeerGroup,
    record: ProviderRecord,
    now: Instant,
) -> Result<(), String> {
    let entry = (record.key.clone(), record.provider);
    let kept = |(key, peer): &(RecordKey, PeerId)| {
        store
            .providers(key)
            .iter()
            .any(|p| p.provider == *peer && !p.is_expired(now))
    };
    let family = |(key, _): &(RecordKey, PeerId)| *key == record.key;
    if !senders.admit(&entry, group, family, kept) {
        return Err(format!(
            "{group:?} has {MAX_PER_GROUP} providers of this model here"
        ));
    }
    add_provider(store, record, now)
}

pub fn config() -> MemoryStoreConfig {
    MemoryStoreConfig {
        max_records: MAX_RECORDS,
        max_providers_per_key: MAX_PROVIDERS_PER_KEY,
        ..MemoryStoreConfig::default()
    }
}

/// Stores an announcement another peer sent, on this node's terms.
pub fn put(store: &mut MemoryStore, mut record: Record, now: Instant) -> Result<(), String> {
    let longest = now + Duration::from_secs(MAX_AGE_SECS);
    record.expires = Some(record.expires.map_or(longest, |e| e.min(longest)));
    make_room(store, &record.key, now);
    store.put(record).map_err(|e| e.to_string())
}

/// Frees a place for `key` in a full store, unless it is there already: every expired
/// record, or else the one that expires soonest. This node's own announcement goes
/// through here too, so a store filled by others never keeps it out.
pub fn make_room(store: &mut MemoryStore, key: &RecordKey, now: Instant) {
    if store.get(key).is_some() || store.records().count() < MAX_RECORDS {
        return;
    }
    let expired: Vec<_> = store
        .records()
        .filter(|r| r.is_expired(now))
        .map(|r| r.key.clone())
        .collect();
    for key in &expired {
        store.remove(key);
    }
    if expired.is_empty() {
        let soonest = store
            .records()
            .min_by_key(|r| r.expires)
            .map(|r| r.key.clone());
        if let Some(key) = soonest {
            store.remove(&key);
        }
    }
}

/// Adds a provider of a model key, clearing the key's expired providers first.
pub fn add_provider(
    store: &mut MemoryStore,
    record: ProviderRecord,
    now: Instant,
) -> Result<(), String> {
    let expired: Vec<_> = store
        .providers(&record.key)
        .into_iter()
        .filter(|p| p.is_expired(now))
        .map(|p| p.provider)
        .collect();
    for provider in expired {
        store.remove_provider(&record.key, &provider);
    }
    store.add_provider(record).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemoryStore {
        MemoryStore::with_config(PeerId::random(), config())
    }

    fn record(name: String, expires: Option<Instant>) -> Record {
        let mut r = Record::new(RecordKey::new(&name), vec![1]);
        r.expires = expires;
        r
    }

    #[test]
    fn a_senders_expiry_is_capped() {
        let mut s = store();
        let now = Instant::now();
        put(&mut s, record("a".into(), None), now).unwrap();
        let far = now + Duration::from_secs(86_400);
        put(&mut s, record("b".into(), Some(far)), now).unwrap();
        for r in s.records() {
            assert!(r.expires.unwrap() <= now + Duration::from_secs(MAX_AGE_SECS));
        }
    }

    #[test]
    fn a_full_store_still_takes_fresh_records() {
        let mut s = store();
        let now = Instant::now();
        for i in 0..MAX_RECORDS {
            put(&mut s, record(format!("sybil{i}"), None), now).unwrap();
        }
        // Still full of unexpired records: the one expiring soonest makes room.
        put(&mut s, record("honest".into(), None), now).unwrap();
        assert!(s.get(&RecordKey::new(&"honest")).is_some());
        // Later, the flood has expired: it all goes at once.
        let later = now + Duration::from_secs(MAX_AGE_SECS + 1);
        put(&mut s, record("again".into(), None), later).unwrap();
        assert_eq!(s.records().count(), 1);
    }

    #[test]
    fn one_address_cannot_fill_the_store() {
        let mut s = store();
        let mut senders = Senders::default();
        let now = Instant::now();
        let sybils = PeerGroup::Net(7);
        for i in 0..MAX_RECORDS {
            let stored = put_from(
                &mut s,
                &mut senders,
                sybils,
                record(format!("s{i}"), None),
                now,
            );
            assert_eq!(stored.is_ok(), i < MAX_PER_GROUP, "record {i}");
        }
        assert_eq!(s.records().count(), MAX_PER_GROUP);
        // Its own records it may refresh; others still store theirs.
        put_from(&mut s, &mut senders, sybils, record("s0".into(), None), now).unwrap();
        put_from(
            &mut s,
            &mut senders,
            PeerGroup::Net(8),
            record("x".into(), None),
            now,
        )
        .unwrap();
        // Once its records have expired, the address may store again.
        let later = now + Duration::from_secs(MAX_AGE_SECS + 1);
        put_from(
            &mut s,
            &mut senders,
            sybils,
            record("new".into(), None),
            later,
        )
        .unwrap();

        let mut providers = Senders::default();
        let model = RecordKey::new(&"model");
        let provider = |key: &RecordKey| {
            let mut p = ProviderRecord::new(key.clone(), PeerId::random(), vec![]);
            p.expires = Some(now + Duration::from_secs(30));
            p
        };
        for i in 0..MAX_PER_GROUP + 5 {
            let added = add_provider_from(&mut s, &mut providers, sybils, provider(&model), now);
            assert_eq!(added.is_ok(), i < MAX_PER_GROUP);
        }
        // The cap is per model: another model's list takes the same address.
        let other = RecordKey::new(&"other model");
        add_provider_from(&mut s, &mut providers, sybils, provider(&other), now).unwrap();
        add_provider_from(
            &mut s,
            &mut providers,
            PeerGroup::Net(8),
            provider(&model),
            now,
        )
        .unwrap();
        assert_eq!(s.providers(&model).len(), MAX_PER_GROUP + 1);
    }

    #[test]
    fn expired_providers_make_room_and_many_servers_fit() {
        let mut s = store();
        let key = RecordKey::new(&"model");
        let now = Instant::now();
        let provider = |expires| {
            let mut p = ProviderRecord::new(key.clone(), PeerId::random(), vec![]);
            p.expires = Some(expires);
            p
        };
        for _ in 0..MAX_PROVIDERS_PER_KEY {
            add_provider(&mut s, provider(now + Duration::from_secs(30)), now).unwrap();
        }
        assert_eq!(s.providers(&key).len(), MAX_PROVIDERS_PER_KEY);
        let later = now + Duration::from_secs(31);
        let honest = provider(later + Duration::from_secs(30));
        let id = honest.provider;
        add_provider(&mut s, honest, later).unwrap();
        assert_eq!(s.providers(&key).len(), 1);
        assert_eq!(s.providers(&key)[0].provider, id);
    }
}
