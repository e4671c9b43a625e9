//! Tests of the KV-event codec: golden payloads, hostile inputs and round trips.

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;

// Golden payloads of shared/docs/vllm-interfaces.md section 1.2.
const GOLDEN_STORED: &str = "93cb41d954fc40100000918ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657392cf7b0bf7bf7fd01682cf0b368b33d87bf3bfb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc00200102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20aa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797392c0c0a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e00";
const GOLDEN_REMOVED: &str = "93cb41d954fc406000009284a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391cf0b368b33d87bf3bfa66d656469756da3475055a967726f75705f6964780081a474797065b0416c6c426c6f636b73436c656172656400";
const GOLDEN_BYTES_HASH: &str = "93cb3ff0000000000000918ca474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391c420cd7c51bc5a8fc8643f383a2b9e01522fba7473c669e9270c7b0bf7bf7fd01682b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc00100102030405060708090a0b0c0d0e0f10aa626c6f636b5f73697a6510a76c6f72615f696401a66d656469756da3475055a96c6f72615f6e616d65a76d792d6c6f7261aa65787472615f6b6579739193a76d792d6c6f726192a8696d672d6861736803a874656e616e742d61a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6eaa73657373696f6e5f6964a2733100";
const GOLDEN_LEGACY: &str =
    "93cb3ff00000000000009198ab426c6f636b53746f7265649105c092010202c0a3475055c000";

const H1: u64 = 8866452693264111234;
const H2: u64 = 807986237951177663;

fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn encode(batch: &EventBatch) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch(batch, &mut out);
    out
}

fn encode_legacy(batch: &EventBatch) -> Vec<u8> {
    let mut out = Vec::new();
    encode_batch_with(
        batch,
        &mut out,
        EncodeOptions {
            legacy_arrays: true,
        },
    );
    out
}

fn decode_err(buf: &[u8]) -> (usize, &'static str) {
    match decode_batch(buf) {
        Err(IndexError::Decode { offset, reason }) => (offset, reason),
        other => panic!("expected a decode error, got {other:?}"),
    }
}

fn stored(batch: &EventBatch, i: usize) -> &BlockStored {
    match &batch.events[i] {
        KvEvent::BlockStored(e) => e,
        other => panic!("event {i} is not BlockStored: {other:?}"),
    }
}

/// A test-side msgpack value, to build hostile and unusual payloads.
enum V {
    Nil,
    U(u64),
    I(i64),
    F(f64),
    S(&'static str),
    A(Vec<V>),
    M(Vec<(V, V)>),
    /// Verbatim bytes (non-canonical encodings, invalid data).
    Raw(Vec<u8>),
}

fn enc_v(v: &V, out: &mut Vec<u8>) {
    match v {
        V::Nil => out.push(0xc0),
        V::U(u) => write_uint(out, *u),
        V::I(i) => write_int(out, *i),
        V::F(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        V::S(s) => write_str(out, s),
        V::A(items) => {
            write_array_len(out, items.len());
            items.iter().for_each(|i| enc_v(i, out));
        }
        V::M(pairs) => {
            write_map_len(out, pairs.len());
            for (k, v) in pairs {
                enc_v(k, out);
                enc_v(v, out);
            }
        }
        V::Raw(b) => out.extend_from_slice(b),
    }
}

fn bytes_of(v: &V) -> Vec<u8> {
    let mut out = Vec::new();
    enc_v(v, &mut out);
    out
}

/// A batch `[1.5, events, 7]`.
fn batch_of(events: Vec<V>) -> Vec<u8> {
    bytes_of(&V::A(vec![V::F(1.5), V::A(events), V::U(7)]))
}

fn raw(s: &str) -> V {
    V::Raw(hex(s))
}

fn golden_stored() -> EventBatch {
    EventBatch {
        ts: 1700000000.25,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: vec![EngineHash(H1), EngineHash(H2)],
            parent_block_hash: None,
            token_ids: (1..=32).collect(),
            block_size: 16,
            lora_id: None,
            medium: Some(Medium::Gpu),
            lora_name: None,
            extra_keys: Some(vec![None, None]),
            group_idx: Some(0),
            kv_cache_spec_kind: Some("full_attention".into()),
            ..BlockStored::default()
        })],
        data_parallel_rank: Some(0),
    }
}

fn golden_removed() -> EventBatch {
    EventBatch {
        ts: 1700000001.5,
        events: vec![
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![EngineHash(H2)],
                medium: Some(Medium::Gpu),
                group_idx: Some(0),
                locality: None,
                ownership: None,
            }),
            KvEvent::AllBlocksCleared,
        ],
        data_parallel_rank: Some(0),
    }
}

fn golden_legacy() -> EventBatch {
    EventBatch {
        ts: 1.0,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: vec![EngineHash(5)],
            parent_block_hash: None,
            token_ids: vec![1, 2],
            block_size: 2,
            lora_id: None,
            medium: Some(Medium::Gpu),
            lora_name: None,
            ..BlockStored::default()
        })],
        data_parallel_rank: Some(0),
    }
}

