//! A fast path for the one large thing the daemon reads: score requests, whose token ids are most
//! of their bytes. It accepts plain, well-formed bodies only and declines everything else, which
//! then goes through serde_json (and gets its error messages); both paths give the same request.

use super::api::ScoreRequest;

const ONES: u64 = 0x0101_0101_0101_0101;

/// Up to 8 leading ASCII digits of `chunk` (little-endian, first byte lowest): how many there are.
#[inline]
fn digit_count(chunk: u64) -> usize {
    let t = chunk.wrapping_sub(ONES * b'0' as u64);
    // A byte is not a digit when t >= 10 (then t + 118 has its top bit) or t wrapped (top bit).
    let non_digit = (t.wrapping_add(ONES * 118) | t) & (ONES * 0x80);
    (non_digit.trailing_zeros() / 8) as usize
}

/// The value of the first `n` (1..=8) digits of `chunk`.
#[inline]
fn eight_digits(chunk: u64, n: usize) -> u64 {
    // Digits to the top bytes, zeros (leading zero digits) below; bytes past the number go out.
    let v = chunk.wrapping_sub(ONES * b'0' as u64) << (8 * (8 - n));
    let v = v.wrapping_mul(10).wrapping_add(v >> 8);
    let mask = 0x0000_00FF_0000_00FF;
    let mul1 = 100 + (1_000_000 << 32);
    let mul2 = 1 + (10_000 << 32);
    ((v & mask)
        .wrapping_mul(mul1)
        .wrapping_add(((v >> 16) & mask).wrapping_mul(mul2)))
        >> 32
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// A JSON array of integers in `0..=u32::MAX` at the start of `b`: the ids and the bytes read
/// (through the closing bracket). `None` for anything else.
pub(crate) fn parse_u32_array_prefix(b: &[u8]) -> Option<(Vec<u32>, usize)> {
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i = skip_ws(b, i + 1);
    // About one id per 5 bytes of text.
    let mut out = Vec::with_capacity(b.len() / 5 + 1);
    if b.get(i) == Some(&b']') {
        return Some((out, i + 1));
    }
    loop {
        let word = match b.get(i..i + 8) {
            Some(w) => u64::from_le_bytes(w.try_into().expect("8 bytes")),
            None => {
                // The last few bytes, padded with a non-digit.
                let mut chunk = [b' '; 8];
                chunk[..b.len() - i].copy_from_slice(&b[i..]);
                u64::from_le_bytes(chunk)
            }
        };
        let n = digit_count(word);
        let (value, len) = if n == 0 {
            return None;
        } else if n < 8 {
            (eight_digits(word, n), n)
        } else {
            // Eight digits or more: rare for token ids; one at a time, at most ten.
            let mut v: u64 = 0;
            let mut k = 0;
            while i + k < b.len() && b[i + k].is_ascii_digit() {
                v = v * 10 + u64::from(b[i + k] - b'0');
                k += 1;
                if k > 10 {
                    return None;
                }
            }
            (v, k)
        };
        // A leading zero is not JSON (and "0" alone is fine).
        if b[i] == b'0' && len > 1 {
            return None;
        }
        let value = u32::try_from(value).ok()?;
        out.push(value);
        i = skip_ws(b, i + len);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b']') => return Some((out, i + 1)),
            _ => return None,
        }
    }
}

/// The whole of `text` as a JSON array of u32s.
pub(crate) fn parse_u32_array(text: &str) -> Option<Vec<u32>> {
    let (v, used) = parse_u32_array_prefix(text.as_bytes())?;
    (skip_ws(text.as_bytes(), used) == text.len()).then_some(v)
}

