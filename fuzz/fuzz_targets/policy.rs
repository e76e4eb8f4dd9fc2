//! The policy parser reads whatever a user puts in a ConfigMap: it must return a value or an
//! error for any text, and a policy it accepts must survive a round trip through YAML.
#![no_main]

use automigrate_core::policy::{Policy, PolicySet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = Policy::from_yaml("fuzz", text) {
        // What we accept, we can also print and read back unchanged.
        let yaml = serde_saphyr::to_string(&policy).expect("an accepted policy serialises");
        let again = Policy::from_yaml("fuzz", &yaml).expect("a printed policy parses again");
        assert_eq!(policy, again, "round trip changed the policy:\n{yaml}");
    }
    // The registry keeps the last valid version whatever the edit.
    let mut set = PolicySet::new();
    let _ = set.apply("fuzz", text);
});