#[test]
fn golden_stored_decodes() {
    let b = decode_batch(&hex(GOLDEN_STORED)).unwrap();
    assert_eq!(b.ts, 1700000000.25);
    assert_eq!(b.data_parallel_rank, Some(0));
    assert_eq!(b.events.len(), 1);
    let e = stored(&b, 0);
    assert_eq!(e.block_hashes, vec![EngineHash(H1), EngineHash(H2)]);
    assert_eq!(e.block_hashes[0].0, 0x7b0b_f7bf_7fd0_1682);
    assert_eq!(e.parent_block_hash, None);
    assert_eq!(e.token_ids, (1..=32).collect::<Vec<u32>>());
    assert_eq!(e.block_size, 16);
    assert_eq!(e.lora_id, None);
    assert_eq!(e.medium, Some(Medium::Gpu));
    assert_eq!(e.lora_name, None);
    assert_eq!(e.extra_keys, Some(vec![None, None]));
    assert_eq!(e.group_idx, Some(0));
    assert_eq!(e.kv_cache_spec_kind.as_deref(), Some("full_attention"));
    assert_eq!(e.kv_cache_spec_sliding_window, None);
    assert_eq!(e.locality, None);
    assert_eq!(e.ownership, None);
    assert_eq!(e.session_id, None);
    assert_eq!(b, golden_stored());
}

#[test]
fn golden_removed_decodes() {
    let b = decode_batch(&hex(GOLDEN_REMOVED)).unwrap();
    assert_eq!(b.ts, 1700000001.5);
    assert_eq!(b.data_parallel_rank, Some(0));
    assert_eq!(b.events.len(), 2);
    let KvEvent::BlockRemoved(r) = &b.events[0] else {
        panic!("not BlockRemoved: {:?}", b.events[0]);
    };
    assert_eq!(r.block_hashes, vec![EngineHash(H2)]);
    assert_eq!(r.medium, Some(Medium::Gpu));
    assert_eq!(r.group_idx, Some(0));
    assert_eq!(r.locality, None);
    assert_eq!(r.ownership, None);
    assert_eq!(b.events[1], KvEvent::AllBlocksCleared);
    assert_eq!(b, golden_removed());
}

#[test]
fn golden_bytes_hash_decodes() {
    let b = decode_batch(&hex(GOLDEN_BYTES_HASH)).unwrap();
    assert_eq!(b.ts, 1.0);
    assert_eq!(b.data_parallel_rank, Some(0));
    assert_eq!(b.events.len(), 1);
    let e = stored(&b, 0);
    // The int form of a digest is its last 8 bytes: the same hash as in the first golden.
    assert_eq!(e.block_hashes, vec![EngineHash(H1)]);
    assert_eq!(e.parent_block_hash, None);
    assert_eq!(e.token_ids, (1..=16).collect::<Vec<u32>>());
    assert_eq!(e.block_size, 16);
    assert_eq!(e.lora_id, Some(1));
    assert_eq!(e.medium, Some(Medium::Gpu));
    assert_eq!(e.lora_name.as_deref(), Some("my-lora"));
    assert_eq!(
        e.extra_keys,
        Some(vec![Some(vec![
            ExtraKey::Str("my-lora".into()),
            ExtraKey::Mm {
                identifier: "img-hash".into(),
                offset: 3
            },
            ExtraKey::Str("tenant-a".into()),
        ])])
    );
    assert_eq!(e.group_idx, Some(0));
    assert_eq!(e.kv_cache_spec_kind.as_deref(), Some("full_attention"));
    assert_eq!(e.kv_cache_spec_sliding_window, None);
    assert_eq!(e.locality, None);
    assert_eq!(e.ownership, None);
    assert_eq!(e.session_id.as_deref(), Some("s1"));
}

#[test]
fn golden_legacy_decodes() {
    let b = decode_batch(&hex(GOLDEN_LEGACY)).unwrap();
    assert_eq!(b, golden_legacy());
}

#[test]
fn encode_reproduces_goldens_byte_for_byte() {
    assert_eq!(encode(&golden_stored()), hex(GOLDEN_STORED));
    assert_eq!(encode(&golden_removed()), hex(GOLDEN_REMOVED));
    assert_eq!(encode_legacy(&golden_legacy()), hex(GOLDEN_LEGACY));
    // Decode then encode is the identity on every golden with integer hashes.
    for g in [GOLDEN_STORED, GOLDEN_REMOVED] {
        assert_eq!(encode(&decode_batch(&hex(g)).unwrap()), hex(g));
    }
    // The bytes-hash golden re-encodes with integer hashes and decodes to the same batch.
    let b = decode_batch(&hex(GOLDEN_BYTES_HASH)).unwrap();
    assert_eq!(decode_batch(&encode(&b)).unwrap(), b);
    assert_eq!(decode_batch(&encode_legacy(&b)).unwrap(), b);
}

#[test]
fn encode_appends() {
    let mut out = vec![0xaa];
    encode_batch(&golden_removed(), &mut out);
    assert_eq!(out[0], 0xaa);
    assert_eq!(&out[1..], &hex(GOLDEN_REMOVED)[..]);
}

#[test]
fn legacy_forms_of_all_event_types() {
    let batch = EventBatch {
        ts: 2.5,
        events: vec![
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![EngineHash(1), EngineHash(u64::MAX)],
                medium: None,
                group_idx: None,
                locality: Some("LOCAL".into()),
                ownership: None,
            }),
            KvEvent::AllBlocksCleared,
            KvEvent::BlockStored(BlockStored {
                block_hashes: vec![EngineHash(9)],
                token_ids: vec![3; 4],
                block_size: 4,
                session_id: Some("s".into()),
                ..BlockStored::default()
            }),
        ],
        data_parallel_rank: None,
    };
    let legacy = encode_legacy(&batch);
    let expected = bytes_of(&V::A(vec![
        V::F(2.5),
        V::A(vec![
            V::A(vec![
                V::S("BlockRemoved"),
                V::A(vec![V::U(1), V::U(u64::MAX)]),
                V::Nil,
                V::Nil,
                V::S("LOCAL"),
            ]),
            V::A(vec![V::S("AllBlocksCleared")]),
            V::A(vec![
                V::S("BlockStored"),
                V::A(vec![V::U(9)]),
                V::Nil,
                V::A(vec![V::U(3), V::U(3), V::U(3), V::U(3)]),
                V::U(4),
                V::Nil,
                V::Nil,
                V::Nil,
                V::Nil,
                V::Nil,
                V::Nil,
                V::Nil,
                V::Nil,
                V::Nil,
                V::S("s"),
            ]),
        ]),
        V::Nil,
    ]));
    assert_eq!(legacy, expected);
    assert_eq!(decode_batch(&legacy).unwrap(), batch);
    assert_eq!(decode_batch(&encode(&batch)).unwrap(), batch);
}

