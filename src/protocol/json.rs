//! A JSON checker for the payloads that cross the hot path, fast over long strings.
//!
//! Every publish and every delivery carries a payload of up to 64 KiB that is kept as JSON text
//! and only has to be checked and found, never parsed. serde_json does that a word at a time;
//! here a string's plain run is checked 64 bytes at a time, which the compiler turns into
//! vector compares (about 3.5× faster on a 16 KiB string). It accepts exactly the text
//! serde_json accepts when it skips a value (`IgnoredAny`, `RawValue`: escapes are checked but
//! not decoded, nesting has no limit), and it only ever speeds a check up: its callers ask
//! serde_json whenever it says no, so serde_json stays the one that words every refusal.

use std::ops::Range;

/// Whether `text` is one JSON value, with nothing but whitespace around it.
pub(crate) fn is_value(text: &str) -> bool {
    let b = text.as_bytes();
    value_end(b, skip_ws(b, 0)).is_some_and(|end| skip_ws(b, end) == b.len())
}

/// The value of member `name` of the JSON object `text`, with the whole text checked: `None`
/// when `text` is not an object, holds no such member (or holds it twice), names a member with
/// an escape in its key, or is not valid JSON. The range leaves out the whitespace around the
/// value, as serde_json's `RawValue` does.
pub(crate) fn member(text: &str, name: &str) -> Option<Range<usize>> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut found = None;
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, i + 1)?;
        let key = &b[i + 1..key_end - 1];
        if key.contains(&b'\\') {
            // serde_json would compare the key unescaped; leave such a frame to it.
            return None;
        }
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start)?;
        if key == name.as_bytes() {
            if found.is_some() {
                return None;
            }
            found = Some(start..end);
        }
        i = skip_ws(b, end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => break,
            _ => return None,
        }
    }
    (skip_ws(b, i + 1) == b.len()).then_some(found).flatten()
}

/// Where the JSON value starting at `i` ends; `None` when no valid value starts there.
fn value_end(b: &[u8], mut i: usize) -> Option<usize> {
    // The closing brackets awaited, innermost last: nesting costs a byte of heap, not stack.
    let mut open: Vec<u8> = Vec::new();
    loop {
        // A value starts at `i`.
        i = match *b.get(i)? {
            b'"' => string_end(b, i + 1)?,
            b'n' => literal_end(b, i, b"null")?,
            b't' => literal_end(b, i, b"true")?,
            b'f' => literal_end(b, i, b"false")?,
            b'-' | b'0'..=b'9' => number_end(b, i)?,
            bracket @ (b'[' | b'{') => {
                let close = if bracket == b'[' { b']' } else { b'}' };
                let j = skip_ws(b, i + 1);
                if b.get(j) == Some(&close) {
                    j + 1
                } else {
                    open.push(close);
                    i = next_element(b, close, j)?;
                    continue;
                }
            }
            _ => return None,
        };
        // A value ended at `i`: close what it ends, or move on to the next element.
        loop {
            let Some(&close) = open.last() else {
                return Some(i);
            };
            i = skip_ws(b, i);
            match *b.get(i)? {
                b',' => {
                    i = next_element(b, close, skip_ws(b, i + 1))?;
                    break;
                }
                c if c == close => {
                    open.pop();
                    i += 1;
                }
                _ => return None,
            }
        }
    }
}

/// Past a container's opening bracket or a comma (and whitespace): where the next value starts,
/// after its key and colon in an object (whose closing bracket is `close`).
fn next_element(b: &[u8], close: u8, i: usize) -> Option<usize> {
    if close == b'}' {
        member_value(b, i)
    } else {
        Some(i)
    }
}

/// Past an object's `{` or `,` (and whitespace): the key and its colon; where the value starts.
fn member_value(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let i = skip_ws(b, string_end(b, i + 1)?);
    (b.get(i) == Some(&b':')).then(|| skip_ws(b, i + 1))
}

/// Just past the closing quote of the string whose contents start at `i`.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i += plain_run(&b[i..]);
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    let hex = b.get(i + 2..i + 6)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    i += 6;
                }
                _ => return None,
            },
            // A control character, which a JSON string cannot hold raw.
            _ => return None,
        }
    }
}

/// How many bytes at the start of `b` a string holds as they are: up to the first quote,
/// backslash or control character.
pub(super) fn plain_run(b: &[u8]) -> usize {
    const LANES: usize = 64;
    let (chunks, _) = b.as_chunks::<LANES>();
    let mut n = 0;
    for chunk in chunks {
        // No early exit within a chunk, so that the compiler checks it in a few vector steps.
        let mut special = false;
        for &x in chunk {
            special |= is_special(x);
        }
        if special {
            break;
        }
        n += LANES;
    }
    n + b[n..]
        .iter()
        .position(|&x| is_special(x))
        .unwrap_or(b.len() - n)
}

fn is_special(x: u8) -> bool {
    (x == b'"') | (x == b'\\') | (x < 0x20)
}

fn literal_end(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    b[i..].starts_with(word).then_some(i + word.len())
}

