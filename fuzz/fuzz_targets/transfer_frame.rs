//! The transfer protocol's frame decoder reads bytes from the network (after mutual TLS, but a
//! peer can still be buggy or compromised): it must never panic or allocate beyond the frame
//! ceilings, and whatever it decodes must encode back to the same frame.
#![no_main]

use automigrate_transfer::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = wire::decode(rest) {
        let mut encoded = Vec::new();
        if frame.encode(&mut encoded).is_ok() {
            let (again, again_used) = wire::decode(&encoded)
                .expect("an encoded frame decodes")
                .expect("an encoded frame is complete");
            assert_eq!(frame, again);
            assert_eq!(again_used, encoded.len());
        }
        rest = &rest[used..];
    }
});