#[test]
fn legacy_short_and_long_events() {
    // Oldest form: no medium, no lora_name; and a newer one with an unknown 16th field.
    let buf = batch_of(vec![
        V::A(vec![
            V::S("BlockStored"),
            V::A(vec![V::U(1)]),
            V::U(0),
            V::A(vec![V::U(7)]),
            V::U(1),
            V::I(3),
        ]),
        V::A(vec![
            V::S("BlockRemoved"),
            V::A(vec![V::U(1)]),
            V::S("CPU"),
            V::U(2),
            V::S("REMOTE"),
            V::S("tier-1"),
            V::M(vec![(V::S("future"), V::A(vec![V::Nil]))]),
        ]),
        V::A(vec![V::S("AllBlocksCleared"), V::U(1), V::U(2)]),
    ]);
    let b = decode_batch(&buf).unwrap();
    assert_eq!(
        b.events,
        vec![
            KvEvent::BlockStored(BlockStored {
                block_hashes: vec![EngineHash(1)],
                parent_block_hash: Some(EngineHash(0)),
                token_ids: vec![7],
                block_size: 1,
                lora_id: Some(3),
                ..BlockStored::default()
            }),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![EngineHash(1)],
                medium: Some(Medium::Cpu),
                group_idx: Some(2),
                locality: Some("REMOTE".into()),
                ownership: Some("tier-1".into()),
            }),
            KvEvent::AllBlocksCleared,
        ]
    );
    // Too short: BlockStored without block_size.
    let buf = batch_of(vec![V::A(vec![
        V::S("BlockStored"),
        V::A(vec![]),
        V::Nil,
        V::A(vec![]),
    ])]);
    assert_eq!(decode_err(&buf).1, "BlockStored has no block_size");
    assert_eq!(
        decode_err(&batch_of(vec![V::A(vec![])])).1,
        "event array is empty"
    );
}

#[test]
fn map_keys_in_any_order_and_unknown_keys_skipped() {
    let nested = V::M(vec![
        (V::S("a"), V::A(vec![V::U(1), V::F(2.0), V::Nil, raw("c3")])),
        (V::U(5), raw("c40401020304")), // non-string key, bin value
        (V::S("ext"), raw("d6ff00000001")), // fixext4
        (raw("c70201ffff"), raw("ca3f800000")), // ext8 key, f32 value
        (raw("c0"), raw("d80100000000000000000000000000000000")), // nil key, fixext16
        (V::S("s"), raw("da0003616263")), // str16
    ]);
    let buf = batch_of(vec![V::M(vec![
        (V::S("zzz_unknown"), nested),
        (
            V::S("token_ids"),
            V::A(vec![V::U(1), V::U(300), V::U(70000)]),
        ),
        (V::S("medium"), V::S("cpu")),
        (V::U(1), V::A(vec![V::A(vec![V::Nil])])),
        (V::S("block_size"), V::U(3)),
        (V::S("block_hashes"), V::A(vec![V::U(10)])),
        (V::S("group_idx"), V::Nil),
        (V::S("locality"), V::S("LOCAL")),
        (V::S("unknown_bin"), raw("c5000100")),
        (V::S("type"), V::S("BlockStored")),
        (V::S("parent_block_hash"), V::U(9)),
        (V::S("kv_cache_spec_sliding_window"), V::I(128)),
        (V::S("ownership"), V::S("t")),
    ])]);
    let b = decode_batch(&buf).unwrap();
    assert_eq!(b.data_parallel_rank, Some(7));
    assert_eq!(
        b.events,
        vec![KvEvent::BlockStored(BlockStored {
            block_hashes: vec![EngineHash(10)],
            parent_block_hash: Some(EngineHash(9)),
            token_ids: vec![1, 300, 70000],
            block_size: 3,
            medium: Some(Medium::Cpu),
            kv_cache_spec_sliding_window: Some(128),
            locality: Some("LOCAL".into()),
            ownership: Some("t".into()),
            ..BlockStored::default()
        })]
    );
}

#[test]
fn fields_of_other_event_types_are_ignored() {
    // `type` first: BlockStored-only keys of a BlockRemoved are skipped unread (even if bad).
    let removed = V::M(vec![
        (V::S("type"), V::S("BlockRemoved")),
        (V::S("token_ids"), V::A(vec![V::I(-1)])),
        (V::S("block_hashes"), V::A(vec![V::U(3)])),
    ]);
    let cleared = V::M(vec![
        (V::S("type"), V::S("AllBlocksCleared")),
        (V::S("block_hashes"), V::S("junk")),
    ]);
    // `type` last: fields are read, then discarded.
    let removed_late = V::M(vec![
        (V::S("lora_name"), V::S("x")),
        (V::S("block_hashes"), V::A(vec![V::U(4)])),
        (V::S("type"), V::S("BlockRemoved")),
    ]);
    let b = decode_batch(&batch_of(vec![removed, cleared, removed_late])).unwrap();
    let removed = |h| {
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![EngineHash(h)],
            ..BlockRemoved::default()
        })
    };
    assert_eq!(
        b.events,
        vec![removed(3), KvEvent::AllBlocksCleared, removed(4)]
    );
}

