//! Priority classes: of a Model (whom preemption spares, whom it takes first), of an API
//! key and of a request (who waits and who is refused first when a queue is under
//! pressure). The rules are in `docs/multi-tenant.md`, and in the pure decisions that
//! apply them (the sidecar's admission, the ledger's victim choice).

use std::{fmt, str::FromStr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Lowest to highest: `sheddable` < `standard` < `critical`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Sheddable,
    #[default]
    Standard,
    Critical,
}

/// The request header that carries a request's priority from the API server to the
/// sidecar. A client may send it to lower its key's priority, never to raise it.
pub const PRIORITY_HEADER: &str = "x-greenthread-priority";

/// The request header that marks a request of a batch (the API server's batch runner):
/// its sidecar gives it only capacity that interactive traffic leaves idle (see the
/// sidecar's `admit_batch`). Clients' copies are removed by the API server.
pub const BATCH_HEADER: &str = "x-greenthread-batch";

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Sheddable, Priority::Standard, Priority::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Sheddable => "sheddable",
            Priority::Standard => "standard",
            Priority::Critical => "critical",
        }
    }

    pub fn is_standard(&self) -> bool {
        *self == Priority::Standard
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("{s:?} is not critical, standard or sheddable"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_lowest_first_and_parsed_by_name() {
        assert!(
            Priority::Sheddable < Priority::Standard && Priority::Standard < Priority::Critical
        );
        for p in Priority::ALL {
            assert_eq!(p.as_str().parse::<Priority>(), Ok(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert_eq!(" Critical ".parse::<Priority>(), Ok(Priority::Critical));
        assert!("urgent".parse::<Priority>().unwrap_err().contains("urgent"));
    }
}
