//! Human durations for flags and config: `90s`, `15m`, `24h`, `7d`, `500ms`, or a bare number of seconds.

use std::time::Duration;

/// Parses `90s`, `15m`, `24h`, `7d`, `500ms`, combinations such as `1h30m`, or bare seconds (`3600`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration: use a form such as 90s, 15m, 24h or 7d".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "{text:?} is not a duration: use a form such as 90s, 15m, 24h or 7d"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
                ));
            }
        };
        let ms = value
            .checked_mul(millis_per_unit)
            .ok_or_else(|| format!("{text:?}: too large"))?;
        total = total
            .checked_add(Duration::from_millis(ms))
            .ok_or_else(|| format!("{text:?}: too large"))?;
    }
    Ok(total)
}

/// Like [`parse_duration`], for settings the wire carries in seconds: refuses what is not whole
/// seconds rather than rounding `999ms` down to 0 (which would mean something else entirely).
pub fn parse_whole_seconds(text: &str) -> Result<Duration, String> {
    // `ms` parses, but only whole seconds of it would pass: do not suggest it.
    let d =
        parse_duration(text).map_err(|e| e.replace("use ms, s, m, h or d", "use s, m, h or d"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{text:?} is not whole seconds (e.g. 1s, 90s, 15m)"));
    }
    Ok(d)
}

/// Writes a duration back in the shortest of the forms [`parse_duration`] reads.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_refuse_fractions() {
        assert_eq!(parse_whole_seconds("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_whole_seconds("2000ms").unwrap(),
            Duration::from_secs(2)
        );
        assert!(
            parse_whole_seconds("999ms")
                .unwrap_err()
                .contains("whole seconds")
        );
        assert!(parse_whole_seconds("1s500ms").is_err());
        assert!(
            parse_whole_seconds("1x")
                .unwrap_err()
                .ends_with("(use s, m, h or d)")
        );
    }

    #[test]
    fn reads_the_usual_forms() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3600").unwrap(), Duration::from_secs(3600));
    }

    #[test]
    fn refuses_nonsense_with_a_hint() {
        for bad in ["", "h", "5x", "1.5h", "-3s", "s5"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("90s") || err.contains("unit"), "{bad}: {err}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for d in [
            Duration::from_secs(86_400),
            Duration::from_secs(90),
            Duration::from_millis(1500),
        ] {
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
    }
}
