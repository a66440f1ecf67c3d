//! Time as every store keeps it: microseconds since the Unix epoch in an `i64`, converted to
//! and from `google.protobuf.Timestamp` at the API edge.

/// Now, in µs since the Unix epoch.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The protobuf timestamp of `micros` µs since the epoch (sub-µs precision is zero).
pub fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// µs since the epoch of a protobuf timestamp (nanoseconds truncated); `None` when the
/// nanos are out of `0..1e9` or the value overflows.
pub fn micros(ts: &prost_types::Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    ts.seconds
        .checked_mul(1_000_000)?
        .checked_add(i64::from(ts.nanos / 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for m in [
            0,
            1,
            999_999,
            1_000_000,
            -1,
            -1_000_001,
            1_700_000_000_123_456,
        ] {
            assert_eq!(micros(&timestamp(m)), Some(m));
        }
    }

    #[test]
    fn invalid_nanos_are_refused() {
        let ts = prost_types::Timestamp {
            seconds: 1,
            nanos: -1,
        };
        assert_eq!(micros(&ts), None);
        let ts = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(micros(&ts), None);
    }
}