#[test]
fn unknown_event_types_are_skipped() {
    let buf = batch_of(vec![
        V::M(vec![
            (V::S("type"), V::S("BlockPinned")),
            (V::S("block_hashes"), V::A(vec![V::U(1)])),
            (V::S("whatever"), V::M(vec![(V::U(1), V::U(2))])),
        ]),
        V::A(vec![V::S("FutureEvent"), V::A(vec![V::Nil]), V::U(3)]),
        V::M(vec![(V::S("type"), V::S("AllBlocksCleared"))]),
    ]);
    let b = decode_batch(&buf).unwrap();
    assert_eq!(b.events, vec![KvEvent::AllBlocksCleared]);
}

#[test]
fn every_int_width_is_accepted() {
    let widths = [
        "05",
        "cc05",
        "cd0005",
        "ce00000005",
        "cf0000000000000005",
        "d005",
        "d10005",
        "d200000005",
        "d30000000000000005",
    ];
    let tokens: Vec<V> = widths.iter().map(|w| raw(w)).collect();
    let hashes: Vec<V> = widths.iter().map(|w| raw(w)).collect();
    let buf = bytes_of(&V::A(vec![
        raw("cd0102"), // integer ts
        V::A(vec![V::A(vec![
            V::S("BlockStored"),
            V::A(hashes),
            raw("ff"), // negative fixint parent hash: two's complement
            V::A(tokens),
            raw("d10009"),
            raw("d3fffffffffffffffe"),
        ])]),
        raw("d2ffffffff"),
    ]));
    let b = decode_batch(&buf).unwrap();
    assert_eq!(b.ts, 258.0);
    assert_eq!(b.data_parallel_rank, Some(-1));
    let e = stored(&b, 0);
    assert_eq!(e.block_hashes, vec![EngineHash(5); 9]);
    assert_eq!(e.parent_block_hash, Some(EngineHash(u64::MAX)));
    assert_eq!(e.token_ids, vec![5; 9]);
    assert_eq!(e.block_size, 9);
    assert_eq!(e.lora_id, Some(-2));
    // Large values of each width.
    let buf = batch_of(vec![V::A(vec![
        V::S("BlockStored"),
        V::A(vec![
            raw("cfffffffffffffffff"),
            raw("d38000000000000000"),
            raw("c403010203"),
        ]),
        raw("c4090102030405060708ff"),
        V::A(vec![
            raw("ccff"),
            raw("cdffff"),
            raw("ceffffffff"),
            raw("cf00000000ffffffff"),
        ]),
        V::U(0),
    ])]);
    let e = decode_batch(&buf).unwrap();
    let e = stored(&e, 0).clone();
    assert_eq!(
        e.block_hashes,
        vec![
            EngineHash(u64::MAX),
            EngineHash(1 << 63),
            EngineHash(0x010203)
        ]
    );
    assert_eq!(e.parent_block_hash, Some(EngineHash(0x02030405060708ff)));
    assert_eq!(e.token_ids, vec![255, 65535, u32::MAX, u32::MAX]);
    // f32 ts.
    let buf = bytes_of(&V::A(vec![raw("ca3fc00000"), V::A(vec![])]));
    assert_eq!(decode_batch(&buf).unwrap().ts, 1.5);
}

#[test]
fn encode_uses_smallest_ints_and_strings() {
    let cases_u: [(u64, &str); 9] = [
        (0, "00"),
        (127, "7f"),
        (128, "cc80"),
        (255, "ccff"),
        (256, "cd0100"),
        (65535, "cdffff"),
        (65536, "ce00010000"),
        (u64::from(u32::MAX), "ceffffffff"),
        (1 << 32, "cf0000000100000000"),
    ];
    for (v, h) in cases_u {
        let mut out = Vec::new();
        write_uint(&mut out, v);
        assert_eq!(out, hex(h), "{v}");
        let mut out = Vec::new();
        if let Ok(i) = i64::try_from(v) {
            write_int(&mut out, i);
            assert_eq!(out, hex(h), "{v}");
        }
    }
    let cases_i: [(i64, &str); 9] = [
        (-1, "ff"),
        (-32, "e0"),
        (-33, "d0df"),
        (-128, "d080"),
        (-129, "d1ff7f"),
        (-32768, "d18000"),
        (-32769, "d2ffff7fff"),
        (i64::from(i32::MIN), "d280000000"),
        (i64::from(i32::MIN) - 1, "d3ffffffff7fffffff"),
    ];
    for (v, h) in cases_i {
        let mut out = Vec::new();
        write_int(&mut out, v);
        assert_eq!(out, hex(h), "{v}");
    }
    for (n, header) in [(31, "bf"), (32, "d920"), (255, "d9ff"), (256, "da0100")] {
        let s = "x".repeat(n);
        let mut out = Vec::new();
        write_str(&mut out, &s);
        assert_eq!(out[..out.len() - n], hex(header)[..], "{n}");
    }
    for (n, header) in [(15, "9f"), (16, "dc0010"), (65536, "dd00010000")] {
        let mut out = Vec::new();
        write_array_len(&mut out, n);
        assert_eq!(out, hex(header));
    }
}