/// `-`? then `0` or digits not starting with `0`, then an optional fraction and exponent, each
/// with at least one digit. (A digit after a leading `0` is left for the caller to refuse.)
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    i = match b.get(i)? {
        b'0' => i + 1,
        b'1'..=b'9' => digits_end(b, i + 1),
        _ => return None,
    };
    if b.get(i) == Some(&b'.') {
        let j = digits_end(b, i + 1);
        if j == i + 1 {
            return None;
        }
        i = j;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let j = digits_end(b, i);
        if j == i {
            return None;
        }
        i = j;
    }
    Some(i)
}

fn digits_end(b: &[u8], i: usize) -> usize {
    i + b[i..].iter().take_while(|x| x.is_ascii_digit()).count()
}

fn skip_ws(b: &[u8], i: usize) -> usize {
    i + b[i..]
        .iter()
        .take_while(|x| matches!(x, b' ' | b'\t' | b'\n' | b'\r'))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    fn serde_accepts(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    /// What serde_json finds as member `name`'s value, when it reads `text` as an object.
    fn serde_member(text: &str, name: &str) -> Option<String> {
        let map: std::collections::HashMap<String, &RawValue> = serde_json::from_str(text).ok()?;
        map.get(name).map(|v| v.get().to_owned())
    }

    #[test]
    fn the_checker_accepts_and_refuses_what_serde_json_does() {
        let cases = [
            "null",
            " true ",
            "false",
            "nul",
            "nullx",
            "0",
            "-0",
            "01",
            "-",
            "1.",
            "1.5e",
            "1.5e+3",
            "2E-7",
            ".5",
            "\"\"",
            "\"a\\\"b\"",
            "\"\\u00e9\\uD800\"",
            "\"\\u00g0\"",
            "\"\\x\"",
            "\"tab\there\"",
            "\"unterminated",
            "[]",
            "[ ]",
            "[1,]",
            "[,1]",
            "[1 2]",
            "{}",
            "{ }",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{1:2}",
            "{\"a\":[{\"b\":[]}],\"c\":{}}",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
            "[",
            "]",
            "1 2",
            "",
            "  ",
        ];
        for text in cases {
            assert_eq!(is_value(text), serde_accepts(text), "{text:?}");
        }
    }

    #[test]
    fn a_long_string_is_checked_past_its_plain_run() {
        let plain = "x".repeat(1000);
        for (bad, at) in [("\u{1}", 0), ("\u{1f}", 500), ("\n", 999)] {
            let mut s = plain.clone();
            s.replace_range(at..at + 1, bad);
            let text = format!("\"{s}\"");
            assert!(!is_value(&text), "control character at {at}");
            assert!(!serde_accepts(&text));
        }
        assert!(is_value(&format!("\"{plain}\"")));
        assert!(is_value(&format!("\"{plain}\\\"{plain}é\"")));
        assert!(!is_value(&format!("\"{plain}")));
    }

    #[test]
    fn a_member_is_found_where_serde_json_finds_it() {
        for (text, found) in [
            (
                r#"{"type":"publish","payload":{"a":[1,"}"]},"ref":1}"#,
                Some(r#"{"a":[1,"}"]}"#),
            ),
            (r#" { "payload" :  "x"  } "#, Some(r#""x""#)),
            (r#"{"payload":null}"#, Some("null")),
            (r#"{"ref":{"payload":1}}"#, None),
            (r#"{"payload":1,"payload":2}"#, None),
            (r#"{"pay\u006coad":1}"#, None),
            (r#"{"payload":1}x"#, None),
            (r#"{"payload":01}"#, None),
            (r#"[{"payload":1}]"#, None),
            (r#"{}"#, None),
        ] {
            let got = member(text, "payload").map(|r| &text[r]);
            assert_eq!(got, found, "{text}");
            if let Some(found) = found {
                assert_eq!(serde_member(text, "payload").as_deref(), Some(found));
            }
        }
    }

    /// Text close to JSON: its tokens, and a few bytes that are not.
    fn json_ish() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just("[".to_owned()),
            Just("]".to_owned()),
            Just(",".to_owned()),
            Just(":".to_owned()),
            Just(" ".to_owned()),
            Just("\n".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("fals".to_owned()),
            Just("\"payload\"".to_owned()),
            Just("\\".to_owned()),
            Just("\"".to_owned()),
            Just("\\u".to_owned()),
            Just("\u{1}".to_owned()),
            "[-+.eE0-9]{1,4}",
            "[a-fA-F0-9xé]{1,70}",
        ];
        prop::collection::vec(token, 0..24).prop_map(|t| t.concat())
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,150}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn near_json_is_judged_as_serde_json_judges_it(text in json_ish()) {
            prop_assert_eq!(is_value(&text), serde_accepts(&text));
            let frame = format!("{{\"type\":\"msg\",\"payload\":{text}}}");
            if let Some(r) = member(&frame, "payload") {
                prop_assert_eq!(serde_member(&frame, "payload"), Some(frame[r].to_owned()));
            }
        }

        #[test]
        fn every_json_value_is_accepted_and_found_whole(v in json_value(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            };
            prop_assert!(is_value(&text), "{}", text);
            let frame = format!("{{\"ref\":[{text}], \"payload\" : {text} ,\"x\":{text}}}");
            let r = member(&frame, "payload");
            prop_assert_eq!(r.map(|r| &frame[r]), Some(text.as_str()));
        }
    }
}
