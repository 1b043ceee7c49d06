//! The projection of one stretch of a run onto a host's profile (the rule
//! is in the module docs of [`super`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::events::{event_count, EVENTS};
use super::profile::CostProfile;

/// One event's term of the sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventTerm {
    /// Events in the policy's stretch.
    pub count: f64,
    /// Events in off's stretch.
    pub off_count: f64,
    /// The profile's cost of one, in ns.
    pub cost_ns: f64,
    /// (count - off_count) * cost_ns.
    pub ns: f64,
}

/// A stretch (a phase, or the whole run) projected onto one profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StretchProjection {
    /// The guest time on that host: guest_ns + the sum of the events' `ns`.
    pub total_ns: f64,
    /// The guest's own time: off's measured wall time.
    pub guest_ns: f64,
    /// The policy's own measured wall time, for comparison.
    pub measured_ns: f64,
    /// Per event key, its term.
    pub events: BTreeMap<String, EventTerm>,
}

/// Projects a policy's stretch onto `profile`, from its flat figures and
/// off's (medians, by flat name; `wall_ns` is the stretch's wall time).
pub fn project(
    policy: &BTreeMap<String, f64>,
    off: &BTreeMap<String, f64>,
    profile: &CostProfile,
) -> StretchProjection {
    let wall = |f: &BTreeMap<String, f64>| f.get("wall_ns").copied().unwrap_or(0.0);
    let events: BTreeMap<String, EventTerm> = EVENTS
        .iter()
        .map(|e| {
            let (count, off_count, cost_ns) = (event_count(e, policy), event_count(e, off), profile.ns(e.key));
            (e.key.to_string(), EventTerm { count, off_count, cost_ns, ns: (count - off_count) * cost_ns })
        })
        .collect();
    let guest_ns = wall(off);
    let total_ns = guest_ns + events.values().map(|t| t.ns).sum::<f64>();
    StretchProjection { total_ns, guest_ns, measured_ns: wall(policy), events }
}