#[test]
fn extra_keys_mapping() {
    let keys = V::A(vec![
        V::S("lora"),
        V::A(vec![V::S("mm"), V::I(-4)]),
        raw("c403abcdef"),
        V::I(-7),
        V::U(7),
        V::Nil,
        V::F(0.5),
        V::A(vec![V::U(1), V::S("a")]),
        V::A(vec![V::S("a"), V::U(1), V::U(2)]),
        V::A(vec![V::S("a"), raw("cfffffffffffffffff")]),
        raw("cfffffffffffffffff"),
        V::M(vec![(V::S("k"), V::A(vec![]))]),
        raw("dc0002a16101"), // [str, int] with a 16-bit array header is still Mm
    ]);
    let buf = batch_of(vec![V::M(vec![
        (V::S("type"), V::S("BlockStored")),
        (V::S("block_hashes"), V::A(vec![V::U(1), V::U(2), V::U(3)])),
        (V::S("token_ids"), V::A(vec![])),
        (V::S("block_size"), V::U(0)),
        (V::S("extra_keys"), V::A(vec![keys, V::Nil, V::A(vec![])])),
    ])]);
    let b = decode_batch(&buf).unwrap();
    let e = stored(&b, 0);
    let expected = vec![
        ExtraKey::Str("lora".into()),
        ExtraKey::Mm {
            identifier: "mm".into(),
            offset: -4,
        },
        ExtraKey::Bytes(vec![0xab, 0xcd, 0xef]),
        ExtraKey::Int(-7),
        ExtraKey::Int(7),
        ExtraKey::Other(hex("c0")),
        ExtraKey::Other(bytes_of(&V::F(0.5))),
        ExtraKey::Other(hex("9201a161")),
        ExtraKey::Other(hex("93a1610102")),
        ExtraKey::Other(hex("92a161cfffffffffffffffff")),
        ExtraKey::Other(hex("cfffffffffffffffff")),
        ExtraKey::Other(hex("81a16b90")),
        ExtraKey::Mm {
            identifier: "a".into(),
            offset: 1,
        },
    ];
    assert_eq!(e.extra_keys, Some(vec![Some(expected), None, Some(vec![])]));
    // Re-encoding keeps everything (the 16-bit header becomes a fixarray).
    let again = decode_batch(&encode(&b)).unwrap();
    assert_eq!(again, b);
    // extra_keys nil is None.
    let buf = batch_of(vec![V::A(vec![
        V::S("BlockStored"),
        V::A(vec![]),
        V::Nil,
        V::A(vec![]),
        V::U(0),
        V::Nil,
        V::Nil,
        V::Nil,
        V::Nil,
    ])]);
    assert_eq!(stored(&decode_batch(&buf).unwrap(), 0).extra_keys, None);
}

#[test]
fn batch_shapes() {
    // Two elements: no rank.
    let b = decode_batch(&bytes_of(&V::A(vec![V::F(1.0), V::A(vec![])]))).unwrap();
    assert_eq!(b.data_parallel_rank, None);
    assert!(b.events.is_empty());
    // Nil rank, and extra elements ignored.
    let buf = bytes_of(&V::A(vec![
        V::F(1.0),
        V::A(vec![]),
        V::Nil,
        V::M(vec![(V::S("x"), V::A(vec![V::U(1)]))]),
        V::S("more"),
    ]));
    assert_eq!(decode_batch(&buf).unwrap().data_parallel_rank, None);
    // 16-bit array header for the batch.
    let mut buf = hex("dc0003");
    buf.extend_from_slice(&bytes_of(&V::F(1.0)));
    buf.extend_from_slice(&hex("dc0000"));
    buf.push(0x02);
    assert_eq!(decode_batch(&buf).unwrap().data_parallel_rank, Some(2));
    // Encoding a None rank writes nil, and 16 events use array16.
    let batch = EventBatch {
        ts: 0.0,
        events: vec![KvEvent::AllBlocksCleared; 16],
        data_parallel_rank: None,
    };
    let out = encode(&batch);
    assert_eq!(out[10..13], hex("dc0010")[..]);
    assert_eq!(out.last(), Some(&0xc0));
    assert_eq!(decode_batch(&out).unwrap(), batch);
}

#[test]
fn every_truncation_of_the_goldens_fails() {
    for g in [
        GOLDEN_STORED,
        GOLDEN_REMOVED,
        GOLDEN_BYTES_HASH,
        GOLDEN_LEGACY,
    ] {
        let full = hex(g);
        assert!(decode_batch(&full).is_ok());
        for len in 0..full.len() {
            let (offset, _) = decode_err(&full[..len]);
            assert!(offset <= len, "offset {offset} past the input ({len})");
        }
    }
}

#[test]
fn trailing_bytes_fail() {
    let mut buf = hex(GOLDEN_REMOVED);
    let n = buf.len();
    buf.push(0x00);
    assert_eq!(decode_err(&buf), (n, "trailing bytes after batch"));
}

#[test]
fn huge_declared_lengths_fail_without_allocating() {
    let huge_array = raw("ddffffffff00000000000000000000");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            hex("ddffffffff00000000000000000000"),
            "array length exceeds input",
        ),
        (
            bytes_of(&V::A(vec![V::F(1.0), raw("dd7fffffff00")])),
            "array length exceeds input",
        ),
        (
            batch_of(vec![raw("dfffffffff0000")]),
            "map length exceeds input",
        ),
        (
            batch_of(vec![V::M(vec![
                (V::S("type"), V::S("BlockStored")),
                (V::S("token_ids"), huge_array),
            ])]),
            "array length exceeds input",
        ),
        (batch_of(vec![V::M(vec![(raw("dbffffffff"), V::Nil)])]), EOF),
        (
            batch_of(vec![V::M(vec![(V::S("x"), raw("c6ffffffff00"))])]),
            EOF,
        ),
        (
            batch_of(vec![V::M(vec![(V::S("x"), raw("c9ffffffff0000"))])]),
            EOF,
        ),
        (
            batch_of(vec![V::M(vec![(V::S("x"), raw("dfffffffff0000"))])]),
            "container length exceeds input",
        ),
        (
            batch_of(vec![V::M(vec![(
                V::S("extra_keys"),
                V::A(vec![raw("ddffffffff")]),
            )])]),
            "array length exceeds input",
        ),
    ];
    for (buf, reason) in cases {
        assert_eq!(decode_err(&buf).1, reason, "{buf:02x?}");
    }
}

