//! What this node keeps for the DHT, and how it keeps it when peers try to fill it.
//!
//! Every stored announcement is signed by the server it names (checked before it gets
//! here), but peer ids are free: an attacker can sign thousands of its own. So a stored
//! record lives at most as long as an announcement is valid, whatever expiry its sender
//! asked for; a full store first drops what has expired, then what expires soonest (an
//! honest server re-announces within its TTL, a flood of one-off identities does not);
//! and a model's provider list holds many servers, with expired entries cleared before
//! each addition, so that first-come squatters cannot keep the 21st honest server of a
//! popular model out of it.

use std::time::{Duration, Instant};

use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};

use super::record::MAX_AGE_SECS;

/// Announcements kept: far more than the servers of any model, within a few MB.
const MAX_RECORDS: usize = 4096;
/// Servers kept per model key.
const MAX_PROVIDERS_PER_KEY: usize = 512;

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
    use libp2p::PeerId;

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
