//! Fuzzes `kvindex::codec::decode_batch` with arbitrary bytes.
//!
//! The decoder must never panic, and whatever it accepts must survive a round trip: re-encoded
//! (map form and legacy array form) it decodes to the same batch, and encoding is stable.
#![no_main]

use kvindex::codec::{decode_batch, encode_batch, encode_batch_with, EncodeOptions};
use kvindex::EventBatch;
use libfuzzer_sys::fuzz_target;

/// Equality with `ts` compared by bits, so that NaN timestamps compare equal to themselves.
fn assert_same(a: &EventBatch, b: &EventBatch) {
    assert_eq!(a.ts.to_bits(), b.ts.to_bits());
    assert_eq!(a.events, b.events);
    assert_eq!(a.data_parallel_rank, b.data_parallel_rank);
}

fuzz_target!(|data: &[u8]| {
    let Ok(first) = decode_batch(data) else {
        return;
    };
    let mut encoded = Vec::new();
    encode_batch(&first, &mut encoded);
    let second = decode_batch(&encoded).expect("a re-encoded batch decodes");
    assert_same(&first, &second);
    let mut again = Vec::new();
    encode_batch(&second, &mut again);
    assert_eq!(encoded, again, "encoding is stable");

    let mut legacy = Vec::new();
    encode_batch_with(
        &first,
        &mut legacy,
        EncodeOptions {
            legacy_arrays: true,
        },
    );
    let third = decode_batch(&legacy).expect("a re-encoded legacy batch decodes");
    assert_same(&first, &third);
});