fn nested_arrays(depth: usize) -> V {
    let mut v = V::U(1);
    for _ in 0..depth {
        v = V::A(vec![v]);
    }
    v
}

#[test]
fn skipping_limits_nesting_depth() {
    let event = |v: V| {
        batch_of(vec![V::M(vec![
            (V::S("deep"), v),
            (V::S("type"), V::S("AllBlocksCleared")),
        ])])
    };
    assert!(decode_batch(&event(nested_arrays(MAX_SKIP_DEPTH))).is_ok());
    let buf = event(nested_arrays(MAX_SKIP_DEPTH + 1));
    assert_eq!(decode_err(&buf).1, "values nested too deeply");
    // Deeply nested maps in an extra key: kept verbatim up to the limit.
    let mut v = V::Nil;
    for _ in 0..MAX_SKIP_DEPTH {
        v = V::M(vec![(V::S("k"), v)]);
    }
    let raw_v = bytes_of(&v);
    let buf = batch_of(vec![V::A(vec![
        V::S("BlockStored"),
        V::A(vec![]),
        V::Nil,
        V::A(vec![]),
        V::U(0),
        V::Nil,
        V::Nil,
        V::Nil,
        V::A(vec![V::A(vec![v])]),
    ])]);
    let b = decode_batch(&buf).unwrap();
    assert_eq!(
        stored(&b, 0).extra_keys,
        Some(vec![Some(vec![ExtraKey::Other(raw_v)])])
    );
    // A million nested arrays: an error, not a stack overflow.
    let mut buf = batch_of(vec![V::M(vec![(V::S("deep"), V::Nil)])]);
    buf.truncate(buf.len() - 2); // drop nil and the rank
    buf.extend(std::iter::repeat_n(0x91, 1_000_000));
    assert_eq!(decode_err(&buf).1, "values nested too deeply");
}

#[test]
fn wrong_types_fail_with_offsets() {
    let stored_with = |key: &'static str, v: V| {
        batch_of(vec![V::M(vec![
            (V::S("type"), V::S("BlockStored")),
            (V::S(key), v),
        ])])
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            bytes_of(&V::A(vec![V::S("1.0"), V::A(vec![])])),
            "expected float or integer",
        ),
        (
            bytes_of(&V::A(vec![V::F(1.0), V::M(vec![])])),
            "expected array",
        ),
        (bytes_of(&V::U(1)), "expected array"),
        (
            bytes_of(&V::A(vec![V::F(1.0)])),
            "batch array has fewer than 2 elements",
        ),
        (
            bytes_of(&V::A(vec![V::F(1.0), V::A(vec![]), V::S("0")])),
            "expected integer",
        ),
        (
            bytes_of(&V::A(vec![
                V::F(1.0),
                V::A(vec![]),
                raw("cf8000000000000000"),
            ])),
            "integer out of range",
        ),
        (
            batch_of(vec![V::U(3)]),
            "event is neither a map nor an array",
        ),
        (batch_of(vec![V::M(vec![])]), "event map has no type"),
        (
            batch_of(vec![V::M(vec![(V::S("type"), V::U(1))])]),
            "event type is not a string",
        ),
        (
            batch_of(vec![V::A(vec![V::Nil])]),
            "event type is not a string",
        ),
        (
            stored_with("token_ids", V::A(vec![V::S("1")])),
            "expected integer",
        ),
        (
            stored_with("token_ids", V::A(vec![V::I(-1)])),
            "token id out of range",
        ),
        (
            stored_with("token_ids", V::A(vec![V::U(1 << 32)])),
            "token id out of range",
        ),
        (stored_with("block_size", V::I(-1)), "integer out of range"),
        (stored_with("block_size", V::Nil), "expected integer"),
        (
            stored_with("block_hashes", V::A(vec![V::S("h")])),
            "expected block hash (integer or bin)",
        ),
        (stored_with("block_hashes", V::Nil), "expected array"),
        (stored_with("medium", V::U(1)), "expected string"),
        (stored_with("extra_keys", V::U(1)), "expected array"),
        (
            stored_with("extra_keys", V::A(vec![V::U(1)])),
            "expected array",
        ),
        (stored_with("lora_id", V::F(1.0)), "expected integer"),
        (
            stored_with("token_ids", V::A(vec![])),
            "BlockStored has no block_hashes",
        ),
        (
            batch_of(vec![V::M(vec![(V::S("type"), V::S("BlockRemoved"))])]),
            "BlockRemoved has no block_hashes",
        ),
        (
            batch_of(vec![V::M(vec![(V::S("x"), raw("c1"))])]),
            "invalid msgpack marker",
        ),
    ];
    for (buf, reason) in cases {
        assert_eq!(decode_err(&buf).1, reason, "{buf:02x?}");
    }
    // The offset points at the offending value.
    let buf = stored_with("block_size", V::S("x"));
    let at = buf.len() - 3; // "x" is a1 78, then the rank
    assert_eq!(decode_err(&buf), (at, "expected integer"));
}