/// The end of the JSON value starting at `i` (a string, number, literal, array or object), without
/// validating it (the value is parsed by serde_json afterwards).
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    loop {
        match *b.get(i)? {
            b'"' => {
                i += 1;
                loop {
                    match *b.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'[' | b'{' => {
                depth += 1;
                i += 1;
            }
            b']' | b'}' if depth > 0 => {
                depth -= 1;
                i += 1;
            }
            b',' | b']' | b'}' if depth == 0 => return Some(i),
            _ => i += 1,
        }
        if depth == 0 && matches!(b.get(i), Some(b',' | b'}' | b']') | None) {
            return Some(i);
        }
    }
}

/// A score request body read by the fast path: `None` when it declines (anything unusual),
/// `Some(Err)` for a body that is surely invalid, with serde_json's words for the bad field.
pub(crate) fn score_body(bytes: &[u8]) -> Option<Result<ScoreRequest, String>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut req = ScoreRequest::default();
    let mut seen = [false; 6];
    let mut model = false;
    if b.get(i) == Some(&b'}') {
        return None;
    }
    loop {
        // A key without escapes.
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let end = i + 1 + text[i + 1..].find('"')?;
        let key = &text[i + 1..end];
        if key.contains('\\') {
            return None;
        }
        i = skip_ws(b, end + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let field = [
            "model",
            "token_ids",
            "block_hashes",
            "lora_name",
            "cache_salt",
            "engines",
        ]
        .iter()
        .position(|k| *k == key)?;
        if std::mem::replace(&mut seen[field], true) {
            return None;
        }
        if field == 1 && b.get(i) == Some(&b'[') {
            let (ids, used) = parse_u32_array_prefix(&b[i..])?;
            req.token_ids = Some(ids);
            i += used;
        } else {
            let end = skip_value(b, i)?;
            let raw = text[i..end].trim_end();
            let bad = |e: serde_json::Error| format!("invalid request body: {key}: {e}");
            let r = match field {
                0 => serde_json::from_str(raw).map(|m| {
                    req.model = m;
                    model = true;
                }),
                1 => serde_json::from_str(raw).map(|v| req.token_ids = v),
                2 => serde_json::from_str(raw).map(|v| req.block_hashes = v),
                3 => serde_json::from_str(raw).map(|v| req.lora_name = v),
                4 => serde_json::from_str(raw).map(|v| req.cache_salt = v),
                _ => serde_json::from_str(raw).map(|v| req.engines = v),
            };
            if let Err(e) = r {
                return Some(Err(bad(e)));
            }
            i = end;
        }
        i = skip_ws(b, i);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => {
                if skip_ws(b, i + 1) != b.len() || !model {
                    return None;
                }
                return Some(Ok(req));
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_arrays_parse_like_serde_json() {
        let mut cases: Vec<String> = [
            "[]",
            " [ ] ",
            "[0]",
            "[1,2,3]",
            " [ 1 , 2 ,\n3 ] ",
            "[4294967295]",
            "[12345678]",
            "[123456789]",
            "[1234567890]",
            "[10,200,3000,40000,500000,6000000,70000000]",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every length of every digit count, at the end of the text and not.
        for d in 1..=10u32 {
            let x = 10u64.pow(d - 1) + 7;
            if x <= u64::from(u32::MAX) {
                cases.push(format!("[{x}]"));
                cases.push(format!("[{x}, {x},{x}]"));
            }
        }
        for ok in &cases {
            let want: Vec<u32> = serde_json::from_str(ok).unwrap();
            assert_eq!(parse_u32_array(ok), Some(want), "{ok}");
        }
        // Everything serde_json refuses (or reads differently) is left to it.
        for bad in [
            "",
            "[",
            "]",
            "[,]",
            "[1,]",
            "[1 2]",
            "[-1]",
            "[1.0]",
            "[1e3]",
            "[01]",
            "[00]",
            "[4294967296]",
            "[99999999999]",
            "[99999999999999999999]",
            "[\"1\"]",
            "[1]]",
            "[1] x",
            "{}",
            "null",
            "[12345678.5]",
            "[123456789e2]",
        ] {
            assert_eq!(parse_u32_array(bad), None, "{bad}");
        }
    }

    #[test]
    fn random_token_arrays_round_trip() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let n = (x % 50) as usize;
            let ids: Vec<u32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Every magnitude.
                    (x >> (x % 32)) as u32
                })
                .collect();
            let text = serde_json::to_string(&ids).unwrap();
            assert_eq!(parse_u32_array(&text), Some(ids), "{text}");
        }
    }

    #[test]
    fn score_bodies_agree_with_serde() {
        let full = r#"{"model":"m","token_ids":[1,2,3],"lora_name":"l","cache_salt":"s","engines":["a","b"]}"#;
        let r = score_body(full.as_bytes()).unwrap().unwrap();
        let want: ScoreRequest = serde_json::from_str(full).unwrap();
        assert_eq!(r, want);
        let spaced = " { \"token_ids\" : [ 7 , 8 ] , \"model\" : \"m\" } ";
        assert_eq!(
            score_body(spaced.as_bytes()).unwrap().unwrap(),
            serde_json::from_str::<ScoreRequest>(spaced).unwrap()
        );
        let hashes = r#"{"model":"m","block_hashes":[18446744073709551615],"token_ids":null}"#;
        assert_eq!(
            score_body(hashes.as_bytes()).unwrap().unwrap(),
            serde_json::from_str::<ScoreRequest>(hashes).unwrap()
        );
        // Declined: left to serde_json, which refuses them with its own message.
        for declined in [
            "{not json",
            r#"{"model":"m"} x"#,
            r#"{"token_ids":[1]}"#,
            r#"{"model":"m","surprise":1}"#,
            r#"{"model":"m","model":"n"}"#,
            r#"{"model":"m","token_ids":[-1]}"#,
            r#"{"mo\u0064el":"m"}"#,
            "{}",
        ] {
            assert!(score_body(declined.as_bytes()).is_none(), "{declined}");
        }
        // Surely invalid: a field of the wrong type.
        let err = score_body(br#"{"model":5,"token_ids":[1]}"#)
            .unwrap()
            .unwrap_err();
        assert!(err.contains("model"), "{err}");
    }
}
