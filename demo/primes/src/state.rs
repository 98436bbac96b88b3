//! The miner's state — every prime found so far — and its export formats, with the
//! `code_change` of each code version.
//!
//! * Format 1 (exported by v1): JSON, `{"format":1,"next":N,"primes":[2,3,5,…]}`.
//! * Format 2 (exported by v2 and v3): a header line
//!   `primes-state 2 count=<n> next=<N> twins=<t>\n`, then the primes as LEB128-encoded gaps
//!   (the first prime as itself). About 1–2 bytes a prime instead of 7–8.
//!
//! | code | reads | its code_change |
//! |---|---|---|
//! | v1 | 1, 2 | format 2 → 1 on a downgrade (drops `twins`) |
//! | v2 | 1, 2 | format 1 → 2: gaps, and counts twin primes (its new field) |
//! | v3 | —    | fails: it wants a format 3 nobody wrote |

use serde::{Deserialize, Serialize};

/// Code versions this binary carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Code {
    V1,
    V2,
    V3,
}

impl Code {
    /// `"1.0.0"` → V1, `"2.3"` → V2, `"3"` → V3 (the major version picks the code).
    pub fn from_version(version: &str) -> Result<Self, String> {
        let major = version.trim().split('.').next().unwrap_or_default();
        match major {
            "1" => Ok(Code::V1),
            "2" => Ok(Code::V2),
            "3" => Ok(Code::V3),
            _ => Err(format!(
                "version {:?}: this primes binary carries code for 1.x, 2.x and 3.x",
                version.trim()
            )),
        }
    }

    pub fn number(self) -> u32 {
        match self {
            Code::V1 => 1,
            Code::V2 => 2,
            Code::V3 => 3,
        }
    }

    /// The export format this code writes.
    pub fn format(self) -> u32 {
        match self {
            Code::V1 => 1,
            Code::V2 | Code::V3 => 2,
        }
    }

    /// How this code mines.
    pub fn strategy(self) -> &'static str {
        match self {
            Code::V1 => "trial division",
            Code::V2 | Code::V3 => "segmented sieve",
        }
    }
}

/// Every prime below `next`, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Primes {
    pub primes: Vec<u64>,
    /// The first number not examined yet.
    pub next: u64,
    /// Twin prime pairs (p, p+2) among `primes`: v2's new field (`None` under v1).
    pub twins: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("state format 1 is not valid JSON of the expected shape: {0}")]
    Json(String),
    #[error("state format 2: {0}")]
    Binary(String),
    #[error("unknown state format (it starts with {0:?})")]
    Unknown(String),
    #[error("the primes are not strictly increasing, or not below `next` (at index {0})")]
    Order(usize),
    #[error(
        "v3 code_change: state format {0} cannot be converted: v3 keeps primes indexed by \
         segment (format 3), and no conversion to it exists"
    )]
    V3Refuses(u32),
}

#[derive(Serialize, Deserialize)]
struct Format1 {
    format: u32,
    next: u64,
    primes: Vec<u64>,
}

const FORMAT2_MAGIC: &str = "primes-state 2";

impl Primes {
    /// A fresh state for `code`.
    pub fn new(code: Code) -> Self {
        Self {
            primes: Vec::new(),
            next: 2,
            twins: (code >= Code::V2).then_some(0),
        }
    }

    pub fn largest(&self) -> Option<u64> {
        self.primes.last().copied()
    }

    /// Append primes found by the miner (all `>= next`, increasing) and move `next` on.
    pub fn extend(&mut self, found: &[u64], next: u64) {
        if let Some(twins) = self.twins.as_mut() {
            let mut previous = self.primes.last().copied();
            for &p in found {
                if previous.is_some_and(|q| p - q == 2) {
                    *twins += 1;
                }
                previous = Some(p);
            }
        }
        self.primes.extend_from_slice(found);
        self.next = next;
    }

    /// The state as `code` exports it.
    pub fn export(&self, code: Code) -> Vec<u8> {
        match code.format() {
            1 => {
                let doc = Format1 {
                    format: 1,
                    next: self.next,
                    primes: self.primes.clone(),
                };
                serde_json::to_vec(&doc).unwrap_or_default()
            }
            _ => {
                let twins = self.twins.unwrap_or_else(|| count_twins(&self.primes));
                let mut out = format!(
                    "{FORMAT2_MAGIC} count={} next={} twins={twins}\n",
                    self.primes.len(),
                    self.next
                )
                .into_bytes();
                out.reserve(self.primes.len() * 2);
                let mut previous = 0u64;
                for &p in &self.primes {
                    leb128(&mut out, p - previous);
                    previous = p;
                }
                out
            }
        }
    }

    /// `code`'s code_change: the state another instance exported, in whatever format, into
    /// the state `code` keeps.
    pub fn code_change(code: Code, exported: &[u8]) -> Result<(Self, u32), StateError> {
        if code == Code::V3 {
            let format = detect(exported)?;
            return Err(StateError::V3Refuses(format));
        }
        let (mut state, format) = decode(exported)?;
        match code {
            // v1 does not know twins (a downgrade from format 2 drops them).
            Code::V1 => state.twins = None,
            // v2's new field: computed once from a format 1 state, carried after that.
            _ => {
                if state.twins.is_none() {
                    state.twins = Some(count_twins(&state.primes));
                }
            }
        }
        Ok((state, format))
    }
}

fn count_twins(primes: &[u64]) -> u64 {
    primes.windows(2).filter(|w| w[1] - w[0] == 2).count() as u64
}

