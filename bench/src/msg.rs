//! The benchmark's message body and clock: the same bytes go through every system.
//!
//! A body is a JSON string (so outboxd carries it as JSON text, byte for byte, with no base64)
//! holding the intended send time and the publisher's sequence number in fixed-width hex,
//! padded with `x` to the requested size. MQTT and NATS carry the very same bytes.

use std::sync::OnceLock;
use std::time::Instant;

/// `"` + 16 hex digits (intended send time) + 16 hex digits (seq) + `"`.
pub const MIN_SIZE: usize = 34;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the bench process's clock base (monotonic; one process, so publisher and
/// subscribers share it).
pub fn now_ns() -> u64 {
    let base = BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A body of exactly `size` bytes (at least [`MIN_SIZE`]), as text: outboxd's client takes it
/// as it is; the other systems take its bytes.
pub fn make(size: usize, intended_ns: u64, seq: u64) -> String {
    const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    let size = size.max(MIN_SIZE);
    let mut body = String::with_capacity(size);
    body.push('"');
    // The load generator builds one per message: hex written directly, not through format!.
    for n in [intended_ns, seq] {
        body.extend(
            (0..16)
                .rev()
                .map(|shift| char::from(b"0123456789abcdef"[((n >> (shift * 4)) & 0xf) as usize])),
        );
    }
    while body.len() < size - 1 {
        let n = (size - 1 - body.len()).min(PAD.len());
        body.push_str(&PAD[..n]);
    }
    body.push('"');
    body
}

/// The (intended send time, seq) in a body made by [`make`]; `None` for anything else.
pub fn parse(body: &[u8]) -> Option<(u64, u64)> {
    if body.len() < MIN_SIZE || body[0] != b'"' {
        return None;
    }
    let hex = std::str::from_utf8(&body[1..33]).ok()?;
    let intended = u64::from_str_radix(&hex[..16], 16).ok()?;
    let seq = u64::from_str_radix(&hex[16..], 16).ok()?;
    Some((intended, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_has_the_exact_size_and_round_trips_its_header() {
        for size in [MIN_SIZE, 64, 256, 16 * 1024] {
            let b = make(size, 123_456_789, 42);
            assert_eq!(b.len(), size);
            assert_eq!(parse(b.as_bytes()), Some((123_456_789, 42)));
            assert!(
                serde_json::from_str::<String>(&b).is_ok(),
                "valid JSON text"
            );
        }
    }

    #[test]
    fn foreign_bodies_are_not_parsed() {
        assert_eq!(parse(b"{}"), None);
        assert_eq!(parse(&[b'x'; 40]), None);
    }
}
