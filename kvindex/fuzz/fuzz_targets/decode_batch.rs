//! Fuzzes `kvindex::codec::decode_batch` with arbitrary bytes.
//!
//! The decoder must never panic, and whatever it accepts must survive a round trip: re-encoded
//! (map form and legacy array form) it decodes to the same batch, and encoding is stable. A
//! `BatchDecoder` kept across inputs (so each decodes over the events of earlier ones) must
//! accept and reject exactly what `decode_batch` does, and decode the same batch.
#![no_main]

use kvindex::codec::{decode_batch, encode_batch, encode_batch_with, BatchDecoder, EncodeOptions};
use kvindex::EventBatch;
use libfuzzer_sys::fuzz_target;

/// Equality with `ts` compared by bits, so that NaN timestamps compare equal to themselves.
fn assert_same(a: &EventBatch, b: &EventBatch) {
    assert_eq!(a.ts.to_bits(), b.ts.to_bits());
    assert_eq!(a.events, b.events);
    assert_eq!(a.data_parallel_rank, b.data_parallel_rank);
}

thread_local! {
    static REUSED: std::cell::RefCell<BatchDecoder> = std::cell::RefCell::new(BatchDecoder::new());
}

fuzz_target!(|data: &[u8]| {
    let fresh = decode_batch(data);
    REUSED.with_borrow_mut(|d| match (d.decode(data), &fresh) {
        (Ok(reused), Ok(fresh)) => assert_same(reused, fresh),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("reused decoder: {:?}, fresh: {:?}", a.map(|_| ()), b.as_ref().map(|_| ())),
    });
    let Ok(first) = fresh else {
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
