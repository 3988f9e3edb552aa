//! Upstream concerns beyond routing: instance health (load, passive ejection, active
//! checks) and waking suspended sandboxes.

pub mod health;
pub mod wake;