fn detect(bytes: &[u8]) -> Result<u32, StateError> {
    if bytes.first() == Some(&b'{') {
        Ok(1)
    } else if bytes.starts_with(FORMAT2_MAGIC.as_bytes()) {
        Ok(2)
    } else {
        let head: String = String::from_utf8_lossy(&bytes[..bytes.len().min(16)]).into_owned();
        Err(StateError::Unknown(head))
    }
}

/// Any known format, validated.
fn decode(bytes: &[u8]) -> Result<(Primes, u32), StateError> {
    let format = detect(bytes)?;
    let state = match format {
        1 => {
            let doc: Format1 =
                serde_json::from_slice(bytes).map_err(|e| StateError::Json(e.to_string()))?;
            if doc.format != 1 {
                return Err(StateError::Json(format!("`format` is {}", doc.format)));
            }
            Primes {
                primes: doc.primes,
                next: doc.next,
                twins: None,
            }
        }
        _ => decode2(bytes)?,
    };
    check_order(&state)?;
    Ok((state, format))
}

fn decode2(bytes: &[u8]) -> Result<Primes, StateError> {
    let bad = |why: &str| StateError::Binary(why.to_string());
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| bad("no header line"))?;
    let header = std::str::from_utf8(&bytes[..end]).map_err(|_| bad("header is not UTF-8"))?;
    let mut count = None;
    let mut next = None;
    let mut twins = None;
    for field in header[FORMAT2_MAGIC.len()..].split_whitespace() {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| bad("header field without `=`"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| bad("header value not a number"))?;
        match key {
            "count" => count = Some(value),
            "next" => next = Some(value),
            "twins" => twins = Some(value),
            _ => {}
        }
    }
    let count = count.ok_or_else(|| bad("no count"))?;
    let next = next.ok_or_else(|| bad("no next"))?;
    let mut primes = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 24));
    let mut rest = &bytes[end + 1..];
    let mut previous = 0u64;
    while !rest.is_empty() {
        let (gap, used) = read_leb128(rest).ok_or_else(|| bad("truncated gap"))?;
        rest = &rest[used..];
        previous = previous
            .checked_add(gap)
            .ok_or_else(|| bad("gap overflows"))?;
        primes.push(previous);
    }
    if primes.len() as u64 != count {
        return Err(StateError::Binary(format!(
            "header says {count} primes, the body has {}",
            primes.len()
        )));
    }
    Ok(Primes {
        primes,
        next,
        twins,
    })
}

fn check_order(state: &Primes) -> Result<(), StateError> {
    for (i, w) in state.primes.windows(2).enumerate() {
        if w[1] <= w[0] {
            return Err(StateError::Order(i + 1));
        }
    }
    if state.largest().is_some_and(|p| p >= state.next) {
        return Err(StateError::Order(state.primes.len() - 1));
    }
    Ok(())
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(code: Code) -> Primes {
        let mut s = Primes::new(code);
        s.extend(&[2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31], 32);
        s
    }

    #[test]
    fn versions_pick_code() {
        assert_eq!(Code::from_version("1.0.0"), Ok(Code::V1));
        assert_eq!(Code::from_version("2.1\n"), Ok(Code::V2));
        assert_eq!(Code::from_version("3"), Ok(Code::V3));
        assert!(Code::from_version("4.0").is_err());
    }

    #[test]
    fn v2_counts_twins_as_it_mines() {
        let s = sample(Code::V2);
        // (3,5) (5,7) (11,13) (17,19) (29,31)
        assert_eq!(s.twins, Some(5));
        assert_eq!(sample(Code::V1).twins, None);
    }

    #[test]
    fn upgrade_converts_format_1_to_2_and_back() -> Result<(), StateError> {
        let v1 = sample(Code::V1);
        let exported = v1.export(Code::V1);
        assert_eq!(exported.first(), Some(&b'{'));
        let (v2, format) = Primes::code_change(Code::V2, &exported)?;
        assert_eq!(format, 1);
        assert_eq!(v2.primes, v1.primes);
        assert_eq!(v2.next, 32);
        assert_eq!(v2.twins, Some(5));

        let exported2 = v2.export(Code::V2);
        assert!(exported2.starts_with(b"primes-state 2 count=11 next=32 twins=5\n"));
        assert!(exported2.len() < exported.len());
        let (again, format) = Primes::code_change(Code::V2, &exported2)?;
        assert_eq!((format, &again), (2, &v2));

        // A downgrade: v1 reads format 2 and drops the field it does not know.
        let (down, format) = Primes::code_change(Code::V1, &exported2)?;
        assert_eq!(format, 2);
        assert_eq!(down, v1);
        Ok(())
    }

    #[test]
    fn v3_code_change_fails() {
        let exported = sample(Code::V2).export(Code::V2);
        assert_eq!(
            Primes::code_change(Code::V3, &exported),
            Err(StateError::V3Refuses(2))
        );
    }

    #[test]
    fn broken_states_are_refused() {
        for bad in [
            &b""[..],
            b"hello",
            b"{\"format\":1,\"next\":10,\"primes\":[2,5,3]}",
            b"{\"format\":1,\"next\":3,\"primes\":[2,3]}",
            b"primes-state 2 count=3 next=10\n\x02\x01",
            b"primes-state 2 count=1 next=10\n\x82",
        ] {
            assert!(Primes::code_change(Code::V2, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn big_gaps_round_trip() -> Result<(), StateError> {
        let mut s = Primes::new(Code::V2);
        s.extend(&[2, 1_000_003, 4_294_967_311], 4_294_967_312);
        let (back, _) = Primes::code_change(Code::V2, &s.export(Code::V2))?;
        assert_eq!(back.primes, s.primes);
        Ok(())
    }
}
