//! Routing and layer assignment: pure functions over a snapshot of the swarm, so they
//! can be tested with many simulated peers and seeded randomness. The networking code
//! only gathers the snapshot and carries out the decision.

mod assign;
mod ban;
mod measured;
mod numerics;
mod route;

pub use assign::{choose_layers, coverage};
pub use ban::BanList;
pub use measured::Measured;
pub use numerics::{plan_route_preferring, PreferredRoute};
pub use route::{missing_ranges, plan_route, plan_route_over, Candidate, Hop, RouteError};
