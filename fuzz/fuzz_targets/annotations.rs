//! Pod annotations are written by anyone who can create a pod: parsing them must never panic,
//! and every key it does not understand under our prefix must be reported, not ignored.
#![no_main]

use std::collections::BTreeMap;

use automigrate_core::annotations;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, arbitrary::Arbitrary)]
struct Input {
    namespace: String,
    name: String,
    /// Keys are mostly ours, so the fuzzer spends its time on values.
    entries: Vec<(u8, String, String)>,
}

fuzz_target!(|input: Input| {
    let mut map = BTreeMap::new();
    for (pick, suffix, value) in input.entries {
        let key = match annotations::KNOWN.get(usize::from(pick) % (annotations::KNOWN.len() + 1)) {
            Some((key, _)) => (*key).to_string(),
            None => format!("automigrate.dev/{suffix}"),
        };
        map.insert(key, value);
    }
    let (_settings, errors) = annotations::parse(&input.namespace, &input.name, &map);
    for error in errors {
        // Every error must render (it becomes an Event message).
        let _ = error.to_string();
    }
});