#[test]
fn invalid_utf8_fails() {
    let bad = raw("a2c328");
    let stored_with = |key: &'static str, v: V| {
        batch_of(vec![V::M(vec![
            (V::S("type"), V::S("BlockStored")),
            (V::S(key), v),
        ])])
    };
    for key in ["medium", "lora_name", "kv_cache_spec_kind", "session_id"] {
        let buf = stored_with(key, raw("a2c328"));
        let at = buf.len() - 4;
        assert_eq!(decode_err(&buf), (at, "invalid utf-8 in string"), "{key}");
    }
    let buf = stored_with("extra_keys", V::A(vec![V::A(vec![raw("a2c328")])]));
    assert_eq!(decode_err(&buf).1, "invalid utf-8 in string");
    let buf = stored_with(
        "extra_keys",
        V::A(vec![V::A(vec![V::A(vec![bad, V::U(1)])])]),
    );
    assert_eq!(decode_err(&buf).1, "invalid utf-8 in string");
    // Unknown keys and unknown type names are compared as bytes, never decoded as text.
    let buf = batch_of(vec![V::M(vec![
        (raw("a2c328"), V::Nil),
        (V::S("type"), raw("a2c328")),
    ])]);
    assert!(decode_batch(&buf).unwrap().events.is_empty());
}

#[test]
fn fuzz_seeds_decode() {
    let seeds: [&[u8]; 6] = [
        include_bytes!("../../fuzz/seeds/golden_stored.bin"),
        include_bytes!("../../fuzz/seeds/golden_removed_cleared.bin"),
        include_bytes!("../../fuzz/seeds/golden_bytes_hash.bin"),
        include_bytes!("../../fuzz/seeds/golden_legacy.bin"),
        include_bytes!("../../fuzz/seeds/rich.bin"),
        include_bytes!("../../fuzz/seeds/two_elements_int_ts.bin"),
    ];
    assert_eq!(seeds[0], &hex(GOLDEN_STORED)[..]);
    assert_eq!(seeds[1], &hex(GOLDEN_REMOVED)[..]);
    assert_eq!(seeds[2], &hex(GOLDEN_BYTES_HASH)[..]);
    assert_eq!(seeds[3], &hex(GOLDEN_LEGACY)[..]);
    for seed in seeds {
        check_reencode(seed).unwrap();
    }
    // The rich seed: every field, every extra-key kind, legacy events, an unknown event.
    let b = decode_batch(seeds[4]).unwrap();
    assert_eq!(b.ts, 1.7e9);
    assert_eq!(b.data_parallel_rank, Some(3));
    assert_eq!(b.events.len(), 5);
    let e = stored(&b, 0);
    assert_eq!(
        e.block_hashes,
        vec![
            EngineHash(u64::MAX),
            EngineHash(300),
            EngineHash(70000),
            EngineHash(0x010203)
        ]
    );
    assert_eq!(e.parent_block_hash, Some(EngineHash(5_000_000_000)));
    assert_eq!(e.token_ids.len(), 16);
    assert_eq!(e.token_ids[7], u32::MAX);
    assert_eq!(e.lora_id, Some(-5));
    assert_eq!(e.medium, Some(Medium::Storage));
    assert_eq!(e.lora_name.as_deref(), Some(&*"x".repeat(40)));
    let keys = e.extra_keys.as_ref().unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[0].as_ref().unwrap().len(), 7);
    assert_eq!(
        keys[0].as_ref().unwrap()[6],
        ExtraKey::Other(hex("9201a161"))
    );
    assert_eq!(e.kv_cache_spec_sliding_window, Some(4096));
    assert_eq!(e.session_id.as_deref(), Some("sess"));
    let b = decode_batch(seeds[5]).unwrap();
    assert_eq!((b.ts, b.data_parallel_rank), (1700000000.0, None));
    assert_eq!(b.events, vec![KvEvent::AllBlocksCleared]);
}

// --- property tests -----------------------------------------------------------------------

fn hash_s() -> impl Strategy<Value = EngineHash> {
    prop_oneof![any::<u64>(), 0u64..300, 0u64..70_000, 0u64..5_000_000_000].prop_map(EngineHash)
}

fn int_s() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        -300i64..300,
        -70_000i64..70_000,
        -5_000_000_000i64..5_000_000_000
    ]
}

fn string_s() -> impl Strategy<Value = String> {
    prop_oneof![9 => ".{0,40}", 1 => ".{30,300}"]
}

fn medium_s() -> impl Strategy<Value = Medium> {
    prop_oneof![
        Just(Medium::Gpu),
        Just(Medium::Cpu),
        Just(Medium::Storage),
        "[a-z]{0,8}X".prop_map(Medium::Other),
    ]
}

/// msgpack values that decode as `ExtraKey::Other`.
fn other_raw_s() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(hex("c0")),
        Just(hex("c2")),
        Just(hex("c3")),
        any::<f64>().prop_map(|f| bytes_of(&V::F(f))),
        Just(hex("80")),
        Just(hex("8101a161")),
        Just(hex("93010203")),
        Just(hex("9201a161")),
        Just(hex("92a1619101")),
        Just(hex("cfffffffffffffffff")),
        Just(hex("d40100")),
        Just(hex("c70301616263")),
    ]
}

fn extra_key_s() -> impl Strategy<Value = ExtraKey> {
    prop_oneof![
        string_s().prop_map(ExtraKey::Str),
        (string_s(), int_s()).prop_map(|(identifier, offset)| ExtraKey::Mm { identifier, offset }),
        vec(any::<u8>(), 0..300).prop_map(ExtraKey::Bytes),
        int_s().prop_map(ExtraKey::Int),
        other_raw_s().prop_map(ExtraKey::Other),
    ]
}

