//! The cost model: per-event costs of a host (a [`CostProfile`], a small
//! versioned JSON file) and what a run's event counts would cost a guest on
//! that host ([`project`]).
//!
//! Event counts are exact and the same on every host; times are not. A
//! profile gives each event the lab counts ([`EVENTS`]) a cost in
//! nanoseconds, with how it was obtained (`kind`: measured, derived or
//! estimate) and where it comes from (`source`). `vmm bench profile`
//! measures this host's; `vmm-lab/profiles/hw-vmx-ept.json` is hardware
//! KVM's from published figures.
//!
//! # The projection
//!
//! For one stretch (a phase, or the whole run) of a policy P against the
//! `off` run of the same guest, on a host whose profile gives cost `c(e)`:
//!
//! ```text
//! projected(P) = wall(off) + sum over events e of (n_P(e) - n_off(e)) * c(e)
//! ```
//!
//! `wall(off)` is the guest's own time, as measured with deduplication off;
//! off's own events are subtracted because that time already holds them
//! (at the measuring host's prices). `n(e)` sums the run figures the event
//! names ([`EventDef::figures`]); `host_refault` is the host KVM's
//! `pf_fixed` less the secondary-MMU faults of the same run (each of which
//! the fault's own cost covers), never below 0. So `projected(off)` is off's
//! measured time, and for every other policy the model adds what its
//! events beyond off's cost on that host.

mod events;
mod profile;
mod project;

pub use events::{event, event_count, EventDef, EVENTS};
pub use profile::{Cost, CostKind, CostProfile, ProfileError, PROFILE_SCHEMA, PROFILE_VERSION};
pub use project::{project, EventTerm, StretchProjection};
