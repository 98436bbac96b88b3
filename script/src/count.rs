//! [`NodeCount`]: `canary` and `max_in_flight` as a script writes them, a number of nodes or a
//! percentage of a set of nodes.

use serde::{Serialize, Serializer};

/// A number of nodes as a script writes it: a count or a percentage of a set of nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeCount {
    /// Exactly this many (0 = none for `canary`, all at once for `max_in_flight`).
    #[default]
    None,
    Nodes(u32),
    /// This percentage (1..=100) of a set of nodes, rounded up.
    Percent(u32),
}

impl NodeCount {
    /// A plain count (0 is [`NodeCount::None`]).
    pub fn nodes(n: u32) -> Self {
        if n == 0 { Self::None } else { Self::Nodes(n) }
    }

    /// Whether this asks for no node at all.
    pub fn is_none(self) -> bool {
        matches!(self, Self::None | Self::Nodes(0) | Self::Percent(0))
    }

    /// How many of `of` nodes this is: a percentage rounded up and at least one node, never
    /// more than `of`; 0 when it asks for none.
    pub fn of(self, of: usize) -> usize {
        let n = match self {
            Self::None => 0,
            Self::Nodes(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Self::Percent(0) => 0,
            Self::Percent(p) => {
                let p = usize::try_from(p).unwrap_or(100);
                of.saturating_mul(p).div_ceil(100).max(1)
            }
        };
        n.min(of)
    }
}

impl std::fmt::Display for NodeCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "0"),
            Self::Nodes(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A count as a number, a percentage as its string (`"10%"`), as the script writes them.
impl Serialize for NodeCount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::None => s.serialize_u32(0),
            Self::Nodes(n) => s.serialize_u32(*n),
            Self::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}