fn stored_s() -> impl Strategy<Value = BlockStored> {
    let head = (
        vec(hash_s(), 0..20),
        proptest::option::of(hash_s()),
        vec(prop_oneof![any::<u32>(), 0u32..128, 0u32..70_000], 0..70),
        any::<u32>(),
        proptest::option::of(int_s()),
        proptest::option::of(medium_s()),
        proptest::option::of(string_s()),
    );
    let tail = (
        proptest::option::of(vec(proptest::option::of(vec(extra_key_s(), 0..4)), 0..4)),
        proptest::option::of(int_s()),
        proptest::option::of(string_s()),
        proptest::option::of(int_s()),
        proptest::option::of(string_s()),
        proptest::option::of(string_s()),
        proptest::option::of(string_s()),
    );
    (head, tail).prop_map(
        |(
            (block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name),
            (
                extra_keys,
                group_idx,
                kv_cache_spec_kind,
                kv_cache_spec_sliding_window,
                locality,
                ownership,
                session_id,
            ),
        )| BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_id,
            medium,
            lora_name,
            extra_keys,
            group_idx,
            kv_cache_spec_kind,
            kv_cache_spec_sliding_window,
            locality,
            ownership,
            session_id,
        },
    )
}

fn removed_s() -> impl Strategy<Value = BlockRemoved> {
    (
        vec(hash_s(), 0..4),
        proptest::option::of(medium_s()),
        proptest::option::of(int_s()),
        proptest::option::of(string_s()),
        proptest::option::of(string_s()),
    )
        .prop_map(
            |(block_hashes, medium, group_idx, locality, ownership)| BlockRemoved {
                block_hashes,
                medium,
                group_idx,
                locality,
                ownership,
            },
        )
}

fn batch_s() -> impl Strategy<Value = EventBatch> {
    let event = prop_oneof![
        stored_s().prop_map(KvEvent::BlockStored),
        removed_s().prop_map(KvEvent::BlockRemoved),
        Just(KvEvent::AllBlocksCleared),
    ];
    (
        any::<f64>(),
        vec(event, 0..5),
        proptest::option::of(int_s()),
    )
        .prop_map(|(ts, events, data_parallel_rank)| EventBatch {
            ts,
            events,
            data_parallel_rank,
        })
}

/// Equality with `ts` compared by bits (NaN-safe).
fn same(a: &EventBatch, b: &EventBatch) -> bool {
    a.ts.to_bits() == b.ts.to_bits()
        && a.events == b.events
        && a.data_parallel_rank == b.data_parallel_rank
}

/// The fuzz target's property: whatever decodes re-encodes to something that decodes the
/// same, in both forms, and encoding is stable.
fn check_reencode(buf: &[u8]) -> std::result::Result<(), TestCaseError> {
    if let Ok(a) = decode_batch(buf) {
        let enc = encode(&a);
        let b = decode_batch(&enc).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(same(&a, &b));
        prop_assert_eq!(encode(&b), enc);
        let c = decode_batch(&encode_legacy(&a)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(same(&a, &c));
    }
    Ok(())
}

proptest! {
    #[test]
    fn prop_roundtrip_map_form(batch in batch_s()) {
        let enc = encode(&batch);
        let back = decode_batch(&enc).unwrap();
        prop_assert!(same(&back, &batch), "{:?} != {:?}", back, batch);
        prop_assert_eq!(encode(&back), enc);
    }

    #[test]
    fn prop_roundtrip_legacy_form(batch in batch_s()) {
        let back = decode_batch(&encode_legacy(&batch)).unwrap();
        prop_assert!(same(&back, &batch), "{:?} != {:?}", back, batch);
    }

    #[test]
    fn prop_truncated_encodings_fail(batch in batch_s(), cut in any::<prop::sample::Index>()) {
        let enc = encode(&batch);
        let len = cut.index(enc.len());
        prop_assert!(decode_batch(&enc[..len]).is_err());
    }

    #[test]
    fn prop_reusing_decoder_decodes_like_a_fresh_one(
        stream in vec((batch_s(), any::<bool>(), any::<prop::sample::Index>(), any::<bool>()), 1..8),
    ) {
        // Batches in both forms, some cut short (an error mid-stream), through one decoder: each
        // decodes exactly as `decode_batch` decodes it, whatever came before.
        let mut dec = BatchDecoder::new();
        for (batch, legacy, cut, truncate) in stream {
            let mut enc = if legacy { encode_legacy(&batch) } else { encode(&batch) };
            if truncate {
                enc.truncate(cut.index(enc.len()));
            }
            match (decode_batch(&enc), dec.decode(&enc)) {
                (Ok(a), Ok(b)) => prop_assert!(same(&a, b), "{:?} != {:?}", a, b),
                (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                (a, b) => prop_assert!(false, "fresh {:?}, reused {:?}", a, b),
            }
        }
    }

    #[test]
    fn prop_random_bytes_never_panic(buf in vec(any::<u8>(), 0..600)) {
        check_reencode(&buf)?;
    }

    #[test]
    fn prop_mutated_goldens_never_panic(
        which in 0usize..4,
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut buf = hex([GOLDEN_STORED, GOLDEN_REMOVED, GOLDEN_BYTES_HASH, GOLDEN_LEGACY][which]);
        for (at, byte) in edits {
            let i = at.index(buf.len());
            buf[i] = byte;
        }
        check_reencode(&buf)?;
    }
}
