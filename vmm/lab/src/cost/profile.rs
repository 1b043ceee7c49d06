//! A cost profile: what each event costs on one host, and where each
//! figure comes from. Loaded from JSON and checked ([`CostProfile::load`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::events::{event, EVENTS};

/// Name of the profile schema.
pub const PROFILE_SCHEMA: &str = "vmm-cost-profile";
/// Version of the profile schema.
pub const PROFILE_VERSION: u32 = 1;

/// How a cost was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CostKind {
    /// A figure measured (on this host by a microbenchmark, or printed in
    /// the cited source).
    Measured,
    /// Arithmetic on measured figures, with the inputs given in `source`.
    Derived,
    /// No measurement found: a reasoned placeholder.
    Estimate,
}

/// One event's cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Nanoseconds per event (finite, at least 0).
    pub ns: f64,
    /// Measured, derived or estimate.
    pub kind: CostKind,
    /// How it was measured, or where it comes from.
    pub source: String,
}

/// A host's per-event costs (schema [`PROFILE_SCHEMA`] version
/// [`PROFILE_VERSION`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostProfile {
    /// [`PROFILE_SCHEMA`].
    pub schema: String,
    /// [`PROFILE_VERSION`].
    pub version: u32,
    /// The profile's name: the key of its projection in compare.json.
    pub name: String,
    /// The host, for people: CPU, kernel, KVM flavour, view.
    pub host: String,
    /// Per event key (every one of [`EVENTS`], nothing else).
    pub costs: BTreeMap<String, Cost>,
    /// Figures no source or measurement was found for, and what stands in.
    #[serde(default)]
    pub not_found: Vec<String>,
}

/// Errors of loading or checking a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("cannot read cost profile {path}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a profile document.
    #[error("cost profile {path} is not valid JSON of the profile schema")]
    Parse {
        /// The file.
        path: String,
        /// What the parser found.
        #[source]
        source: serde_json::Error,
    },
    /// Another schema, or another version of this one.
    #[error(
        "cost profile {name}: schema {schema} version {version}, expected {PROFILE_SCHEMA} version {PROFILE_VERSION}"
    )]
    Schema {
        /// The profile's name.
        name: String,
        /// Its schema.
        schema: String,
        /// Its version.
        version: u32,
    },
    /// The profile has no name.
    #[error("a cost profile has an empty name")]
    NoName,
    /// An event of [`EVENTS`] has no cost.
    #[error("cost profile {name} has no cost for {event}")]
    Missing {
        /// The profile's name.
        name: String,
        /// The event key.
        event: &'static str,
    },
    /// A cost names an event the lab does not count.
    #[error("cost profile {name} prices {event}, which is no event the lab counts")]
    Unknown {
        /// The profile's name.
        name: String,
        /// The key.
        event: String,
    },
    /// A cost is negative, infinite or NaN.
    #[error("cost profile {name}: {event} costs {ns} ns, not a finite figure of at least 0")]
    BadCost {
        /// The profile's name.
        name: String,
        /// The event key.
        event: String,
        /// The figure.
        ns: f64,
    },
    /// A cost does not say where it comes from.
    #[error("cost profile {name}: {event} has no source")]
    NoSource {
        /// The profile's name.
        name: String,
        /// The event key.
        event: String,
    },
}

impl CostProfile {
    /// Reads and checks the profile at `path`.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let shown = || path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read { path: shown(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ProfileError::Parse { source, .. } => ProfileError::Parse { path: shown(), source },
            e => e,
        })
    }

    /// Parses and checks a profile document.
    pub fn parse(text: &str) -> Result<Self, ProfileError> {
        let profile: Self =
            serde_json::from_str(text).map_err(|source| ProfileError::Parse { path: String::new(), source })?;
        profile.validate()?;
        Ok(profile)
    }

    /// Checks the schema, that every event has a finite cost of at least 0
    /// with a source, and that nothing else is priced.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let name = || self.name.clone();
        if self.schema != PROFILE_SCHEMA || self.version != PROFILE_VERSION {
            return Err(ProfileError::Schema { name: name(), schema: self.schema.clone(), version: self.version });
        }
        if self.name.trim().is_empty() {
            return Err(ProfileError::NoName);
        }
        if let Some(e) = EVENTS.iter().find(|e| !self.costs.contains_key(e.key)) {
            return Err(ProfileError::Missing { name: name(), event: e.key });
        }
        for (key, cost) in &self.costs {
            if event(key).is_none() {
                return Err(ProfileError::Unknown { name: name(), event: key.clone() });
            }
            if !cost.ns.is_finite() || cost.ns < 0.0 {
                return Err(ProfileError::BadCost { name: name(), event: key.clone(), ns: cost.ns });
            }
            if cost.source.trim().is_empty() {
                return Err(ProfileError::NoSource { name: name(), event: key.clone() });
            }
        }
        Ok(())
    }

    /// The cost of `event` in ns (0 for an event the profile lacks, which a
    /// validated profile never does).
    pub fn ns(&self, event: &str) -> f64 {
        self.costs.get(event).map_or(0.0, |c| c.ns)
    }
}
