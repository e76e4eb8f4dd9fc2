//! Per-Migration exclusion: the loop never runs two `advance`s of one Migration at once.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::migration_key;
use crate::crd::Migration;

/// Migrations this executor drives at the moment, so the loop never runs two `advance`s of one
/// Migration at once.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<BTreeSet<String>>>,
}

impl InFlight {
    pub fn try_start(&self, migration: &Migration) -> Option<InFlightGuard> {
        let key = migration_key(migration);
        let mut keys = self.keys.lock().ok()?;
        keys.insert(key.clone()).then(|| InFlightGuard {
            keys: self.keys.clone(),
            key,
        })
    }
}

#[derive(Debug)]
pub struct InFlightGuard {
    keys: Arc<Mutex<BTreeSet<String>>>,
    key: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(&self.key);
        }
    }
}
