//! The Alertmanager webhook body comes over the network from anything that holds the token (or
//! a misconfigured Alertmanager): decoding must never panic, and every alert it accepts must be
//! named, with a namespace whenever it names a pod.
#![no_main]

use automigrate_operator::alertmanager;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(alerts) = alertmanager::decode(data) {
        for alert in alerts {
            assert!(!alert.name.is_empty());
            if alert.labels.contains_key("pod") {
                assert!(alert.labels.contains_key("namespace"));
            }
        }
    }
});
